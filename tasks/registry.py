"""The task registry: name -> Task class, and the one constructor of a task from its config.

Adding a task is one module plus one line here (and its config in tasks/configs/).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.engine.config import from_dict, load_config
from tasks.errors import ConfigError

if TYPE_CHECKING:  # the registry itself stays light: the command line reads it to parse --task
    from tasks.engine.task import Task

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # tasks/configs/<name>.yaml: each task's default config

# name -> "module:TaskClass"
TASKS: dict[str, str] = {
    "pretrain": "tasks.pretraining:PretrainingTask",
    "vqa": "tasks.vqa:VQATask",
    "vqa-cp": "tasks.vqa:VQACPTask",
    "retrieval": "tasks.retrieval:RetrievalTask",
    "refcoco": "tasks.refexp:RefCOCOTask",
    "refcoco+": "tasks.refexp:RefCOCOPlusTask",
    "refcocog": "tasks.refexp:RefCOCOgTask",
    "snli-ve": "tasks.snli_ve:SNLIVETask",
    "nlvr2": "tasks.nlvr2:NLVR2Task",
    "gqa": "tasks.gqa:GQATask",
    "visual7w": "tasks.pointing:Visual7WTask",
    "guesswhat-pointing": "tasks.guesswhat:GuessWhatPointingTask",
    "guesswhat": "tasks.guesswhat:GuessWhatTask",
    "genome-qa": "tasks.genome_qa:GenomeQATask",
    "foil": "tasks.foil:FoilTask",
    "flickr-grounding": "tasks.flickr_grounding:FlickrGroundingTask",
    "vcr-qa": "tasks.vcr:VCRTask",
    "vcr-qar": "tasks.vcr:VCRRationaleTask",
    "multi": "tasks.multitask:MultiTask",
}


def task_class(name: str) -> type[Task]:
    """Look a task class up by name; modules are imported only when asked for."""
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; choose one of {', '.join(sorted(TASKS))}")
    module_name, class_name = TASKS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def build_task(name: str, config: str | os.PathLike | Mapping[str, Any] | None = None,
               overrides: Sequence[str] = (), source: str | None = None) -> Task:
    """Task `name` with its config: a YAML file (default tasks/configs/<name>.yaml) plus key=value overrides, or
    an already-read mapping (a run's saved config; `source` names it in errors)."""
    cls = task_class(name)
    if isinstance(config, Mapping):
        return cls(from_dict(cls.config_class, dict(config), source or f"the {name} config"))
    return cls(load_config(config or CONFIG_DIR / f"{name}.yaml", cls.config_class, list(overrides)))
