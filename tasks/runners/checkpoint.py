"""What a checkpoint directory is, read from its files, and whether it can serve a task.

A checkpoint directory holds `config.json` + `model.safetensors` (save_pretrained) and, when the trainer wrote it,
`run_config.yaml` (the run's merged config) and `run.json` (the run record: task, task token, feature extractor,
architecture; see tasks.engine.run_record). Converted or older checkpoints have only the first two; then the
architecture comes from config.json's `architectures` and nothing else is known.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from torch import nn

from tasks.data.annotations import load_json
from tasks.engine.run_record import PRETRAINING, architecture, read_run_record
from tasks.engine.task import Task
from tasks.errors import ConfigError
from tasks.registry import TASKS, task_class
from vilbert import ViLBertConfig, ViLBertForPreTraining, ViLBertForVLTasks

logger = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"


@dataclass
class CheckpointInfo:
    """A checkpoint directory's config.json, run config and run record."""

    directory: Path
    config: dict  # config.json
    run_config: dict = field(default_factory=dict)  # run_config.yaml, {} when absent
    record: dict = field(default_factory=dict)  # run.json, {} when absent

    @property
    def architecture(self) -> str:
        """"pretraining" or "tasks": the run record's, else config.json's `architectures`."""
        return self.record.get("architecture") or architecture(self.config.get("architectures") or [])

    @property
    def is_pretraining(self) -> bool:
        return self.architecture == PRETRAINING

    @property
    def task(self) -> str | None:
        """The task that trained this checkpoint, when the run recorded it."""
        return self.record.get("task")

    @property
    def task_token(self) -> str | None:
        return self.record.get("task_token")

    @property
    def feature_size(self) -> int:
        """The region feature size the model takes (v_feature_size)."""
        return int(self.config.get("v_feature_size", ViLBertConfig().v_feature_size))

    @property
    def feature_extractor(self) -> dict | None:
        """The extractor that made the run's regions (its first store's), when the run recorded it."""
        extractors = self.record.get("feature_extractor") or []
        return dict(extractors[0]) if extractors else None

    def weight_names(self) -> list[str]:
        """The parameter names in model.safetensors (read from its header; no tensor is loaded)."""
        path = self.directory / WEIGHTS
        if not path.is_file():
            raise ConfigError(f"--checkpoint {self.directory}: no {WEIGHTS}")
        try:
            with safe_open(str(path), framework="pt") as weights:
                return list(weights.keys())
        except Exception as error:  # a truncated or foreign file
            raise ConfigError(f"{path}: not a readable safetensors file ({error})") from error


def read_checkpoint(directory: str | os.PathLike) -> CheckpointInfo:
    """Read `config.json` (required), `run_config.yaml` and `run.json` (optional) of a checkpoint directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"--checkpoint {directory}: no such directory")
    if not (directory / "config.json").is_file():
        raise ConfigError(f"--checkpoint {directory}: no config.json (a save_pretrained directory)")
    config = load_json(directory / "config.json")
    run_config = {}
    run_file = directory / "run_config.yaml"
    if run_file.is_file():
        try:
            run_config = yaml.safe_load(run_file.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as error:
            raise ConfigError(f"{run_file}: not readable YAML ({error})") from error
    return CheckpointInfo(directory, config, run_config if isinstance(run_config, dict) else {},
                          read_run_record(directory))


def check_serves(info: CheckpointInfo, task: Task) -> None:
    """Refuse a checkpoint that lacks the task's heads, in one line naming the missing head.

    A pretraining checkpoint serves only tasks with `pretraining_zero_shot`; a task checkpoint must hold every
    module of `task.head_modules` (a missing one would start random). A checkpoint recorded as trained for another
    task is served with a warning: the head is there but was not trained for this task.
    """
    heads = ", ".join(task.head_modules)
    if info.is_pretraining:
        if not task.pretraining_zero_shot:
            raise ConfigError(f"--checkpoint {info.directory}: a pretraining checkpoint has no {heads} "
                              f"(needed by {task.name}); fine-tune it first (vilbert finetune --task {task.name} "
                              f"--init {info.directory})")
        return
    names = info.weight_names()
    for head in task.head_modules:
        if not any(name.startswith(f"{head}.") for name in names):
            raise ConfigError(f"--checkpoint {info.directory}: {WEIGHTS} has no {head} weights (needed by "
                              f"{task.name})")
    trained = info.task
    if trained == task.name or task.name in (info.record.get("tasks") or []):  # a multi-task run trained it
        return
    if trained in TASKS and set(task_class(trained).head_modules) != set(task.head_modules):
        logger.warning("%s was trained for %s; its %s was not trained", info.directory, trained,
                       heads or f"head for {task.name}")


def load_model(info: CheckpointInfo, device: str, task: Task) -> nn.Module:
    """The checkpoint's model (pretraining or task architecture) in eval mode on `device`, once it serves `task`."""
    check_serves(info, task)
    cls = ViLBertForPreTraining if info.is_pretraining else ViLBertForVLTasks
    try:
        model = cls.from_pretrained(str(info.directory))
    except (OSError, ValueError, RuntimeError) as error:
        raise ConfigError(f"--checkpoint {info.directory}: cannot load the weights ({error})") from error
    return model.to(device).eval()


def load_checkpoint_model(checkpoint: str, task: Task) -> nn.Module:
    """A task model from `checkpoint` for evaluation, refused in one line when the checkpoint lacks the task's head.

    A pretraining checkpoint loads as is for tasks that score zero-shot (retrieval, by its alignment head).
    """
    info = read_checkpoint(checkpoint)
    check_serves(info, task)
    if info.is_pretraining:
        logger.info("pretraining checkpoint: zero-shot %s from the alignment head", task.name)
        return ViLBertForPreTraining.from_pretrained(checkpoint)
    return task.build_model()


def load_dual_model(checkpoint: str, device: str | torch.device = "cpu") -> tuple[nn.Module, CheckpointInfo]:
    """(model in eval mode, its `CheckpointInfo`) of a checkpoint whose model has a dual encoder."""
    info = read_checkpoint(checkpoint)
    if not info.config.get("dual_embedding_size"):
        raise ConfigError(f"--checkpoint {checkpoint}: its model has no dual encoder (dual_embedding_size is 0); "
                          "pretrain or fine-tune with data.contrastive_weight > 0")
    cls = ViLBertForPreTraining if info.is_pretraining else ViLBertForVLTasks
    return cls.from_pretrained(str(info.directory)).to(device).eval(), info
