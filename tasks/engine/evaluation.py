"""Evaluation passes: the model in eval mode, a split's batches in order on the model's device."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

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
                 progress: Callable | None = None, order: Sequence[int] | None = None) -> Iterator[dict[str, Any]]:
    """A split's batches on the model's device, with the model in eval mode while they are read: in dataset
    order, or in `order` (dataset positions; `tasks.engine.sampler.length_order` puts similar items together so
    that batches padded to their longest item pad little; `in_dataset_order` undoes it)."""
    loader = DataLoader(dataset if order is None else Subset(dataset, list(order)), batch_size=batch_size,
                        collate_fn=collate)
    device = model_device(model)
    with eval_mode(model):
        for batch in progress(loader) if progress else loader:
            yield move_to_device(batch, device)


def in_dataset_order(predictions: Sequence[Any], order: Sequence[int]) -> list[Any]:
    """Per-item predictions made in `order` (one per item) back in dataset order."""
    if len(predictions) != len(order):
        raise ValueError(f"{len(predictions)} predictions for {len(order)} items")
    result: list[Any] = [None] * len(order)
    for position, prediction in zip(order, predictions, strict=True):
        result[int(position)] = prediction
    return result
