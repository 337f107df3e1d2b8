"""What every region detector provides, so the extraction pipeline can drive any of them.

A detector is an `nn.Module` with two halves: `prepare` runs in DataLoader workers (decode-side work on one image:
resize, colour order, normalisation), and `forward` runs on the device over a padded batch. Boxes go in and come out
in original-image pixels (x1, y1, x2, y2); the detector owns every scaling in between.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass
class PreparedImage:
    """One image ready for the network: `pixels` [3, h, w] float32, resized by `scale` from `image_hw`."""

    pixels: torch.Tensor
    scale: float
    image_hw: tuple[int, int]


@dataclass
class DetectedRegions:
    """Regions of one image. `boxes` [K, 4] x1 y1 x2 y2 in original pixels; `features` [K, D]."""

    features: torch.Tensor
    boxes: torch.Tensor
    cls_prob: torch.Tensor | None = None  # [K, C], background at index 0
    objects_id: torch.Tensor | None = None  # [K] int
    objects_conf: torch.Tensor | None = None  # [K] float
    attrs_id: torch.Tensor | None = None  # [K] int
    attrs_conf: torch.Tensor | None = None  # [K] float


class RegionDetector(nn.Module):
    """Base class: subclasses set `name`, `feature_dim`, `cls_prob_dim` and implement the three methods."""

    name: str = ""
    feature_dim: int = 0
    cls_prob_dim: int | None = None
    size_divisible: int = 1  # a batch's padded height and width are multiples of this (FPN strides)
    weights_hint: str | None = None  # where the real weights come from, for the "random weights" message

    def prepare(self, image: np.ndarray) -> PreparedImage:
        """Turn one RGB uint8 image [H, W, 3] into network input (runs in a DataLoader worker)."""
        raise NotImplementedError

    def input_scale(self, height: int, width: int) -> float:
        """The factor `prepare` resizes an image of this size by (1.0: used as given). Extraction decodes large
        images only as large as needed (twice the detector's input size), so their pixels never fill memory."""
        return 1.0

    def forward(
        self,
        pixels: torch.Tensor,  # [N, 3, Hmax, Wmax], zero-padded at the bottom/right
        images: list[PreparedImage],
        boxes: list[torch.Tensor] | None = None,  # given boxes per image, [K_i, 4] original pixels
    ) -> list[DetectedRegions]:
        raise NotImplementedError

    def extractor_info(self) -> dict:
        """JSON-able description stored in the feature file (detector, weights sha256, selection rule, ...)."""
        raise NotImplementedError


def pad_batch(images: list[PreparedImage], size_divisible: int = 1) -> torch.Tensor:
    """Stack prepared images into one zero-padded batch [N, 3, H, W]."""
    h = max(im.pixels.shape[1] for im in images)
    w = max(im.pixels.shape[2] for im in images)
    if size_divisible > 1:
        h = -(-h // size_divisible) * size_divisible
        w = -(-w // size_divisible) * size_divisible
    batch = images[0].pixels.new_zeros((len(images), 3, h, w))
    for i, im in enumerate(images):
        batch[i, :, : im.pixels.shape[1], : im.pixels.shape[2]] = im.pixels
    return batch
