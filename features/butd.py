"""The bottom-up-attention detector (Anderson et al. 2018): Caffe-style Faster R-CNN ResNet-101 C4 on Visual Genome.

Built from torch and torchvision ops only. Reads top to bottom like the network: frozen-BN convs, bottleneck blocks,
the Caffe stem, the res2-res4 trunk, anchors and box coding, the RPN, the dilated res5 head with the class, box and
attribute predictors, then `BUTDDetector`, which adds Caffe preprocessing, box selection and the
`RegionDetector` interface.

State-dict names follow detectron2 / py-bottom-up-attention (`backbone.res4.22.conv2.norm.weight`,
`proposal_generator.rpn_head.conv.weight`, `roi_heads.res5.0.shortcut.weight`, ...), except that the predictor
puts background at index 0 (`cls_score` [K+1, D], `bbox_pred` [(K+1)*4, D], `cls_embedding` [K+1, E]) and the
RPN's cell anchors are size-major. `features.detector_checkpoints` converts every published layout into this one.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms, roi_pool
from torchvision.ops.misc import FrozenBatchNorm2d

from features.detector import DetectedRegions, PreparedImage, RegionDetector
from features.errors import FeaturesError
from features.selection import BUTD_RULE, SelectionRule, select_regions

logger = logging.getLogger(__name__)

CAFFE_PIXEL_MEAN_BGR = (102.9801, 115.9465, 122.7717)
# detectron2's clamp on predicted log-size deltas, so exp() cannot overflow.
DELTA_CLAMP = math.log(1000.0 / 16)


@dataclass
class BUTDConfig:
    """Everything that varies between the published R101-C4 model and the tiny test variant."""

    blocks: tuple[int, int, int, int] = (3, 4, 23, 3)  # bottleneck blocks in res2, res3, res4, res5
    stem_channels: int = 64
    res2_channels: int = 256  # output width of res2; doubles each stage, bottleneck = width / 4
    rpn_channels: int = 512
    num_classes: int = 1600  # foreground classes; the classifier has num_classes + 1 outputs
    num_attributes: int = 400  # 0 disables the attribute head; it has num_attributes + 1 outputs
    attr_embed_dim: int = 256
    attr_hidden_dim: int = 512
    anchor_sizes: tuple[float, ...] = (64, 128, 256, 512)
    anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    anchor_offset: float = 0.0  # anchor centres at (x + offset) * 16; detectron2 uses 0
    rpn_pre_nms_topk: int = 6000
    rpn_nms_threshold: float = 0.7
    rpn_post_nms_topk: int = 300
    rpn_min_size: float = 0.0  # proposals must be wider and taller than this (resized pixels)
    pooler_resolution: int = 14
    bbox_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    bn_eps: float = 1e-5
    pixel_mean_bgr: tuple[float, float, float] = CAFFE_PIXEL_MEAN_BGR
    min_size: int = 600
    max_size: int = 1000
    size_divisible: int = 1
    feature_stride: int = field(default=16, init=False)

    @property
    def res4_channels(self) -> int:
        return self.res2_channels * 4

    @property
    def feature_dim(self) -> int:
        return self.res2_channels * 8

    @classmethod
    def tiny(cls, **overrides) -> BUTDConfig:
        """Same code paths, a few thousand parameters: for tests."""
        values = dict(blocks=(1, 1, 1, 1), stem_channels=8, res2_channels=16, rpn_channels=16, num_classes=6,
                      num_attributes=4, attr_embed_dim=8, attr_hidden_dim=8, rpn_pre_nms_topk=200,
                      rpn_post_nms_topk=40, pooler_resolution=4, min_size=64, max_size=96)
        values.update(overrides)
        return cls(**values)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("feature_stride")
        return d


# ---------------------------------------------------------------------------------------------------------------
# Trunk


class ConvNorm(nn.Conv2d):
    """A bias-free convolution followed by frozen BatchNorm (detectron2's `Conv2d(norm=...)`, same key names)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
                 padding: int = 0, dilation: int = 1, eps: float = 1e-5):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, bias=False)
        self.norm = FrozenBatchNorm2d(out_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(super().forward(x))


class Bottleneck(nn.Module):
    """ResNet bottleneck with the stride on the first 1x1 conv (MSRA / Caffe weights, STRIDE_IN_1X1)."""

    def __init__(self, in_channels: int, bottleneck_channels: int, out_channels: int, *, stride: int = 1,
                 dilation: int = 1, eps: float = 1e-5):
        super().__init__()
        self.shortcut = (
            ConvNorm(in_channels, out_channels, 1, stride=stride, eps=eps) if in_channels != out_channels else None
        )
        self.conv1 = ConvNorm(in_channels, bottleneck_channels, 1, stride=stride, eps=eps)
        self.conv2 = ConvNorm(bottleneck_channels, bottleneck_channels, 3, padding=dilation, dilation=dilation,
                              eps=eps)
        self.conv3 = ConvNorm(bottleneck_channels, out_channels, 1, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu_(self.conv1(x))
        out = F.relu_(self.conv2(out))
        out = self.conv3(out)
        identity = self.shortcut(x) if self.shortcut is not None else x
        return F.relu_(out + identity)


def make_stage(num_blocks: int, in_channels: int, out_channels: int, *, stride: int, dilation: int = 1,
               eps: float = 1e-5) -> nn.Sequential:
    """`num_blocks` bottlenecks; only the first one strides (and projects the shortcut)."""
    blocks = []
    for i in range(num_blocks):
        blocks.append(Bottleneck(in_channels if i == 0 else out_channels, out_channels // 4, out_channels,
                                 stride=stride if i == 0 else 1, dilation=dilation, eps=eps))
    return nn.Sequential(*blocks)


class CaffeStem(nn.Module):
    """7x7/2 conv + frozen BN + ReLU, then Caffe's 3x3/2 max-pool: no padding, ceil_mode (stride 4 overall)."""

    def __init__(self, out_channels: int, eps: float = 1e-5):
        super().__init__()
        self.conv1 = ConvNorm(3, out_channels, 7, stride=2, padding=3, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu_(self.conv1(x))
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=0, ceil_mode=True)


class ResNetC4(nn.Module):
    """Stem + res2..res4: the shared trunk, 1/16 resolution, `res4_channels` wide."""

    def __init__(self, config: BUTDConfig):
        super().__init__()
        c, eps = config.res2_channels, config.bn_eps
        self.stem = CaffeStem(config.stem_channels, eps)
        self.res2 = make_stage(config.blocks[0], config.stem_channels, c, stride=1, eps=eps)
        self.res3 = make_stage(config.blocks[1], c, 2 * c, stride=2, eps=eps)
        self.res4 = make_stage(config.blocks[2], 2 * c, 4 * c, stride=2, eps=eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.res4(self.res3(self.res2(self.stem(pixels))))  # [N, 4c, H/16, W/16]


# ---------------------------------------------------------------------------------------------------------------
# Anchors, box coding, RPN


def cell_anchors(sizes: tuple[float, ...], ratios: tuple[float, ...]) -> torch.Tensor:
    """Anchors centred at 0, size-major (index = size_index * len(ratios) + ratio_index), unrounded. [A, 4]"""
    anchors = []
    for size in sizes:
        for ratio in ratios:  # ratio = height / width, area = size^2
            w = math.sqrt(size * size / ratio)
            h = ratio * w
            anchors.append([-w / 2, -h / 2, w / 2, h / 2])
    return torch.tensor(anchors, dtype=torch.float32)


def decode_boxes(deltas: torch.Tensor, boxes: torch.Tensor, weights: tuple[float, ...]) -> torch.Tensor:
    """Apply (dx, dy, dw, dh) deltas [..., 4] to boxes [..., 4] (x1 y1 x2 y2), detectron2's convention."""
    widths = boxes[..., 2] - boxes[..., 0]
    heights = boxes[..., 3] - boxes[..., 1]
    ctr_x = boxes[..., 0] + 0.5 * widths
    ctr_y = boxes[..., 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx, dy = deltas[..., 0] / wx, deltas[..., 1] / wy
    dw = (deltas[..., 2] / ww).clamp(max=DELTA_CLAMP)
    dh = (deltas[..., 3] / wh).clamp(max=DELTA_CLAMP)
    pred_ctr_x, pred_ctr_y = dx * widths + ctr_x, dy * heights + ctr_y
    pred_w, pred_h = torch.exp(dw) * widths, torch.exp(dh) * heights
    return torch.stack([pred_ctr_x - 0.5 * pred_w, pred_ctr_y - 0.5 * pred_h,
                        pred_ctr_x + 0.5 * pred_w, pred_ctr_y + 0.5 * pred_h], dim=-1)


def clamp_boxes(boxes: torch.Tensor, hw: torch.Tensor) -> torch.Tensor:
    """Clip boxes [..., 4] to [0, w] x [0, h]; `hw` broadcasts against boxes[..., 0] ([N, 1] or scalar pairs)."""
    x = boxes[..., 0::2].clamp(min=0).minimum(hw[..., 1:2])
    y = boxes[..., 1::2].clamp(min=0).minimum(hw[..., 0:1])
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)


def argmax_class_boxes(rois: torch.Tensor, deltas: torch.Tensor, probs: torch.Tensor, image_hw: torch.Tensor,
                       weights: tuple[float, ...]) -> torch.Tensor:
    """Each proposal's box regressed for its arg-max foreground class, clipped to its image.

    rois [P, 4]; deltas [P, (K+1)*4] class-specific, background first; probs [P, K+1]; image_hw [P, 2] or [2].
    Returns [P, 4] in the coordinates of `rois` (the box the airsplay, HF and MILVLG two-stage rules use).
    """
    cls = probs[:, 1:].argmax(dim=1) + 1  # [P], background excluded
    chosen = deltas.view(len(rois), deltas.shape[1] // 4, 4)[torch.arange(len(rois), device=rois.device), cls]
    return clamp_boxes(decode_boxes(chosen, rois, weights), image_hw)


class RPNHead(nn.Module):
    """3x3 conv (512 wide in BUTD) + ReLU, then one objectness logit and 4 deltas per anchor."""

    def __init__(self, in_channels: int, hidden_channels: int, num_anchors: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, hidden_channels, 3, padding=1)
        self.objectness_logits = nn.Conv2d(hidden_channels, num_anchors, 1)
        self.anchor_deltas = nn.Conv2d(hidden_channels, num_anchors * 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = F.relu(self.conv(x))
        return self.objectness_logits(t), self.anchor_deltas(t)  # [N, A, H, W], [N, A*4, H, W]


class RegionProposalNetwork(nn.Module):
    """Proposals per image: top-k before NMS, clip, drop empty boxes, NMS, top-k after (detectron2's order)."""

    def __init__(self, config: BUTDConfig):
        super().__init__()
        self.config = config
        self.register_buffer("cell_anchors", cell_anchors(config.anchor_sizes, config.anchor_ratios),
                             persistent=False)
        self.rpn_head = RPNHead(config.res4_channels, config.rpn_channels, len(self.cell_anchors))

    def anchors(self, height: int, width: int) -> torch.Tensor:
        """All anchors of an H x W feature map, location-major then cell anchor. [H*W*A, 4]"""
        stride, offset = self.config.feature_stride, self.config.anchor_offset
        device = self.cell_anchors.device
        ys = (torch.arange(height, device=device, dtype=torch.float32) + offset) * stride
        xs = (torch.arange(width, device=device, dtype=torch.float32) + offset) * stride
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        shifts = torch.stack([xx, yy, xx, yy], dim=-1).reshape(-1, 1, 4)  # [H*W, 1, 4]
        return (shifts + self.cell_anchors).reshape(-1, 4)

    def forward(self, features: torch.Tensor, image_hw: torch.Tensor) -> list[torch.Tensor]:
        """features [N, C, H, W]; image_hw [N, 2] valid (resized) sizes → proposals [P_i, 4] per image."""
        cfg = self.config
        logits, deltas = self.rpn_head(features)
        n, a, h, w = logits.shape
        logits = logits.permute(0, 2, 3, 1).reshape(n, -1).float()  # [N, H*W*A]
        deltas = deltas.reshape(n, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4).float()
        anchors = self.anchors(h, w)  # [H*W*A, 4]

        k = min(cfg.rpn_pre_nms_topk, logits.shape[1])
        top_logits, top_idx = logits.topk(k, dim=1)  # [N, k], sorted
        boxes = decode_boxes(deltas.gather(1, top_idx[..., None].expand(-1, -1, 4)), anchors[top_idx], (1, 1, 1, 1))
        boxes = clamp_boxes(boxes, image_hw[:, None, :].to(boxes))  # [N, k, 4]
        wh = boxes[..., 2:] - boxes[..., :2]
        valid = (wh > cfg.rpn_min_size).all(-1) & torch.isfinite(boxes).all(-1) & torch.isfinite(top_logits)

        image_idx = torch.arange(n, device=boxes.device)[:, None].expand(n, k)
        boxes, scores, image_idx = boxes[valid], top_logits[valid], image_idx[valid]
        keep = batched_nms(boxes, scores, image_idx, cfg.rpn_nms_threshold)  # sorted by score
        keep = keep[torch.sort(image_idx[keep], stable=True).indices]  # group by image, score order inside
        counts = torch.bincount(image_idx[keep], minlength=n)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(keep.numel(), device=keep.device) - starts[image_idx[keep]]
        keep = keep[rank < cfg.rpn_post_nms_topk]
        return list(boxes[keep].split(torch.bincount(image_idx[keep], minlength=n).tolist()))


# ---------------------------------------------------------------------------------------------------------------
# RoI head


class BoxPredictor(nn.Module):
    """Class scores (background first), class-specific deltas, and the attribute head.

    The attribute head embeds the arg-max class of the logits (background included, as every peer does),
    concatenates it with the pooled feature, then fc + ReLU and the attribute scores ("no attribute" first).
    """

    def __init__(self, config: BUTDConfig):
        super().__init__()
        d, k = config.feature_dim, config.num_classes + 1
        self.cls_score = nn.Linear(d, k)
        self.bbox_pred = nn.Linear(d, k * 4)
        self.has_attributes = config.num_attributes > 0
        if self.has_attributes:
            self.cls_embedding = nn.Embedding(k, config.attr_embed_dim)
            self.fc_attr = nn.Linear(d + config.attr_embed_dim, config.attr_hidden_dim)
            self.attr_score = nn.Linear(config.attr_hidden_dim, config.num_attributes + 1)

    def forward(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        cls_logits = self.cls_score(pooled)  # [R, K+1]
        deltas = self.bbox_pred(pooled)  # [R, (K+1)*4]
        attr_logits = None
        if self.has_attributes:
            embedded = self.cls_embedding(cls_logits.argmax(dim=1))  # [R, E]
            hidden = F.relu(self.fc_attr(torch.cat([pooled, embedded.to(pooled.dtype)], dim=1)))
            attr_logits = self.attr_score(hidden)  # [R, A+1]
        return cls_logits, deltas, attr_logits


class Res5RoIHeads(nn.Module):
    """RoIPool 14x14 at 1/16 on res4, res5 with the stride removed and dilation 2, mean over the 14x14 grid."""

    def __init__(self, config: BUTDConfig):
        super().__init__()
        self.config = config
        c = config.res2_channels
        self.res5 = make_stage(config.blocks[3], 4 * c, 8 * c, stride=1, dilation=2, eps=config.bn_eps)
        self.box_predictor = BoxPredictor(config)

    def pool(self, features: torch.Tensor, rois: list[torch.Tensor]) -> torch.Tensor:
        """Pooled region features [R, D] for per-image boxes in resized pixels."""
        batch_index = torch.cat([torch.full((len(r), 1), i, dtype=torch.float32, device=features.device)
                                 for i, r in enumerate(rois)])
        rois_5 = torch.cat([batch_index, torch.cat(rois).float()], dim=1)  # [R, 5]
        size = self.config.pooler_resolution
        x = roi_pool(features.float(), rois_5, (size, size), 1.0 / self.config.feature_stride)  # [R, 4c, 14, 14]
        x = x.to(features.dtype)
        return self.res5(x).mean(dim=(2, 3))  # [R, 8c]


class BUTDModel(nn.Module):
    """The network: trunk, RPN, RoI heads. `forward` returns raw per-image outputs, no selection."""

    def __init__(self, config: BUTDConfig):
        super().__init__()
        self.config = config
        self.backbone = ResNetC4(config)
        self.proposal_generator = RegionProposalNetwork(config)
        self.roi_heads = Res5RoIHeads(config)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A sane random init (MSRA convs, detectron2's small RPN and predictor stds) so random models propose."""
        for m in self.backbone.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.roi_heads.res5.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.proposal_generator.rpn_head.children():
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)
        predictor = self.roi_heads.box_predictor
        for layer, std in ((predictor.cls_score, 0.01), (predictor.bbox_pred, 0.001)):
            nn.init.normal_(layer.weight, std=std)
            nn.init.zeros_(layer.bias)
        if predictor.has_attributes:
            nn.init.normal_(predictor.cls_embedding.weight, std=0.01)
            for layer in (predictor.fc_attr, predictor.attr_score):
                nn.init.normal_(layer.weight, std=0.01)
                nn.init.zeros_(layer.bias)

    def forward(self, pixels: torch.Tensor, image_hw: torch.Tensor, rois: list[torch.Tensor] | None = None,
                feature_maps: torch.Tensor | None = None) -> dict:
        """pixels [N, 3, H, W] Caffe-normalised; image_hw [N, 2]; rois per image (resized pixels) skip the RPN;
        `feature_maps` (an earlier call's output of that name) skips the trunk, for a second pass on new boxes."""
        if feature_maps is None:
            feature_maps = self.backbone(pixels)  # [N, 4c, H/16, W/16]
        if rois is None:
            rois = self.proposal_generator(feature_maps, image_hw)
        rois = [r.float() for r in rois]
        pooled = self.roi_heads.pool(feature_maps, rois)
        cls_logits, deltas, attr_logits = self.roi_heads.box_predictor(pooled)
        return {"rois": rois, "pooled": pooled, "cls_logits": cls_logits, "deltas": deltas,
                "attr_logits": attr_logits, "feature_maps": feature_maps}


# ---------------------------------------------------------------------------------------------------------------
# The detector


def resize_scale(height: int, width: int, min_size: int, max_size: int) -> float:
    """Shorter side to `min_size`, unless that pushes the longer side past `max_size`."""
    return min(min_size / min(height, width), max_size / max(height, width))


class BUTDDetector(RegionDetector):
    """`BUTDModel` + Caffe preprocessing + box selection, behind the `RegionDetector` interface.

    Detected regions take their features from the proposals, except under a rule with `pool_on="selected"` (rule D),
    where the kept boxes go through the given-box path a second time, on the same trunk feature maps.
    """

    name = "butd-r101-c4"
    backend = "native"

    def __init__(self, config: BUTDConfig | None = None, *, selection: SelectionRule = BUTD_RULE,
                 box_mode: str | None = None, weights_info: dict | None = None, model: nn.Module | None = None):
        """`model` replaces the native network by any module with `BUTDModel.forward`'s contract. `box_mode`
        (stored boxes: `proposal` or `regressed`) defaults to the boxes the selection rule's NMS ran on."""
        super().__init__()
        box_mode = box_mode or selection.nms_boxes
        if box_mode not in ("proposal", "regressed"):
            raise FeaturesError(f"box_mode must be 'proposal' or 'regressed', got {box_mode!r}")
        if selection.pool_on == "selected" and box_mode != "regressed":
            raise FeaturesError(f"selection {selection.name!r} pools features on the stored boxes, so it needs "
                                f"box_mode 'regressed' (the proposals were pooled already), got {box_mode!r}")
        self.config = config or BUTDConfig()
        self.model = model if model is not None else BUTDModel(self.config)
        self.selection = selection
        self.box_mode = box_mode
        self.weights_info = weights_info or {"sha256": "random"}
        self.feature_dim = self.config.feature_dim
        self.cls_prob_dim = self.config.num_classes + 1
        self.register_buffer("_pixel_mean", torch.tensor(self.config.pixel_mean_bgr).view(3, 1, 1), persistent=False)

    @property
    def size_divisible(self) -> int:
        """Padding multiple the pipeline uses for a batch (1: pad to the largest image only, like Caffe/HF)."""
        return self.config.size_divisible

    def input_scale(self, height: int, width: int) -> float:
        return resize_scale(height, width, self.config.min_size, self.config.max_size)

    def prepare(self, image: np.ndarray) -> PreparedImage:
        """RGB uint8 [H, W, 3] → BGR 0-255 minus the Caffe means, resized (bilinear) to 600 / max 1000."""
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
        h, w = image.shape[:2]
        scale = resize_scale(h, w, self.config.min_size, self.config.max_size)
        new_h, new_w = max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))
        pixels = torch.from_numpy(np.ascontiguousarray(image[:, :, ::-1])).permute(2, 0, 1).float()  # BGR [3, H, W]
        if (new_h, new_w) != (h, w):
            pixels = F.interpolate(pixels[None], size=(new_h, new_w), mode="bilinear", align_corners=False)[0]
        pixels = pixels - torch.tensor(self.config.pixel_mean_bgr).view(3, 1, 1)
        return PreparedImage(pixels=pixels, scale=scale, image_hw=(h, w))

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor, images: list[PreparedImage],
                boxes: list[torch.Tensor] | None = None) -> list[DetectedRegions]:
        if boxes is not None:
            if len(boxes) != len(images):
                raise ValueError(f"got boxes for {len(boxes)} images but {len(images)} images")
            return self.regions_on_boxes(pixels, images, boxes)
        image_hw = self._resized_hw(pixels, images)
        out = self.model(pixels, image_hw)
        counts = [len(r) for r in out["rois"]]
        empty = [i for i, c in enumerate(counts) if c == 0]
        if empty:
            logger.warning("RPN returned no proposals for %d of %d images in this batch", len(empty), len(images))
        heads = _split_heads(out, counts)
        probs = list(heads["probs"])

        regressed = None
        if self.selection.nms_boxes == "regressed" or self.box_mode == "regressed":
            rois = torch.cat(out["rois"])  # [P, 4]
            rois_hw = torch.repeat_interleave(image_hw, torch.tensor(counts, device=pixels.device), dim=0)  # [P, 2]
            regressed = argmax_class_boxes(rois, out["deltas"].float(), torch.cat(probs), rois_hw,
                                           self.config.bbox_reg_weights).split(counts)
        nms_boxes = regressed if self.selection.nms_boxes == "regressed" else out["rois"]
        keeps = [keep for keep, _ in select_regions(list(nms_boxes), probs, self.selection)]

        stored = []
        for i, keep in enumerate(keeps):
            kept = (regressed if self.box_mode == "regressed" else out["rois"])[i][keep] / images[i].scale
            h, w = images[i].image_hw  # resizing rounds the image size: clip to the original image once more
            stored.append(clamp_boxes(kept, kept.new_tensor([h, w])))
        if self.selection.pool_on == "selected":
            return self.regions_on_boxes(pixels, images, stored, feature_maps=out["feature_maps"])
        return [_regions(heads, i, keep, box) for i, (keep, box) in enumerate(zip(keeps, stored, strict=True))]

    def regions_on_boxes(self, pixels: torch.Tensor, images: list[PreparedImage], boxes: list[torch.Tensor],
                         feature_maps: torch.Tensor | None = None) -> list[DetectedRegions]:
        """Given-box mode: pool on exactly `boxes` (original pixels, per image), in their order, skipping the RPN.
        `feature_maps` from a first pass over the same `pixels` skips the trunk (rule D's second stage)."""
        device = pixels.device
        boxes = [b.to(device=device, dtype=torch.float32).reshape(-1, 4) for b in boxes]
        rois = [b * im.scale for b, im in zip(boxes, images, strict=True)]
        out = self.model(pixels, self._resized_hw(pixels, images), rois, feature_maps)
        heads = _split_heads(out, [len(r) for r in rois])
        return [_regions(heads, i, torch.arange(len(b), device=device), b) for i, b in enumerate(boxes)]

    @staticmethod
    def _resized_hw(pixels: torch.Tensor, images: list[PreparedImage]) -> torch.Tensor:
        """Valid (unpadded) size of each resized image. [N, 2]"""
        return torch.tensor([im.pixels.shape[1:] for im in images], device=pixels.device, dtype=torch.float32)

    def extractor_info(self) -> dict:
        c = self.config
        return {
            "detector": self.name,
            "backend": self.backend,
            "weights": self.weights_info,
            "selection": self.selection.as_dict(),
            "box_mode": self.box_mode,
            "input": {"min_size": c.min_size, "max_size": c.max_size, "color": "BGR", "range": "0-255",
                      "pixel_mean": list(c.pixel_mean_bgr), "resize": "bilinear"},
            "pooling": f"roipool-{c.pooler_resolution}x{c.pooler_resolution}-res4-res5-dilated-mean",
            "feature_dim": c.feature_dim,
            "num_classes": c.num_classes + 1,
            "num_attributes": c.num_attributes + 1 if c.num_attributes else 0,
            "config": c.to_dict(),
        }


def _split_heads(out: dict, counts: list[int]) -> dict:
    """The RoI heads' outputs as float32 per-image pieces: probs, pooled, attr_probs (None without the head)."""
    attr = out["attr_logits"]
    return {"probs": F.softmax(out["cls_logits"].float(), dim=1).split(counts),  # [P_i, K+1] each
            "pooled": out["pooled"].float().split(counts),  # [P_i, D] each
            "attr_probs": F.softmax(attr.float(), dim=1).split(counts) if attr is not None else None}


def _regions(heads: dict, i: int, keep: torch.Tensor, boxes: torch.Tensor) -> DetectedRegions:
    """Rows `keep` of image `i`'s head outputs as regions stored with `boxes` [k, 4] (original pixels)."""
    prob = heads["probs"][i][keep]
    fg_conf, fg_idx = prob[:, 1:].max(dim=1)
    region = DetectedRegions(features=heads["pooled"][i][keep], boxes=boxes, cls_prob=prob,
                             objects_id=fg_idx + 1, objects_conf=fg_conf)  # ids index cls_prob columns
    if heads["attr_probs"] is not None:
        attr_conf, attr_idx = heads["attr_probs"][i][keep][:, 1:].max(dim=1)
        region.attrs_id, region.attrs_conf = attr_idx + 1, attr_conf
    return region
