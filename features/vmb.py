"""The VMB detector (vqa-maskrcnn-benchmark): ResNeXt-152 32x8d FPN Faster R-CNN on Visual Genome, 1601 classes.

ViLBERT 12-in-1 (`multi_task_model.bin`) and vilbert-multi-task's `pretrained_model.bin` were trained on its region
features. Built from torch and torchvision ops only. Reads top to bottom like the network: frozen-BN ResNeXt body,
FPN with P6 by max-pool, the single-conv RPN and the fork's proposal decoding (legacy "+1" box convention), FPN
level assignment and RoIAlign, the fc6/fc7 box head and 1601-way classifier, then `VMBDetector`, which adds the
extraction script's preprocessing and box selection behind the `RegionDetector` interface.

Module names follow the released `detectron_model.pth` exactly (`backbone.body.stem.conv1.weight`,
`backbone.fpn.fpn_inner1.weight`, `rpn.anchor_generator.cell_anchors.0`, `roi_heads.box.feature_extractor.fc6.weight`,
...), so its state dict loads without renaming (`features.vmb_checkpoint`). What was checked against the
original and what was not: docs/features.md.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align
from torchvision.ops.misc import FrozenBatchNorm2d

from features.checksum import sha256_file
from features.detector import DetectedRegions, PreparedImage, RegionDetector
from features.errors import FeaturesError
from features.selection import VMB_RULE, SelectionRule, grouped_nms, rule_from_name, select_regions
from features.vmb_checkpoint import config_from_yaml, load_vmb_weights

logger = logging.getLogger(__name__)

# The extraction script's hard-coded preprocessing (BGR means, no std).
VMB_PIXEL_MEAN_BGR = (102.9801, 115.9465, 122.7717)
# The fork's clamp on predicted log-size deltas.
DELTA_CLAMP = math.log(1000.0 / 16)
# The fork's FPN level mapper: a box of side 224 goes to P4, levels clamped to P2..P5.
CANONICAL_SCALE = 224
CANONICAL_LEVEL = 4
LEVEL_EPS = 1e-6
# Where the two published files live (vilbert-multi-task README).
PUBLISHED_WEIGHTS = "https://dl.fbaipublicfiles.com/vilbert-multi-task/detectron_model.pth"
PUBLISHED_CONFIG = "https://dl.fbaipublicfiles.com/vilbert-multi-task/detectron_config.yaml"
CLIP_MODES = ("image", "batch")


@dataclass
class VMBConfig:
    """The network and inference settings; defaults are the released X-152 model's."""

    blocks: tuple[int, ...] = (3, 8, 36, 3)  # bottleneck blocks in layer1..layer4
    num_groups: int = 32
    width_per_group: int = 8  # layer1's bottleneck width = num_groups * width_per_group, doubling per stage
    stem_channels: int = 64
    res2_channels: int = 256  # layer1's output width, doubling per stage
    stride_in_1x1: bool = False  # the stride of a stage's first block on its 1x1 conv (True) or 3x3 conv (False)
    fpn_channels: int = 512
    mlp_dim: int = 2048
    num_classes: int = 1600  # foreground; the classifier has num_classes + 1 outputs, background first
    anchor_sizes: tuple[float, ...] = (32, 64, 128, 256, 512)  # one per level P2..P6 (when no checkpoint anchors)
    anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)  # height / width
    anchor_strides: tuple[int, ...] = (4, 8, 16, 32, 64)
    rpn_pre_nms_top_n: int = 6000  # per level
    rpn_post_nms_top_n: int = 1000  # per level, after NMS
    rpn_fpn_post_nms_top_n: int = 2000  # per image, over all levels
    rpn_nms_threshold: float = 0.7
    rpn_min_size: float = 0.0
    pooler_resolution: int = 7
    pooler_scales: tuple[float, ...] = (0.25, 0.125, 0.0625, 0.03125)  # P2..P5
    pooler_sampling_ratio: int = 2
    pixel_mean_bgr: tuple[float, float, float] = VMB_PIXEL_MEAN_BGR
    min_size: int = 800
    max_size: int = 1333
    size_divisible: int = 32
    clip_to: str = "image"  # proposals clipped to each image's own padded size, or to the batch's (the fork's quirk)

    def __post_init__(self):
        if len(self.blocks) != 4:
            raise ValueError(f"blocks must give 4 stages, got {self.blocks}")
        if len(self.anchor_strides) != 5 or len(self.pooler_scales) != 4:
            raise ValueError("the FPN detector needs 5 anchor strides (P2..P6) and 4 pooler scales (P2..P5)")
        if self.clip_to not in CLIP_MODES:
            raise ValueError(f"clip_to must be one of {', '.join(CLIP_MODES)}, got {self.clip_to!r}")

    @property
    def stage_channels(self) -> list[int]:
        return [self.res2_channels * 2**i for i in range(4)]

    @property
    def num_anchors(self) -> int:
        return len(self.anchor_ratios)

    @classmethod
    def tiny(cls, **overrides) -> VMBConfig:
        """The same structure, a few hundred thousand parameters: for tests."""
        values = dict(blocks=(1, 1, 1, 1), num_groups=2, width_per_group=4, stem_channels=8, res2_channels=32,
                      fpn_channels=16, mlp_dim=32, num_classes=6, anchor_sizes=(16, 32, 64, 128, 256),
                      rpn_pre_nms_top_n=300, rpn_post_nms_top_n=60, rpn_fpn_post_nms_top_n=120, min_size=160,
                      max_size=256)
        values.update(overrides)
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------------
# Body: ResNeXt with frozen BatchNorm (eps 0, as the fork computes it)


def frozen_bn(channels: int) -> FrozenBatchNorm2d:
    return FrozenBatchNorm2d(channels, eps=0.0)


class Bottleneck(nn.Module):
    """1x1 -> grouped 3x3 -> 1x1, frozen BN after each, projection shortcut (`downsample`) where shapes change."""

    def __init__(self, in_channels: int, width: int, out_channels: int, *, groups: int, stride: int,
                 stride_in_1x1: bool):
        super().__init__()
        if in_channels != out_channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                            frozen_bn(out_channels))
        else:
            self.downsample = None
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = nn.Conv2d(in_channels, width, 1, stride=stride_1x1, bias=False)
        self.bn1 = frozen_bn(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride_3x3, padding=1, groups=groups, bias=False)
        self.bn2 = frozen_bn(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = frozen_bn(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu_(self.bn1(self.conv1(x)))
        out = F.relu_(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = self.downsample(x) if self.downsample is not None else x
        return F.relu_(out + identity)


class Stem(nn.Module):
    """7x7/2 conv, frozen BN, ReLU, 3x3/2 max-pool with padding 1 (stride 4 overall)."""

    def __init__(self, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, out_channels, 7, stride=2, padding=3, bias=False)
        self.bn1 = frozen_bn(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.relu_(self.bn1(self.conv1(x))), kernel_size=3, stride=2, padding=1)


class ResNeXtBody(nn.Module):
    """Stem + layer1..layer4; returns C2..C5 (strides 4, 8, 16, 32)."""

    def __init__(self, config: VMBConfig):
        super().__init__()
        self.stem = Stem(config.stem_channels)
        in_channels = config.stem_channels
        width = config.num_groups * config.width_per_group
        for stage, (num_blocks, out_channels) in enumerate(zip(config.blocks, config.stage_channels, strict=True)):
            blocks = []
            for i in range(num_blocks):
                blocks.append(Bottleneck(in_channels if i == 0 else out_channels, width * 2**stage, out_channels,
                                         groups=config.num_groups, stride=2 if stage > 0 and i == 0 else 1,
                                         stride_in_1x1=config.stride_in_1x1))
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
            in_channels = out_channels

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        outputs = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            outputs.append(x)
        return outputs  # C2..C5


class FPN(nn.Module):
    """Lateral 1x1 + top-down nearest x2 + 3x3 output convs (`fpn_innerK`, `fpn_layerK`); P6 = max-pool(P5, 1, 2)."""

    def __init__(self, in_channels: list[int], out_channels: int):
        super().__init__()
        for k, channels in enumerate(in_channels, start=1):
            self.add_module(f"fpn_inner{k}", nn.Conv2d(channels, out_channels, 1))
            self.add_module(f"fpn_layer{k}", nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.num_levels = len(in_channels)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        inner = getattr(self, f"fpn_inner{self.num_levels}")(features[-1])
        outputs = [getattr(self, f"fpn_layer{self.num_levels}")(inner)]
        for k in range(self.num_levels - 1, 0, -1):
            top_down = F.interpolate(inner, scale_factor=2, mode="nearest")
            inner = getattr(self, f"fpn_inner{k}")(features[k - 1]) + top_down
            outputs.insert(0, getattr(self, f"fpn_layer{k}")(inner))
        outputs.append(F.max_pool2d(outputs[-1], kernel_size=1, stride=2))
        return outputs  # P2..P6


class Backbone(nn.Module):
    def __init__(self, config: VMBConfig):
        super().__init__()
        self.body = ResNeXtBody(config)
        self.fpn = FPN(config.stage_channels, config.fpn_channels)

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        return self.fpn(self.body(pixels))


# ---------------------------------------------------------------------------------------------------------------
# Anchors and the legacy box convention (width = x2 - x1 + 1)


def fork_cell_anchors(stride: int, size: float, ratios: tuple[float, ...]) -> torch.Tensor:
    """Detectron's cell anchors for one level: centred at ((stride - 1) / 2, ...), ratio widths rounded first,
    then scaled to `size`, "+1" widths; one row per ratio (x1, y1, x2, y2). [A, 4]"""
    centre = (stride - 1) / 2
    area = float(stride * stride)
    rows = []
    for ratio in ratios:
        w = np.round(np.sqrt(area / ratio))
        h = np.round(w * ratio)
        w, h = w * size / stride, h * size / stride
        rows.append([centre - 0.5 * (w - 1), centre - 0.5 * (h - 1), centre + 0.5 * (w - 1), centre + 0.5 * (h - 1)])
    return torch.tensor(rows, dtype=torch.float32)


def grid_anchors(cell: torch.Tensor, stride: int, height: int, width: int) -> torch.Tensor:
    """All anchors of an H x W level: cell anchors shifted by (x, y) * stride, location-major. [H*W*A, 4]"""
    shift_x = torch.arange(width, device=cell.device, dtype=torch.float32) * stride
    shift_y = torch.arange(height, device=cell.device, dtype=torch.float32) * stride
    sy, sx = torch.meshgrid(shift_y, shift_x, indexing="ij")
    shifts = torch.stack([sx, sy, sx, sy], dim=-1).reshape(-1, 1, 4)  # [H*W, 1, 4]
    return (shifts + cell.float().view(1, -1, 4)).reshape(-1, 4)


def decode_legacy(deltas: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """The fork's RPN decoding (weights 1, 1, 1, 1): "+1" widths in, x2 = cx + w / 2 - 1 out. [..., 4]"""
    widths = boxes[..., 2] - boxes[..., 0] + 1
    heights = boxes[..., 3] - boxes[..., 1] + 1
    ctr_x = boxes[..., 0] + 0.5 * widths
    ctr_y = boxes[..., 1] + 0.5 * heights
    dw = deltas[..., 2].clamp(max=DELTA_CLAMP)
    dh = deltas[..., 3].clamp(max=DELTA_CLAMP)
    pred_ctr_x, pred_ctr_y = deltas[..., 0] * widths + ctr_x, deltas[..., 1] * heights + ctr_y
    pred_w, pred_h = torch.exp(dw) * widths, torch.exp(dh) * heights
    return torch.stack([pred_ctr_x - 0.5 * pred_w, pred_ctr_y - 0.5 * pred_h,
                        pred_ctr_x + 0.5 * pred_w - 1, pred_ctr_y + 0.5 * pred_h - 1], dim=-1)


def clip_legacy(boxes: torch.Tensor, height: int | torch.Tensor, width: int | torch.Tensor) -> torch.Tensor:
    """Clamp to [0, W - 1] x [0, H - 1] (nothing removed). [..., 4]; a tensor height / width broadcasts against
    boxes[..., 0] (e.g. [N, 1] for boxes [N, k, 4])."""
    width = torch.as_tensor(width, dtype=boxes.dtype, device=boxes.device)[..., None]
    height = torch.as_tensor(height, dtype=boxes.dtype, device=boxes.device)[..., None]
    x = boxes[..., 0::2].clamp(min=0).minimum(width - 1)
    y = boxes[..., 1::2].clamp(min=0).minimum(height - 1)
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)


def plus_one(boxes: torch.Tensor) -> torch.Tensor:
    """x1 y1 x2+1 y2+1: continuous IoU on these equals the legacy "+1" IoU on the originals (the fork's NMS)."""
    return boxes + boxes.new_tensor([0.0, 0.0, 1.0, 1.0])


def fpn_levels(boxes: torch.Tensor, num_levels: int = 4) -> torch.Tensor:
    """Pooler level index (0 = P2) of each box [R, 4]: floor(4 + log2(sqrt("+1" area) / 224 + 1e-6)), clamped."""
    areas = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    levels = torch.floor(CANONICAL_LEVEL + torch.log2(areas.sqrt() / CANONICAL_SCALE + LEVEL_EPS))
    return (levels.clamp(min=2, max=1 + num_levels) - 2).long()


# ---------------------------------------------------------------------------------------------------------------
# RPN


class RPNHead(nn.Module):
    """One shared 3x3 conv + ReLU, then A objectness logits and 4A deltas (anchor-major) per location."""

    def __init__(self, channels: int, num_anchors: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.cls_logits = nn.Conv2d(channels, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(channels, num_anchors * 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = F.relu(self.conv(x))
        return self.cls_logits(t), self.bbox_pred(t)  # [N, A, H, W], [N, 4A, H, W]


class AnchorGenerator(nn.Module):
    """Holds one [A, 4] cell-anchor buffer per level (`cell_anchors.0` ..), as the checkpoint does."""

    def __init__(self, config: VMBConfig):
        super().__init__()
        self.cell_anchors = nn.Module()
        for k, (stride, size) in enumerate(zip(config.anchor_strides, config.anchor_sizes, strict=True)):
            self.cell_anchors.register_buffer(str(k), fork_cell_anchors(stride, size, config.anchor_ratios))
        self.strides = tuple(config.anchor_strides)

    def level_anchors(self, level: int, height: int, width: int) -> torch.Tensor:
        return grid_anchors(getattr(self.cell_anchors, str(level)), self.strides[level], height, width)


def level_candidates(logits: torch.Tensor, deltas: torch.Tensor, anchors: torch.Tensor, clip_hw: torch.Tensor,
                     pre_nms_top_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One level, every image: the top `pre_nms_top_n` anchors by objectness, decoded and clipped.

    logits [N, H*W*A], deltas [N, H*W*A, 4], anchors [H*W*A, 4] (location-major), clip_hw [N, 2].
    Returns boxes [N, k, 4] and logits [N, k], best first.
    """
    top_logits, top = logits.topk(min(pre_nms_top_n, logits.shape[1]), dim=1, sorted=True)  # [N, k]
    top_deltas = deltas.gather(1, top[..., None].expand(-1, -1, 4))  # [N, k, 4]
    boxes = decode_legacy(top_deltas, anchors[top])
    return clip_legacy(boxes, clip_hw[:, 0, None], clip_hw[:, 1, None]), top_logits


def nms_and_top_n(boxes: torch.Tensor, logits: torch.Tensor, level: torch.Tensor,
                  config: VMBConfig) -> list[torch.Tensor]:
    """The fork's selection after decoding: per (image, level) drop small boxes, NMS ("+1" IoU), keep the top
    `rpn_post_nms_top_n`; then per image the top `rpn_fpn_post_nms_top_n` over all levels, best first.

    boxes [N, M, 4], logits [N, M] (each level's candidates side by side), level [M]. One grouped NMS for all.
    """
    num_images, m = logits.shape
    flat_boxes, flat_logits = boxes.reshape(-1, 4), logits.reshape(-1)
    image = torch.arange(num_images, device=boxes.device).repeat_interleave(m)  # [N*M]
    group = image * len(config.anchor_strides) + level.repeat(num_images)
    candidates = torch.arange(len(flat_logits), device=boxes.device)
    if config.rpn_min_size > 0:
        sides = flat_boxes[:, 2:] - flat_boxes[:, :2] + 1
        candidates = (sides >= config.rpn_min_size).all(dim=1).nonzero(as_tuple=True)[0]
    kept = candidates[grouped_nms(plus_one(flat_boxes[candidates]), flat_logits[candidates], group[candidates],
                                  config.rpn_nms_threshold)]
    kept = kept[torch.sort(flat_logits[kept], descending=True, stable=True).indices]
    kept = kept[_rank_within(group[kept], num_images * len(config.anchor_strides)) < config.rpn_post_nms_top_n]
    kept = kept[_rank_within(image[kept], num_images) < config.rpn_fpn_post_nms_top_n]
    kept = kept[torch.sort(image[kept], stable=True).indices]  # grouped by image, best first within each
    counts = torch.bincount(image[kept], minlength=num_images).tolist()
    return list(flat_boxes[kept].split(counts))


def _rank_within(group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Each element's position among the earlier elements of its group. Reorders nothing: returned as given.
    group [K] -> rank [K]."""
    order = torch.sort(group, stable=True).indices
    counts = torch.bincount(group, minlength=num_groups)
    starts = counts.cumsum(0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=group.device) - starts[group[order]]
    return rank


class RegionProposalNetwork(nn.Module):
    """The fork's test-time RPN: per level top-N / NMS / top-N, then the image's top-N over all levels."""

    def __init__(self, config: VMBConfig):
        super().__init__()
        self.config = config
        self.anchor_generator = AnchorGenerator(config)
        self.head = RPNHead(config.fpn_channels, config.num_anchors)

    def forward(self, levels: list[torch.Tensor], clip_hw: list[tuple[int, int]]) -> list[torch.Tensor]:
        """levels P2..P6 [N, C, h, w]; clip_hw the (H, W) each image's proposals are clipped to. Boxes per image,
        sorted by objectness, in padded-input pixels. [P_i, 4] each."""
        num_images = levels[0].shape[0]
        bounds = torch.tensor(clip_hw, dtype=torch.float32, device=levels[0].device)  # [N, 2]
        boxes, logits, level_of = [], [], []
        for level, feature in enumerate(levels):
            objectness, deltas = self.head(feature)
            _, a, h, w = objectness.shape
            objectness = objectness.permute(0, 2, 3, 1).reshape(num_images, -1).float()  # [N, H*W*A]
            deltas = deltas.view(num_images, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(num_images, -1, 4).float()
            anchors = self.anchor_generator.level_anchors(level, h, w)
            level_boxes, level_logits = level_candidates(objectness, deltas, anchors, bounds,
                                                         self.config.rpn_pre_nms_top_n)
            boxes.append(level_boxes)
            logits.append(level_logits)
            level_of.append(torch.full((level_logits.shape[1],), level, device=bounds.device))
        return nms_and_top_n(torch.cat(boxes, dim=1), torch.cat(logits, dim=1), torch.cat(level_of), self.config)


# ---------------------------------------------------------------------------------------------------------------
# Box head


class FeatureExtractor(nn.Module):
    """FPN2MLPFeatureExtractor: RoIAlign on each box's level, then fc6 + ReLU, fc7 + ReLU."""

    def __init__(self, config: VMBConfig):
        super().__init__()
        self.config = config
        size = config.pooler_resolution
        self.fc6 = nn.Linear(config.fpn_channels * size * size, config.mlp_dim)
        self.fc7 = nn.Linear(config.mlp_dim, config.mlp_dim)

    def pool(self, levels: list[torch.Tensor], rois: list[torch.Tensor]) -> torch.Tensor:
        """Legacy RoIAlign (not aligned, fixed sampling ratio) per FPN level. rois per image, padded-input pixels;
        returns [R, C, S, S] in the order of the concatenated rois."""
        c = self.config
        boxes = torch.cat(rois).float()  # [R, 4]
        batch_index = torch.cat([torch.full((len(r),), i, dtype=torch.float32, device=boxes.device)
                                 for i, r in enumerate(rois)])
        rois_5 = torch.cat([batch_index[:, None], boxes], dim=1)  # [R, 5]
        assigned = fpn_levels(boxes, len(c.pooler_scales))
        pooled = boxes.new_zeros((len(boxes), c.fpn_channels, c.pooler_resolution, c.pooler_resolution))
        for level, scale in enumerate(c.pooler_scales):
            index = (assigned == level).nonzero(as_tuple=True)[0]
            if len(index):
                pooled[index] = roi_align(levels[level].float(), rois_5[index], c.pooler_resolution, scale,
                                          c.pooler_sampling_ratio, aligned=False)
        return pooled

    def forward(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fc6 = F.relu(self.fc6(pooled.to(self.fc6.weight.dtype).flatten(1)))  # [R, D]
        return fc6, F.relu(self.fc7(fc6))


class Predictor(nn.Module):
    """FPNPredictor: class logits (background first) and class-specific box deltas (unused by extraction)."""

    def __init__(self, config: VMBConfig):
        super().__init__()
        self.cls_score = nn.Linear(config.mlp_dim, config.num_classes + 1)
        self.bbox_pred = nn.Linear(config.mlp_dim, (config.num_classes + 1) * 4)

    def forward(self, fc7: torch.Tensor) -> torch.Tensor:
        return self.cls_score(fc7)  # [R, K+1]


class BoxHead(nn.Module):
    def __init__(self, config: VMBConfig):
        super().__init__()
        self.feature_extractor = FeatureExtractor(config)
        self.predictor = Predictor(config)


class RoIHeads(nn.Module):
    def __init__(self, config: VMBConfig):
        super().__init__()
        self.box = BoxHead(config)


class VMBModel(nn.Module):
    """The network. `forward` returns the proposals (or given rois), fc6 (after ReLU) and class logits."""

    def __init__(self, config: VMBConfig):
        super().__init__()
        self.config = config
        self.backbone = Backbone(config)
        self.rpn = RegionProposalNetwork(config)
        self.roi_heads = RoIHeads(config)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A sane random init (MSRA convs, small RPN and predictor stds) so that random models propose boxes."""
        for m in self.backbone.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in (self.rpn.head.conv, self.rpn.head.cls_logits, self.rpn.head.bbox_pred):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)
        predictor = self.roi_heads.box.predictor
        for layer, std in ((predictor.cls_score, 0.01), (predictor.bbox_pred, 0.001)):
            nn.init.normal_(layer.weight, std=std)
            nn.init.zeros_(layer.bias)

    def forward(self, pixels: torch.Tensor, clip_hw: list[tuple[int, int]],
                rois: list[torch.Tensor] | None = None) -> dict:
        """pixels [N, 3, H, W] (padded to a multiple of 32); clip_hw per image for the RPN; `rois` per image
        (padded-input pixels) skip the RPN. Returns rois, fc6 [R, D] and cls_logits [R, K+1], R = sum of rois."""
        levels = self.backbone(pixels)  # P2..P6
        if rois is None:
            rois = self.rpn(levels, clip_hw)
        rois = [r.float() for r in rois]
        extractor = self.roi_heads.box.feature_extractor
        fc6, fc7 = extractor(extractor.pool(levels[:4], rois))
        return {"rois": rois, "fc6": fc6, "cls_logits": self.roi_heads.box.predictor(fc7)}


# ---------------------------------------------------------------------------------------------------------------
# The detector


def resize_scale(height: int, width: int, min_size: int, max_size: int) -> float:
    """The script's rule: shorter side to `min_size`, unless the rounded longer side would pass `max_size`."""
    scale = min_size / min(height, width)
    if round(scale * max(height, width)) > max_size:
        scale = max_size / max(height, width)
    return scale


def resize_like_cv2(pixels: torch.Tensor, scale: float) -> torch.Tensor:
    """`cv2.resize(fx=fy=scale, INTER_LINEAR)` on float [3, H, W]: output size rounded, and source coordinates
    (x + 0.5) / scale - 0.5 from the given scale, not from the rounded size ratio."""
    h, w = pixels.shape[1:]
    size = [max(1, round(h * scale)), max(1, round(w * scale))]
    if size == [h, w] and scale == 1.0:
        return pixels
    return torch.ops.aten.upsample_bilinear2d(pixels[None], size, False, scale, scale)[0]


def select_proposals(boxes: list[torch.Tensor], probs: list[torch.Tensor], rule: SelectionRule) -> list[torch.Tensor]:
    """Kept proposal indices per image under `rule`, its NMS on "+1" IoU as the fork's. boxes [P_i, 4] in original
    pixels (the script's NMS runs there, and "+1" IoU is not scale-invariant); probs [P_i, K+1]."""
    return [keep for keep, _ in select_regions([plus_one(b) for b in boxes], probs, rule)]


class VMBDetector(RegionDetector):
    """`VMBModel` + vilbert-multi-task's `extract_features.py` preprocessing and selection.

    Per image: the proposals' fc6 features (after ReLU) and softmax class probabilities; per-class NMS 0.5 ("+1"
    IoU) on the proposals in original pixels; the top 100 by best class score (`features.selection` rule `vmb`).
    Stored boxes are the proposals in original pixels. Given boxes skip the RPN (`extract_features_from_gt.py`).
    """

    name = "vmb-x152-fpn"
    weights_hint = (f"detectron_model.pth ({PUBLISHED_WEIGHTS}) and its {PUBLISHED_CONFIG} with "
                    "--option config_file=FILE")

    def __init__(self, config: VMBConfig | None = None, *, selection: SelectionRule = VMB_RULE,
                 weights_info: dict | None = None):
        super().__init__()
        self.config = config or VMBConfig()
        self.model = VMBModel(self.config)
        self.selection = selection
        self.weights_info = weights_info
        self.feature_dim = self.config.mlp_dim
        self.cls_prob_dim = self.config.num_classes + 1

    @property
    def size_divisible(self) -> int:
        return self.config.size_divisible

    def input_scale(self, height: int, width: int) -> float:
        return resize_scale(height, width, self.config.min_size, self.config.max_size)

    def prepare(self, image: np.ndarray) -> PreparedImage:
        """RGB uint8 [H, W, 3] -> BGR float 0-255 minus the means, resized as `cv2.resize` does (script order)."""
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
        h, w = image.shape[:2]
        pixels = torch.from_numpy(np.ascontiguousarray(image[:, :, ::-1])).permute(2, 0, 1).float()  # BGR
        pixels = pixels - torch.tensor(self.config.pixel_mean_bgr).view(3, 1, 1)
        scale = resize_scale(h, w, self.config.min_size, self.config.max_size)
        return PreparedImage(pixels=resize_like_cv2(pixels, scale), scale=scale, image_hw=(h, w))

    def clip_sizes(self, pixels: torch.Tensor, images: list[PreparedImage]) -> list[tuple[int, int]]:
        """(H, W) each image's proposals are clipped to: its own size rounded up to `size_divisible` (what a batch
        of one gives), or with `clip_to="batch"` the padded batch's (the fork's batches)."""
        if self.config.clip_to == "batch":
            return [tuple(pixels.shape[-2:])] * len(images)
        d = self.config.size_divisible
        return [(-(-im.pixels.shape[1] // d) * d, -(-im.pixels.shape[2] // d) * d) for im in images]

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor, images: list[PreparedImage],
                boxes: list[torch.Tensor] | None = None) -> list[DetectedRegions]:
        if boxes is not None:
            if len(boxes) != len(images):
                raise ValueError(f"got boxes for {len(boxes)} images but {len(images)} images")
            return self.regions_on_boxes(pixels, images, boxes)
        out = self.model(pixels, self.clip_sizes(pixels, images))
        counts = [len(r) for r in out["rois"]]
        if any(c == 0 for c in counts):
            logger.warning("RPN returned no proposals for %d of %d images", counts.count(0), len(images))
        probs = F.softmax(out["cls_logits"].float(), dim=1).split(counts)  # [P_i, K+1] each
        features = out["fc6"].float().split(counts)
        original = [r / im.scale for r, im in zip(out["rois"], images, strict=True)]
        keeps = select_proposals(original, list(probs), self.selection)
        # proposals are clipped to the padded size (a multiple of size_divisible), which reaches past the image:
        # the stored boxes are clipped to the image itself, after selection (which stays the reference's)
        return [_regions(features[i][keep], _inside(original[i][keep], images[i].image_hw), probs[i][keep])
                for i, keep in enumerate(keeps)]

    def regions_on_boxes(self, pixels: torch.Tensor, images: list[PreparedImage],
                         boxes: list[torch.Tensor]) -> list[DetectedRegions]:
        """Given-box mode: the RoI head on exactly `boxes` (original pixels), in their order; no RPN."""
        boxes = [b.to(device=pixels.device, dtype=torch.float32).reshape(-1, 4) for b in boxes]
        rois = [b * im.scale for b, im in zip(boxes, images, strict=True)]
        out = self.model(pixels, self.clip_sizes(pixels, images), rois)
        counts = [len(r) for r in rois]
        probs = F.softmax(out["cls_logits"].float(), dim=1).split(counts)
        features = out["fc6"].float().split(counts)
        return [_regions(features[i], b, probs[i]) for i, b in enumerate(boxes)]

    def extractor_info(self) -> dict:
        c = self.config
        return {
            "detector": self.name,
            "weights": self.weights_info or "random",
            "selection": self.selection.as_dict(),
            "box_mode": "proposal",
            "input": {"min_size": c.min_size, "max_size": c.max_size, "color": "BGR", "range": "0-255",
                      "pixel_mean": list(c.pixel_mean_bgr), "resize": "bilinear, cv2 sampling grid",
                      "size_divisible": c.size_divisible, "clip_to": c.clip_to},
            "pooling": (f"roialign-{c.pooler_resolution}x{c.pooler_resolution}-sampling{c.pooler_sampling_ratio}"
                        "-not-aligned-fpn-p2-p5"),
            "feature": "fc6 after ReLU",
            "feature_dim": c.mlp_dim,
            "num_classes": c.num_classes + 1,
            "config": c.to_dict(),
        }


def _inside(boxes: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
    """x1 y1 x2 y2 boxes [K, 4] clamped to the [0, W] x [0, H] image."""
    h, w = image_hw
    limits = boxes.new_tensor([w, h, w, h])
    return torch.minimum(boxes.clamp(min=0), limits)


def _regions(features: torch.Tensor, boxes: torch.Tensor, prob: torch.Tensor) -> DetectedRegions:
    fg_conf, fg_idx = prob[:, 1:].max(dim=1)
    return DetectedRegions(features=features, boxes=boxes, cls_prob=prob, objects_id=fg_idx + 1,
                           objects_conf=fg_conf)  # ids index cls_prob columns (1..K)


def build_vmb_x152_fpn(weights: str | None = None, *, config: VMBConfig | None = None,
                       config_file: str | None = None, preset: str = "x152",
                       selection: SelectionRule | str | None = None, **options) -> VMBDetector:
    """The registry's builder. `weights` is `detectron_model.pth`; `config_file` its `detectron_config.yaml`, whose
    RPN, anchor, pooler and body values replace the defaults. Other keyword options (strings from `--option`
    included) override one `SelectionRule` field (`max_boxes=36`) or one `VMBConfig` field (`clip_to=batch`);
    `preset="tiny"` starts from the test-sized network. Without weights the network is random."""

    rule_fields = {f.name for f in fields(SelectionRule)} - {"name"}
    config_fields = {f.name for f in fields(VMBConfig)}
    unknown = sorted(set(options) - rule_fields - config_fields)
    if unknown:
        raise FeaturesError(f"{VMBDetector.name}: unknown option(s) {', '.join(unknown)}; options are preset, "
                            f"config_file, selection, {', '.join(sorted(rule_fields | config_fields))}")
    if preset not in ("x152", "tiny"):
        raise FeaturesError(f"{VMBDetector.name}: preset must be 'x152' or 'tiny', got {preset!r}")
    rule_options = {k: v for k, v in options.items() if k in rule_fields}
    config_options = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items() if k in config_fields}
    try:
        if isinstance(selection, SelectionRule):
            rule = SelectionRule(**{**selection.as_dict(), **rule_options})
        else:
            rule = rule_from_name(selection or "vmb", **rule_options)
        if config is None:
            config = VMBConfig.tiny() if preset == "tiny" else VMBConfig()
        if config_file is not None:
            config = replace(config, **config_from_yaml(config_file))
        config = replace(config, **config_options)  # what the user sets wins over the yaml
    except (TypeError, ValueError) as e:
        raise FeaturesError(f"{VMBDetector.name}: bad options: {e}") from e
    info = None
    if weights is None:
        detector = VMBDetector(config, selection=rule)
    else:
        with torch.device("meta"):  # no random init of 206 M parameters that the file replaces anyway
            detector = VMBDetector(config, selection=rule)
        info = load_vmb_weights(weights, detector.model)
        if config_file is not None:
            info["config_file"] = {"file": os.path.basename(config_file), "sha256": sha256_file(config_file)}
    detector.weights_info = info
    return detector.eval()
