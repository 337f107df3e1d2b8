"""The model's visual input: an IMG token, then the image's boxes, as arrays and as padded batches.

Position 0 is the IMG token: its feature is the mean of the image's region features and its location is
[0, 0, 1, 1, 1]. Then come up to `max_regions - 1` boxes in store order, each located by
[x1/W, y1/H, x2/W, y2/H, area/(W·H)] in original pixels. The region mask is 1 for the IMG
token and the real boxes, 0 for padding.

Two IMG means exist in vilbert-multi-task. Downstream tasks use `visual_input`: the mean over *all* stored
boxes, computed before truncation. Pretraining uses `masked_image_mean`, the vilbert-multi-task variant: the sum
of the (partly zeroed) region features divided by the number of regions that overlap no masked region with
IoU > 0.4.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import get_worker_info

IMG_LOCATION = np.array([0.0, 0.0, 1.0, 1.0, 1.0], dtype=np.float32)


@dataclass
class VisualInput:
    """One image's visual input, unpadded: `R' = 1 + min(K, max_regions - 1)` rows."""

    features: np.ndarray  # [R', D] float16 or float32 (as read), IMG first
    locations: np.ndarray  # [R', 5] float32
    num_boxes: int  # boxes kept after the IMG token (R' - 1)


def box_locations(boxes: np.ndarray, image_hw: Sequence[int]) -> np.ndarray:
    """5-d locations [x1/W, y1/H, x2/W, y2/H, area/(W·H)] of pixel boxes `[K, 4]` → `[K, 5]` float32."""
    height, width = float(image_hw[0]), float(image_hw[1])
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / (width * height)
    scaled = boxes / np.array([width, height, width, height], dtype=np.float32)
    return np.concatenate([scaled, area[:, None]], axis=1).astype(np.float32)


def build_visual_input(
    features: np.ndarray,
    boxes: np.ndarray,
    image_hw: Sequence[int],
    max_regions: int,
    image_feature: np.ndarray | None = None,
) -> VisualInput:
    """IMG token + the first `max_regions - 1` boxes. `image_feature` defaults to the mean of all `features`.

    Features keep their dtype: float16 as stored (half the bytes through DataLoader workers; the model casts them
    on the device), float32 otherwise. The IMG mean is computed in float32 and takes the features' dtype."""
    if max_regions < 1:
        raise ValueError(f"max_regions must be >= 1 (the IMG token), got {max_regions}")
    features = np.asarray(features)  # [K, D]
    if features.dtype != np.float16:
        features = features.astype(np.float32, copy=False)
    if image_feature is None:  # torch converts float16 about 8x faster than numpy
        image_feature = torch.from_numpy(features).mean(0, dtype=torch.float32).numpy() if len(features) else \
            np.zeros(features.shape[1], np.float32)
    keep = min(len(features), max_regions - 1)
    rows = np.empty((keep + 1, features.shape[1]), dtype=features.dtype)
    rows[0] = image_feature
    rows[1:] = features[:keep]
    return VisualInput(
        features=rows,
        locations=np.concatenate([IMG_LOCATION[None], box_locations(boxes[:keep], image_hw)], axis=0),
        num_boxes=keep,
    )


def visual_input(regions, max_regions: int) -> VisualInput:
    """The downstream visual input of a `features.store.Regions` (IMG mean over every stored box)."""
    return build_visual_input(regions.features, regions.boxes, regions.image_hw, max_regions)


def region_boxes(boxes: np.ndarray, image_hw: Sequence[int]) -> torch.Tensor:
    """Pixel boxes of the visual input's rows [1 + K, 4]: the whole image for the IMG token, then the kept boxes."""
    height, width = image_hw
    whole = torch.tensor([[0.0, 0.0, float(width), float(height)]])
    return torch.cat([whole, torch.as_tensor(np.asarray(boxes), dtype=torch.float32).reshape(-1, 4)])


def iou_matrix(boxes: np.ndarray, others: np.ndarray | None = None) -> np.ndarray:
    """IoU of pixel boxes `[K, 4]` against `others` `[M, 4]` (default: `boxes` themselves) → `[K, M]`."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    others = boxes if others is None else np.asarray(others, dtype=np.float64).reshape(-1, 4)

    def area(b: np.ndarray) -> np.ndarray:
        return (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])

    lt = np.maximum(boxes[:, None, :2], others[None, :, :2])
    rb = np.minimum(boxes[:, None, 2:], others[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    union = area(boxes)[:, None] + area(others)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def masked_image_mean(
    masked_features: np.ndarray, boxes: np.ndarray, selected: np.ndarray, iou_threshold: float = 0.4
) -> np.ndarray:
    """The pretraining IMG feature (vilbert-multi-task): sum of the masked features / regions clear of masking.

    `masked_features` `[K, D]` already has the zeroed regions; `selected` `[K]` bool marks the regions chosen
    for masked-region modelling. A region is not counted if its IoU with any selected region exceeds the
    threshold (a selected region overlaps itself); the count is clamped to at least 1.
    """
    selected = np.asarray(selected, dtype=bool)
    if selected.any():
        overlapping = (iou_matrix(boxes)[:, selected] > iou_threshold).any(axis=1)  # [K]
        count = max(int((~overlapping).sum()), 1)
    else:
        count = max(len(masked_features), 1)
    total = torch.from_numpy(np.asarray(masked_features)).sum(0, dtype=torch.float32).numpy()  # float16 via torch
    return (total / count).astype(np.float32)


def collate_visual(inputs: Sequence[VisualInput], pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Pad a list of visual inputs into `region_features [B, R, D]`, `region_locations [B, R, 5]`,
    `region_mask [B, R]` (int64). R is `pad_to` when given (fixed shapes for compiled models), else the longest."""
    lengths = [len(v.features) for v in inputs]
    length = pad_to if pad_to is not None else max(lengths)
    if max(lengths) > length:
        raise ValueError(f"a visual input has {max(lengths)} rows, more than pad_to={length}")
    dim = inputs[0].features.shape[1]
    dtype = torch.from_numpy(np.zeros(0, np.result_type(*(v.features.dtype for v in inputs)))).dtype  # float16 stays
    batch = {"region_features": batch_zeros((len(inputs), length, dim), dtype),
             "region_locations": batch_zeros((len(inputs), length, 5), torch.float32),
             "region_mask": batch_zeros((len(inputs), length), torch.int64)}
    features, locations, mask = (batch[key].numpy() for key in batch)
    for i, v in enumerate(inputs):
        n = len(v.features)
        features[i, :n] = v.features
        locations[i, :n] = v.locations
        mask[i, :n] = 1
    return batch


def batch_zeros(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed tensor for a collated batch: in shared memory inside a DataLoader worker, so that the batch is
    written once, where the training process reads it (a shared tensor crosses processes as a handle)."""
    if get_worker_info() is None:
        return torch.zeros(shape, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, tuple(shape)).zero_()


def visual_rows(store, items: Sequence[Sequence[str]], max_regions: int) -> np.ndarray:
    """`[N]` visual rows (IMG token included) of each item, the most over the item's images: what a collate
    pads to, for length grouping. `store` is a `features.store.FeatureStore`; `items` its keys per item."""
    boxes = {key: store.num_boxes(key) for key in {key for keys in items for key in keys}}
    return np.array([1 + min(max(boxes[key] for key in keys), max_regions - 1) for keys in items], dtype=np.int64)
