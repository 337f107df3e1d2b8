"""Run records: what a run was, written beside its config and in every checkpoint as `run.json`.

A checkpoint directory alone must say which task trained it, which 12-in-1 task token that task gives models with
task tokens, which feature extractor made its regions (so `vilbert predict` runs the same detector on a new
image) and which model class it holds. The record is a small JSON object:

    {"task": "refcoco+", "task_token": "refcoco+", "architecture": "tasks",
     "feature_extractor": [{"detector": "butd-r101-c4", ...}]}

`feature_extractor` lists the `extractor` attributes of the run's feature store files, in the order the task joins
them (the detected-box store first). Tasks produce their record through `Task.run_record()`; the trainer writes it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from features.atomic import write_json_atomic
from features.errors import FeaturesError
from features.store import FeatureStore
from tasks.errors import ConfigError

RUN_RECORD = "run.json"
PRETRAINING, TASK_ARCHITECTURE = "pretraining", "tasks"  # the two architectures: ViLBertForPreTraining, ViLBertForVLTasks


def architecture(model: nn.Module | Sequence[str]) -> str:
    """"pretraining" or "tasks": the one test of which ViLBERT a model, or a config.json's `architectures`, is.

    Only `ViLBertForPreTraining` is a pretraining model; every other class (the task model) is "tasks".
    """
    names = [type(model).__name__] if isinstance(model, nn.Module) else list(model)
    return PRETRAINING if "ViLBertForPreTraining" in names else TASK_ARCHITECTURE


def store_extractors(paths: Iterable[str | os.PathLike]) -> list[dict]:
    """The `extractor` attributes of each feature store file, in order (duplicates kept once)."""
    extractors: list[dict] = []
    for path in paths:
        try:
            extractor = FeatureStore(path).extractor
        except FeaturesError as error:
            raise ConfigError(f"cannot record the feature extractor of {path}: {error}") from error
        if extractor not in extractors:
            extractors.append(extractor)
    return extractors


def write_run_record(directory: str | os.PathLike, record: Mapping[str, Any]) -> Path:
    """Write `directory/run.json` atomically."""
    return write_json_atomic(Path(directory) / RUN_RECORD, dict(record))


def read_run_record(directory: str | os.PathLike) -> dict[str, Any]:
    """`directory/run.json`, or {} when the directory has none (converted or older checkpoints)."""
    path = Path(directory) / RUN_RECORD
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path}: not a readable run record ({error})") from error
    if not isinstance(record, dict):
        raise ConfigError(f"{path}: expected a JSON object (the run record)")
    return record
