"""Evaluation passes: the model in eval mode, a split's batches in order on the model's device."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tasks.engine.distributed import move_to_device


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's (first) parameters."""
    return next(model.parameters()).device


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode for the block, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def eval_batches(model: nn.Module, dataset: Dataset, collate: Callable, batch_size: int,
                 progress: Callable | None = None) -> Iterator[dict[str, Any]]:
    """A split's batches in order, on the model's device, with the model in eval mode while they are read."""
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    device = model_device(model)
    with eval_mode(model):
        for batch in progress(loader) if progress else loader:
            yield move_to_device(batch, device)
