"""Evaluation of a checkpoint on a task split: the task from its config, the model from the checkpoint, then
`predict` once and `score` those predictions (the metrics always describe the predictions written beside them).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from tasks.engine.config import load_config
from tasks.engine.task import Task
from tasks.registry import task_class
from tasks.runners.checkpoint import check_serves, read_checkpoint
from vilbert import ViLBertForPreTraining

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def load_task(name: str, config_path: str | None, overrides: list[str]) -> Task:
    """The task object with its config: the YAML (default tasks/configs/<name>.yaml) plus key=value overrides."""
    cls = task_class(name)
    config = load_config(config_path or CONFIG_DIR / f"{name}.yaml", cls.config_class, overrides)
    return cls(config)


def load_checkpoint_model(checkpoint: str, task: Task) -> nn.Module:
    """A task model from `checkpoint`, refused in one line when the checkpoint lacks the task's head.

    A pretraining checkpoint loads as is for tasks that score zero-shot (retrieval, by its alignment head).
    """
    info = read_checkpoint(checkpoint)
    check_serves(info, task)
    if info.is_pretraining:
        logger.info("pretraining checkpoint: zero-shot %s from the alignment head", task.name)
        return ViLBertForPreTraining.from_pretrained(checkpoint)
    return task.build_model()


def evaluate_split(task: Task, model: nn.Module, split: str,
                   progress: Callable | None = None) -> tuple[Any, dict[str, float]]:
    """(predictions, metrics) of `model` on `split`: inference runs once."""
    predictions = task.predict(model, split, progress)
    return predictions, task.score(predictions, split)
