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

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

IMG_LOCATION = np.array([0.0, 0.0, 1.0, 1.0, 1.0], dtype=np.float32)


@dataclass
class VisualInput:
    """One image's visual input, unpadded: `R' = 1 + min(K, max_regions - 1)` rows."""

    features: np.ndarray  # [R', D] float32, IMG first
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
    """IMG token + the first `max_regions - 1` boxes. `image_feature` defaults to the mean of all `features`."""
    if max_regions < 1:
        raise ValueError(f"max_regions must be >= 1 (the IMG token), got {max_regions}")
    features = np.asarray(features, dtype=np.float32)  # [K, D]
    if image_feature is None:
        image_feature = features.mean(axis=0) if len(features) else np.zeros(features.shape[1], np.float32)
    keep = min(len(features), max_regions - 1)
    return VisualInput(
        features=np.concatenate([image_feature[None].astype(np.float32), features[:keep]], axis=0),
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


def iou_matrix(boxes: np.ndarray) -> np.ndarray:
    """Pairwise IoU of pixel boxes `[K, 4]` → `[K, K]`."""
    boxes = np.asarray(boxes, dtype=np.float64)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    lt = np.maximum(boxes[:, None, :2], boxes[None, :, :2])
    rb = np.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    union = area[:, None] + area[None, :] - inter
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
    return (np.asarray(masked_features, dtype=np.float32).sum(axis=0) / count).astype(np.float32)


def collate_visual(inputs: Sequence[VisualInput], pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Pad a list of visual inputs into `region_features [B, R, D]`, `region_locations [B, R, 5]`,
    `region_mask [B, R]` (int64). R is `pad_to` when given (fixed shapes for compiled models), else the longest."""
    lengths = [len(v.features) for v in inputs]
    length = pad_to if pad_to is not None else max(lengths)
    if max(lengths) > length:
        raise ValueError(f"a visual input has {max(lengths)} rows, more than pad_to={length}")
    dim = inputs[0].features.shape[1]
    features = np.zeros((len(inputs), length, dim), dtype=np.float32)
    locations = np.zeros((len(inputs), length, 5), dtype=np.float32)
    mask = np.zeros((len(inputs), length), dtype=np.int64)
    for i, v in enumerate(inputs):
        n = len(v.features)
        features[i, :n] = v.features
        locations[i, :n] = v.locations
        mask[i, :n] = 1
    return {
        "region_features": torch.from_numpy(features),
        "region_locations": torch.from_numpy(locations),
        "region_mask": torch.from_numpy(mask),
    }
