"""Masked-region targets for the shapes world: ground-truth colour x shape classes written into a feature store.

ViLBERT's masked-region loss regresses the detector's class distribution `cls_prob` (1601-way for Visual Genome).
The shapes world has no detector: its boxes are the ground truth, so the stand-in distribution is one-hot over the
19 classes (background 0, then colour x kind 1..18, `tasks.shapes.world.CLASS_NAMES`). `add_class_targets`
rewrites a finished store through the store's own writer with `cls_prob` [M, 19] and `objects_id` [M] added,
after checking that every stored box is the generator's box for that image in the same order, and records the world
(name, version, seed, classes) in the store's extractor: prediction on new images picks the detector of that world.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from features.store import FeatureStore, FeatureStoreWriter
from tasks.errors import DataError
from tasks.shapes.detector import world_record
from tasks.shapes.world import NUM_CLASSES

logger = logging.getLogger(__name__)

BOX_TOLERANCE = 0.01  # pixels; stores keep boxes as float32


def one_hot_classes(class_ids: list[int]) -> np.ndarray:
    """[K] class ids -> [K, 19] one-hot rows (the stand-in for a detector's class distribution)."""
    rows = np.zeros((len(class_ids), NUM_CLASSES), np.float32)
    rows[np.arange(len(class_ids)), class_ids] = 1.0
    return rows


def _load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: cannot read the shapes-world file ({error}); run `vilbert shapes-world` first") from error


def add_class_targets(store_path: str | Path, world: str | Path) -> int:
    """Rewrite the store at `store_path` with one-hot `cls_prob` from `<world>/gt_classes.json`; returns boxes written."""
    store_path, world = Path(store_path), Path(world)
    classes = _load_json(world / "gt_classes.json")
    boxes = _load_json(world / "gt_boxes.json")
    extractor_world = world_record(world)  # the detector that finds these boxes on new images must match it
    store = FeatureStore(store_path)
    written = 0
    try:
        with FeatureStoreWriter(store_path, feature_dim=store.feature_dim, cls_prob_dim=NUM_CLASSES,
                                extractor={**store.extractor, "cls_prob": "shapes-world ground-truth classes (one-hot)",
                                           "world": extractor_world},
                                float32=store.attrs[0]["features_dtype"] == "float32") as writer:
            for image_id in store.ids:
                if image_id not in classes:
                    raise DataError(f"{world / 'gt_classes.json'}: no classes for image {image_id!r} of {store_path}")
                regions = store.read(image_id)
                expected = np.asarray(boxes[image_id], np.float32).reshape(-1, 4)
                if regions.boxes.shape != expected.shape or np.abs(regions.boxes - expected).max(initial=0) > BOX_TOLERANCE:
                    raise DataError(f"{store_path}: the boxes of image {image_id!r} are not the ground-truth boxes of "
                                    f"{world / 'gt_boxes.json'}; extract with --boxes gt_boxes.json --box-format xyxy")
                ids = classes[image_id]
                writer.add(image_id, regions.image_hw, regions.features, regions.boxes,
                           cls_prob=one_hot_classes(ids), objects_id=np.asarray(ids, np.int32))
                written += len(ids)
    finally:
        store.close()
    logger.info("%s: wrote one-hot cls_prob for %d boxes", store_path, written)
    return written
