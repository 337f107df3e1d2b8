"""`--backend detectron2`: the same BUTD network built through detectron2's registries.

detectron2 is optional and imported only here, lazily. Stock detectron2 cannot express three BUTD details, so this
module registers them: a Caffe max-pool stem (pad 0, ceil_mode) inside a `build_butd_resnet_backbone` backbone
(any block counts, for tiny tests), `BUTDRes5ROIHeads` (res5 without stride, dilation 2) and an attribute box
predictor. It uses neither `model_zoo` nor the compiled `_C` extension: the C4 path needs only torchvision ops.
Weights are the native state dict exported to detectron2's layout (background last), so any supported weight file
loads; preprocessing, box selection and outputs are `BUTDDetector`'s, so the feature store is identical.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import nn

from features.butd import BUTDConfig, BUTDDetector
from features.detector_checkpoints import export_detectron2
from features.errors import FeaturesError

_REGISTERED: dict[str, object] = {}


def _import_detectron2():
    try:
        return importlib.import_module("detectron2")
    except ImportError as e:
        raise FeaturesError(
            "the detectron2 backend needs detectron2, which has no PyPI release: build it from a source checkout "
            "(pip install --no-build-isolation DIR) or put an uncompiled checkout on PYTHONPATH; see docs/features.md"
            f" ({e})"
        ) from e


def _register() -> None:
    """Register the stem/backbone, the res5 heads and the attribute predictor once per process."""
    if _REGISTERED:
        return
    _import_detectron2()
    from detectron2.layers import ShapeSpec
    from detectron2.modeling import BACKBONE_REGISTRY, ROI_HEADS_REGISTRY, ResNet
    from detectron2.modeling.backbone.resnet import BasicStem, BottleneckBlock
    from detectron2.modeling.roi_heads import Res5ROIHeads
    from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers

    class CaffeMaxPoolStem(BasicStem):
        """detectron2's stem with Caffe's pooling: 3x3/2, no padding, ceil_mode."""

        def forward(self, x):
            x = F.relu_(self.conv1(x))
            return F.max_pool2d(x, kernel_size=3, stride=2, padding=0, ceil_mode=True)

    def build_butd_resnet_backbone(cfg, input_shape):
        r = cfg.MODEL.RESNETS
        stem = CaffeMaxPoolStem(input_shape.channels, r.STEM_OUT_CHANNELS, norm=r.NORM)
        stages, in_channels, out_channels = [], r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS
        for i, num_blocks in enumerate(cfg.MODEL.BUTD.BLOCKS[:3]):
            stages.append(ResNet.make_stage(
                BottleneckBlock, num_blocks, stride_per_block=[1 if i == 0 else 2] + [1] * (num_blocks - 1),
                in_channels=in_channels, bottleneck_channels=out_channels // 4, out_channels=out_channels,
                norm=r.NORM, stride_in_1x1=r.STRIDE_IN_1X1))
            in_channels, out_channels = out_channels, out_channels * 2
        return ResNet(stem, stages, out_features=["res4"], freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)

    class AttributePredictor(FastRCNNOutputLayers):
        """detectron2's predictor plus the BUTD attribute head (names as in py-bottom-up-attention)."""

        def __init__(self, input_shape, *, num_attributes, embed_dim, hidden_dim, **kwargs):
            super().__init__(input_shape, **kwargs)
            self.num_attributes = num_attributes
            if num_attributes:
                num_classes = self.cls_score.out_features
                self.cls_embedding = nn.Embedding(num_classes, embed_dim)
                self.fc_attr = nn.Linear(input_shape.channels + embed_dim, hidden_dim)
                self.attr_score = nn.Linear(hidden_dim, num_attributes + 1)

        def forward(self, x):
            scores, deltas = super().forward(x)
            if not self.num_attributes:
                return scores, deltas, None
            embedded = self.cls_embedding(scores.argmax(dim=1))
            hidden = F.relu(self.fc_attr(torch.cat([x, embedded.to(x.dtype)], dim=1)))
            return scores, deltas, self.attr_score(hidden)

    class BUTDRes5ROIHeads(Res5ROIHeads):
        """Res5 head with the stride removed and the 3x3 convs dilated by 2, and the attribute predictor."""

        @classmethod
        def from_config(cls, cfg, input_shape):
            ret = super().from_config(cfg, input_shape)
            channels = cfg.MODEL.RESNETS.RES2_OUT_CHANNELS * 8
            shape = ShapeSpec(channels=channels, height=1, width=1)
            butd = cfg.MODEL.BUTD
            ret["box_predictor"] = AttributePredictor(
                num_attributes=butd.NUM_ATTRIBUTES, embed_dim=butd.ATTR_EMBED_DIM, hidden_dim=butd.ATTR_HIDDEN_DIM,
                **FastRCNNOutputLayers.from_config(cfg, shape))
            return ret

        @classmethod
        def _build_res5_block(cls, cfg):
            r = cfg.MODEL.RESNETS
            out_channels = r.RES2_OUT_CHANNELS * 8
            num_blocks = cfg.MODEL.BUTD.BLOCKS[3]
            blocks = ResNet.make_stage(
                BottleneckBlock, num_blocks, stride_per_block=[1] * num_blocks, in_channels=out_channels // 2,
                bottleneck_channels=out_channels // 4, out_channels=out_channels, norm=r.NORM,
                stride_in_1x1=r.STRIDE_IN_1X1, dilation=2)
            return nn.Sequential(*blocks), out_channels

    if "build_butd_resnet_backbone" not in BACKBONE_REGISTRY:
        BACKBONE_REGISTRY.register(build_butd_resnet_backbone)
    if "BUTDRes5ROIHeads" not in ROI_HEADS_REGISTRY:
        ROI_HEADS_REGISTRY.register(BUTDRes5ROIHeads)
    _REGISTERED["done"] = True


def detectron2_config(config: BUTDConfig):
    """A detectron2 CfgNode for `config` (no model_zoo file: every key set here)."""
    _register()
    from detectron2.config import CfgNode, get_cfg

    cfg = get_cfg()
    m = cfg.MODEL
    m.DEVICE = "cpu"
    m.META_ARCHITECTURE = "GeneralizedRCNN"
    m.WEIGHTS = ""
    m.PIXEL_MEAN = list(config.pixel_mean_bgr)
    m.PIXEL_STD = [1.0, 1.0, 1.0]
    m.BACKBONE.NAME = "build_butd_resnet_backbone"
    m.BACKBONE.FREEZE_AT = 0
    m.RESNETS.NORM = "FrozenBN"
    m.RESNETS.STRIDE_IN_1X1 = True
    m.RESNETS.NUM_GROUPS = 1
    m.RESNETS.STEM_OUT_CHANNELS = config.stem_channels
    m.RESNETS.RES2_OUT_CHANNELS = config.res2_channels
    m.RESNETS.WIDTH_PER_GROUP = config.res2_channels // 4
    m.RESNETS.OUT_FEATURES = ["res4"]
    m.ANCHOR_GENERATOR.SIZES = [list(config.anchor_sizes)]
    m.ANCHOR_GENERATOR.ASPECT_RATIOS = [list(config.anchor_ratios)]
    m.ANCHOR_GENERATOR.OFFSET = config.anchor_offset
    m.PROPOSAL_GENERATOR.NAME = "RPN"
    m.PROPOSAL_GENERATOR.MIN_SIZE = config.rpn_min_size
    m.RPN.IN_FEATURES = ["res4"]
    m.RPN.HEAD_NAME = "StandardRPNHead"
    m.RPN.CONV_DIMS = [config.rpn_channels]
    m.RPN.PRE_NMS_TOPK_TEST = config.rpn_pre_nms_topk
    m.RPN.POST_NMS_TOPK_TEST = config.rpn_post_nms_topk
    m.RPN.NMS_THRESH = config.rpn_nms_threshold
    m.RPN.BBOX_REG_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
    m.ROI_HEADS.NAME = "BUTDRes5ROIHeads"
    m.ROI_HEADS.IN_FEATURES = ["res4"]
    m.ROI_HEADS.NUM_CLASSES = config.num_classes
    m.ROI_BOX_HEAD.POOLER_TYPE = "ROIPool"
    m.ROI_BOX_HEAD.POOLER_RESOLUTION = config.pooler_resolution
    m.ROI_BOX_HEAD.BBOX_REG_WEIGHTS = tuple(config.bbox_reg_weights)
    m.BUTD = CfgNode({"BLOCKS": list(config.blocks), "NUM_ATTRIBUTES": config.num_attributes,
                      "ATTR_EMBED_DIM": config.attr_embed_dim, "ATTR_HIDDEN_DIM": config.attr_hidden_dim})
    if config.bn_eps != 1e-5:
        raise FeaturesError(f"the detectron2 backend uses FrozenBN eps 1e-5; config asks for {config.bn_eps}")
    return cfg


class Detectron2BUTDModel(nn.Module):
    """A detectron2 `GeneralizedRCNN` behind `BUTDModel.forward`'s contract (outputs in the native layout)."""

    def __init__(self, config: BUTDConfig):
        super().__init__()
        cfg = detectron2_config(config)  # imports detectron2 (one clear error if absent) and registers our parts
        from detectron2.modeling import build_model

        self.rcnn = build_model(cfg)

    def forward(self, pixels: torch.Tensor, image_hw: torch.Tensor, rois: list[torch.Tensor] | None = None,
                feature_maps: dict[str, torch.Tensor] | None = None) -> dict:
        from detectron2.structures import Boxes, ImageList

        images = ImageList(pixels, [tuple(int(v) for v in hw) for hw in image_hw.tolist()])
        features = self.rcnn.backbone(pixels) if feature_maps is None else feature_maps
        if rois is None:
            proposals, _ = self.rcnn.proposal_generator(images, features, None)
            rois = [p.proposal_boxes.tensor for p in proposals]
        rois = [r.float() for r in rois]
        heads = self.rcnn.roi_heads
        pooled = heads._shared_roi_transform([features[f] for f in heads.in_features], [Boxes(r) for r in rois])
        pooled = pooled.mean(dim=(2, 3))  # [R, 2048]
        scores, deltas, attr_logits = heads.box_predictor(pooled)
        cls_logits = torch.cat([scores[:, -1:], scores[:, :-1]], dim=1)  # background to column 0
        deltas = torch.cat([deltas.new_zeros(len(deltas), 4), deltas], dim=1)
        return {"rois": rois, "pooled": pooled, "cls_logits": cls_logits, "deltas": deltas,
                "attr_logits": attr_logits, "feature_maps": features}


class Detectron2BUTDDetector(BUTDDetector):
    """`BUTDDetector` whose network is built by detectron2."""

    backend = "detectron2"

    def __init__(self, config: BUTDConfig | None = None, **kwargs):
        config = config or BUTDConfig()
        super().__init__(config, model=Detectron2BUTDModel(config), **kwargs)

    def load_native_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load weights in the native layout (what `features.detector_checkpoints` produces)."""
        self.model.rcnn.load_state_dict(export_detectron2(state), strict=True)
