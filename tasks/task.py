"""The contract between the trainer and a task (pretraining, VQA, retrieval, referring expressions).

The trainer knows nothing task-specific: it asks the task for datasets, a collate function, the model, the loss of
a batch, and the evaluation metrics. Adding a task is one module implementing this class plus one registry line.

How `tasks.trainer.Trainer` calls a task:
- `build_model()` once, after seeding every rank identically; the trainer moves it to the device (and wraps it
  in DDP / torch.compile).
- `dataset("train")`, read by index in DataLoader workers. A dataset that needs per-sample randomness (masking,
  negatives) defines `sample(index, epoch)`; the trainer then calls it instead of `dataset[index]`, and the
  dataset seeds its generator from (seed, epoch, index) so runs are reproducible and resumable.
- `collate(samples)` in the workers; the result (a mapping of tensors) is moved to the device by the trainer.
- `training_step(model, batch)` under autocast, batch already on the device; returns the micro-batch's mean loss
  and metric tensors that stay on the device (the trainer averages them and syncs only at log intervals).
- `evaluate(model, split)` on rank 0 in eval mode under `torch.no_grad()` and autocast; returns floats.
  An empty dict means "nothing to evaluate". `main_metric` picks the best checkpoint, in the direction
  `higher_is_better`.
- Under DDP, a model with parameters that get no gradient in `training_step` (heads of other tasks) must set
  `find_unused_parameters = True` on the task (DistributedDataParallel's option of that name).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import Dataset


@dataclass
class StepOutput:
    """The loss of one batch and per-batch metric tensors (kept on device: no host sync in the step)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class Task:
    """Base class. `name` keys the task registry; `main_metric` picks the best checkpoint."""

    name: str = ""
    main_metric: str = "loss"
    higher_is_better: bool = False  # for main_metric; accuracy-like metrics set True
    find_unused_parameters: bool = False  # DDP: some parameters get no gradient in training_step

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def dataset(self, split: str) -> Dataset:
        raise NotImplementedError

    def collate(self, samples: list) -> Mapping[str, torch.Tensor]:
        raise NotImplementedError

    def training_step(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> StepOutput:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, split: str, progress: Callable | None = None) -> dict[str, float]:
        raise NotImplementedError
