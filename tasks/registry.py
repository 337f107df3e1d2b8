"""The task registry: name -> Task class. Adding a task is one module plus one line here."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from tasks.errors import ConfigError

if TYPE_CHECKING:  # the registry itself stays light: the command line reads it to parse --task
    from tasks.engine.task import Task

# name -> "module:TaskClass"
TASKS: dict[str, str] = {
    "pretrain": "tasks.pretraining:PretrainingTask",
    "vqa": "tasks.vqa:VQATask",
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
