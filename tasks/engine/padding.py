"""Batches padded to their longest item, and back to fixed lengths.

A collated batch has two padded axes: text (dimension 1 of `input_ids`, `attention_mask`, ...) and regions
(dimension 1 of `region_features`, `region_mask`, ...). A task declares which of its batch keys run along which
axis and what fills their padding (`Task.padded_keys`, a `PaddedKeys`). `cut_to_longest` drops the columns no
item of the batch uses; `pad_to` pads back to given lengths (the reference's fixed shapes), `pad_to_multiple` up to a
multiple (a few shapes for compiled steps). Under masked attention (additive -10000 masks, padded logits masked,
losses over labelled
positions) the real positions' outputs do not depend on how much padding follows them, so both give the same
per-item outputs and losses up to float rounding (tests/test_padding.py checks every registered task).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

TEXT, REGIONS = "text", "regions"

# key -> (axis, padding value); the model inputs every task's batch holds
PaddedKeys = Mapping[str, tuple[str, float]]
MODEL_PADDED_KEYS: PaddedKeys = {
    "input_ids": (TEXT, 0), "attention_mask": (TEXT, 0), "token_type_ids": (TEXT, 0),
    "region_features": (REGIONS, 0), "region_locations": (REGIONS, 0), "region_mask": (REGIONS, 0),
}
MASKS = {TEXT: "attention_mask", REGIONS: "region_mask"}


def longest(batch: Mapping[str, Any]) -> dict[str, int]:
    """The longest real item of the batch along each axis: {"text": L, "regions": R} (at least 1)."""
    return {axis: max(int(batch[key].sum(1).max()), 1) if batch[key].numel() else 1
            for axis, key in MASKS.items() if key in batch}


def cut_to_longest(batch: dict[str, Any], keys: PaddedKeys) -> dict[str, Any]:
    """The batch with every padded axis cut to its longest real item (masks are 1s then 0s along the axis)."""
    return pad_to(batch, keys, **longest(batch))


def pad_to(batch: dict[str, Any], keys: PaddedKeys, text: int | None = None,
           regions: int | None = None) -> dict[str, Any]:
    """The batch with its text axis at `text` and its region axis at `regions` columns (cut or padded; None: as
    is). Padding uses each key's declared value. Cutting below the longest real item is refused."""
    lengths = {TEXT: text, REGIONS: regions}
    real = longest(batch)
    for axis, length in lengths.items():
        if length is not None and axis in real and length < real[axis]:
            raise ValueError(f"cannot cut the {axis} axis to {length}: an item has {real[axis]}")
    out = dict(batch)
    for key, (axis, value) in keys.items():
        length = lengths[axis]
        if key not in batch or length is None:
            continue
        tensor = batch[key]
        have = tensor.shape[1]
        if have > length:
            out[key] = tensor[:, :length].contiguous()
        elif have < length:
            shape = (tensor.shape[0], length - have, *tensor.shape[2:])
            out[key] = torch.cat([tensor, tensor.new_full(shape, value)], dim=1)
    return out


def pad_to_multiple(batch: dict[str, Any], keys: PaddedKeys, multiple: int) -> dict[str, Any]:
    """The batch with each padded axis rounded up to a multiple of `multiple` (a compiled step then meets a few
    shapes; GPUs prefer multiples of 8)."""
    real = longest(batch)
    return pad_to(batch, keys, **{axis: -(-length // multiple) * multiple for axis, length in real.items()})


class MultipleCollate:
    """A task's collate followed by `pad_to_multiple` (picklable, for DataLoader workers)."""

    def __init__(self, collate: Callable[[list], dict[str, Any]], keys: PaddedKeys, multiple: int):
        self.collate, self.keys, self.multiple = collate, keys, multiple

    def __call__(self, samples: list) -> dict[str, Any]:
        return pad_to_multiple(self.collate(samples), self.keys, self.multiple)
