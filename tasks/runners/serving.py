"""What the demo serves: every task each checkpoint answers, and one request answered through the predict path.

Which tasks a checkpoint answers comes from its run record and its weights, through the task contract; no task is
named here:
- a run's checkpoint answers the task its run trained, a multi-task run's every member (run.json `tasks`);
- a checkpoint that does not say (converted weights) answers every registered task whose head modules its weights
  hold (a pretraining checkpoint: the tasks that score zero-shot);
- a task answers only if it has single-example inputs (`Task.example_inputs`) and the checkpoint's config.json
  holds what its predictions need (`Task.prediction_problem`, e.g. an answer list).
Several checkpoints add up; two offering the same task name are refused at start, in one line. Each checkpoint's
model and detector load once and are shared by its tasks. A request is checked against the task's inputs, then
answered by `tasks.runners.predict.predict_example` (the path of `vilbert predict-task`), drawn, and its
co-attention drawn per image. Request admission (upload sizes, decoding, the lock) is the server's
(tasks.runners.serve); how an image's regions are made is the predict path's (`predict.image_regions`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from features.detector import RegionDetector
from features.images import LoadedImage
from tasks.engine.task import Task
from tasks.errors import ConfigError
from tasks.registry import TASKS, task_class
from tasks.runners import predict
from tasks.runners.checkpoint import CheckpointInfo, check_serves, load_model, read_checkpoint

logger = logging.getLogger(__name__)


@dataclass
class ServedTask:
    """One task the demo offers: the task, and the model and detector of the checkpoint that answers it."""

    task: Task
    checkpoint: str  # how the page names the checkpoint
    model: nn.Module
    detector: RegionDetector
    detector_name: str

    @property
    def name(self) -> str:
        return self.task.name

    def describe(self) -> dict[str, Any]:
        """What the page needs to ask for this task's input (its `ExampleInputs`)."""
        inputs = self.task.example_inputs
        return {"name": self.name, "checkpoint": self.checkpoint, "text": inputs.text,
                "candidates": inputs.candidates, "num_candidates": inputs.num_candidates,
                "images": list(inputs.images), "example_text": inputs.example_text}


def offered_task_names(info: CheckpointInfo) -> list[str]:
    """The registered tasks a checkpoint answers by its run record, else by the heads its weights hold."""
    recorded = info.record.get("tasks") or ([info.task] if info.task else [])
    if recorded:
        return [name for name in dict.fromkeys(recorded) if name in TASKS]
    if info.is_pretraining:
        return [name for name in TASKS if task_class(name).example_inputs and task_class(name).pretraining_zero_shot]
    held = {name.split(".")[0] for name in info.weight_names()}
    return [name for name in TASKS if task_class(name).example_inputs and task_class(name).head_modules
            and held >= set(task_class(name).head_modules)]


def checkpoint_label(directory: str | os.PathLike) -> str:
    """`run/step-N` for a trainer's checkpoint (…/run/checkpoints/step-N), else the directory's name."""
    path = Path(directory).resolve()
    return f"{path.parent.parent.name}/{path.name}" if path.parent.name == "checkpoints" else path.name


def load_served(directory: str | os.PathLike, device: str, detector: str | None = None,
                allow_random: bool = False) -> list[ServedTask]:
    """Every task one checkpoint answers, its model and detector loaded once (fails like `vilbert predict` on a
    bad directory, detector or tokenizer; a checkpoint answering no task is one line naming why)."""
    info = read_checkpoint(directory)
    names = offered_task_names(info)
    tasks, refused = [], []
    for name in names:
        task = predict.checkpoint_task(info, name, predict.checkpoint_tokenizer(info, task=name))
        problem = ("no single-example prediction" if task.example_inputs is None
                   else task.prediction_problem(info.config))
        if problem:
            refused.append(f"{name}: {problem}")
            logger.warning("%s: not offering %s (%s)", directory, name, problem)
            continue
        check_serves(info, task)
        tasks.append(task)
    if not tasks:
        why = "; ".join(refused) or "its run record names no task and its weights hold no task's head"
        raise ConfigError(f"--checkpoint {directory}: no task to serve ({why})")
    detector_name, region_detector = predict.prepare_detector(info, detector, allow_random=allow_random)
    model = load_model(info, device, tasks[0])
    label = checkpoint_label(directory)
    return [ServedTask(task, label, model, region_detector, detector_name) for task in tasks]


def load_all(directories: list[str], device: str, detector: str | None = None,
             allow_random: bool = False) -> list[ServedTask]:
    """The tasks of every checkpoint, in order; a task name two checkpoints offer is refused in one line."""
    served: dict[str, ServedTask] = {}
    offered_by: dict[str, str] = {}
    for directory in directories:
        for task in load_served(directory, device, detector, allow_random):
            if task.name in served:
                raise ConfigError(f"--checkpoint {directory}: offers {task.name}, which --checkpoint "
                                  f"{offered_by[task.name]} offers too; serve one of them")
            served[task.name], offered_by[task.name] = task, str(directory)
    return list(served.values())


def answer(served: ServedTask, images: list[LoadedImage], boxes: list[np.ndarray | None], names: list[str],
           text: str | None, candidates: list[str], device: str, figures: Path) -> tuple[dict[str, Any], list[Path]]:
    """One request through the predict path: (the result, its pictures). The result is the task's answer with its
    headline (`summary`) and text lines, the regions each image gave and `notes` on how they were made; the
    pictures (PNG files under `figures`) are the drawn answer, then one co-attention figure per image."""
    notes: list[str] = []
    example, result = predict.predict_example(served.task, served.model, served.detector, served.detector_name,
                                              images, boxes, names, device, note=notes.append, text=text,
                                              candidates=candidates)
    pictures = [predict.save_picture(served.task.draw(example, result), figures / "drawn.png")]
    for index in range(len(example.images)):
        out = figures / f"attention-{index}.png"
        try:
            predict.write_attention(served.model, served.task, example, result, image=index, out=out)
        except ConfigError as error:  # e.g. a text of special tokens only: the answer stands without the figure
            notes.append(f"no attention figure: {error}")
            break
        pictures.append(out)
    return {"task": served.name, "checkpoint": served.checkpoint, "detector": served.detector_name, "notes": notes,
            "boxes": [[[round(float(v), 2) for v in box] for box in image.boxes] for image in example.images],
            "summary": served.task.headline(result), "lines": served.task.summary_lines(result), **result}, pictures
