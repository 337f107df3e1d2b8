"""The contract between the trainer and a task (pretraining, VQA, retrieval, referring expressions).

The trainer knows nothing task-specific: it asks the task for datasets, a collate function, the model, the loss of
a batch, and the evaluation metrics. Adding a task is one module implementing this class plus one registry line.
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
    """Base class. `name` keys the task registry; `main_metric` picks the best checkpoint (higher is better)."""

    name: str = ""
    main_metric: str = "loss"

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
