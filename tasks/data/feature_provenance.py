"""Warn when a model meets region features from another detector than the ones it was trained on.

A converted checkpoint records `visual_features` (detector, selection, boxes) in its config.json; a store records
its extractor (the detector's name, or for imported files the detector family of the format). Running a model on
another family's features works but scores lower, so `finetune`, `evaluate` and `predict` say so in one line.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from features.errors import FeaturesError
from features.store import FeatureStore

logger = logging.getLogger(__name__)


def model_visual_features(checkpoint: str | Path | None) -> dict | None:
    """The `visual_features` recorded in a checkpoint directory's config.json, or None."""
    if not checkpoint or not (Path(checkpoint) / "config.json").is_file():
        return None
    value = json.loads((Path(checkpoint) / "config.json").read_text(encoding="utf-8")).get("visual_features")
    return value if isinstance(value, dict) else None


def feature_mismatch(visual_features: dict | None, detector: str | None, where: str) -> str | None:
    """The warning line when the model's detector and the features' detector are both known and differ."""
    expected = (visual_features or {}).get("detector")
    if not expected or not detector or expected == detector:
        return None
    selection = visual_features.get("selection")
    return (f"{where} holds {detector} features but the model was trained on {expected}"
            f"{f' ({selection})' if selection else ''}; expect lower scores")


def warn_if_store_differs(checkpoint: str | Path | None, feature_files: list[str]) -> str | None:
    """Log (and return) the one-line warning for the first store file, when the families differ."""
    visual_features = model_visual_features(checkpoint)
    if not visual_features or not feature_files:
        return None
    try:
        extractor = FeatureStore(feature_files[:1]).extractor
    except FeaturesError:
        return None  # the task reports an unreadable store itself
    message = feature_mismatch(visual_features, extractor.get("detector"), feature_files[0])
    if message:
        logger.warning("%s", message)
    return message
