"""Evaluation of a checkpoint on a task split: the task from its config, the model from the checkpoint, then
`predict` once and `score` those predictions (the metrics always describe the predictions written beside them).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from tasks.data.annotations import load_json
from tasks.engine.config import load_config
from tasks.engine.task import Task
from tasks.errors import ConfigError
from tasks.registry import task_class

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def load_task(name: str, config_path: str | None, overrides: list[str]) -> Task:
    """The task object with its config: the YAML (default tasks/configs/<name>.yaml) plus key=value overrides."""
    cls = task_class(name)
    config = load_config(config_path or CONFIG_DIR / f"{name}.yaml", cls.config_class, overrides)
    return cls(config)


def load_checkpoint_model(checkpoint: str, task: Task) -> nn.Module:
    """A task model from `checkpoint`; for retrieval a pretraining checkpoint loads as is (zero-shot)."""
    config_file = Path(checkpoint) / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"--checkpoint {checkpoint}: no config.json (a save_pretrained directory)")
    architectures = load_json(config_file).get("architectures") or []
    if task.name == "retrieval" and "ViLBertForPreTraining" in architectures:
        from vilbert import ViLBertForPreTraining

        logger.info("pretraining checkpoint: zero-shot retrieval from the alignment head")
        return ViLBertForPreTraining.from_pretrained(checkpoint)
    return task.build_model()


def evaluate_split(task: Task, model: nn.Module, split: str,
                   progress: Callable | None = None) -> tuple[Any, dict[str, float]]:
    """(predictions, metrics) of `model` on `split`: inference runs once."""
    predictions = task.predict(model, split, progress)
    return predictions, task.score(predictions, split)
