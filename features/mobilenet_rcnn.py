"""A trained detector on the frozen MobileNetV2 trunk: torchvision's Faster R-CNN parts (RPN, RoI heads) on top.

The embedded default pools its region features with `features.mobilenet` (frozen ImageNet MobileNetV2 to stride
16, RoIAlign 7x7, mean: 96-d) on given boxes. This detector proposes those boxes itself: the same frozen trunk, run
on the image resized to `detect_short_side`, feeds torchvision's `RegionProposalNetwork` and `RoIHeads`, trained
on a detection data set (the shapes world's colour x shape classes, `features.detector_training`). Kept boxes go
through a `SelectionRule` (class-agnostic NMS on the regressed arg-max boxes, BUTD's 0.2 score threshold), and
their features are pooled by `MobileNetV2Regions` on the original image, exactly as the given-box detector pools
them, so a model trained on ground-truth-box features reads detected-box features of the same kind. The store gets
the detector's own class distribution (`cls_prob`), its arg-max class and confidence.

A detector directory holds `config.json` (format version, classes, what the classes mean (`world`), the network
and selection settings, the trunk's weights sha256, the held-out scores) and `model.safetensors` (the RPN and RoI
head weights only; the trunk is the packaged ImageNet MobileNetV2, checked by sha256 on load).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import MultiScaleRoIAlign, clip_boxes_to_image

from features.atomic import atomic_path
from features.checksum import sha256_file
from features.detector import DetectedRegions, PreparedImage, RegionDetector
from features.errors import FeaturesError, WeightsError
from features.mobilenet import (
    MobileNetV2Regions,
    load_mobilenet_state_dict,
    packaged_weights_path,
)
from features.selection import SelectionRule, select_regions

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TRUNK_CHANNELS = 96
TRUNK_STRIDE = 16


def default_selection() -> dict:
    """Class-agnostic NMS (0.3) on each proposal's regressed arg-max box, BUTD's 0.2 score threshold, no minimum
    (an image with nothing in it keeps nothing), at most 10 boxes, sorted by score; features pooled on the kept
    boxes. Per-class NMS (rule A) would keep a second box on the same shape under another colour."""
    return SelectionRule(name="rcnn-class-agnostic", nms_threshold=0.3, conf_threshold=0.2, min_boxes=0,
                         max_boxes=10, sort_by_score=True, nms="class-agnostic", nms_boxes="regressed",
                         pool_on="selected").as_dict()


@dataclass
class RCNNConfig:
    """What varies between detectors of this family; saved as `config.json` with the weights."""

    classes: list[str]  # background first
    world: dict = field(default_factory=dict)  # what the classes mean: {"name", "version", "seed", ...}
    detect_short_side: int = 256  # the detection input: the image resized so its shorter side is this
    anchor_sizes: tuple[int, ...] = (32, 64, 128)
    anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_train_topk: tuple[int, int] = (600, 150)  # pre- and post-NMS proposals per image while training
    rpn_test_topk: tuple[int, int] = (300, 50)
    rpn_batch: int = 128  # anchors sampled per image for the RPN loss
    roi_batch: int = 64  # proposals sampled per image for the box-head loss
    head_dim: int = 256
    pool_size: int = 7
    selection: dict = field(default_factory=default_selection)

    def __post_init__(self):
        if len(self.classes) < 2 or self.classes[0] != "background":
            raise ValueError("classes must start with 'background' and name at least one object class")
        self.anchor_sizes = tuple(int(s) for s in self.anchor_sizes)
        self.anchor_ratios = tuple(float(r) for r in self.anchor_ratios)
        self.rpn_train_topk = tuple(self.rpn_train_topk)
        self.rpn_test_topk = tuple(self.rpn_test_topk)

    @property
    def rule(self) -> SelectionRule:
        return SelectionRule(**self.selection)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str) -> RCNNConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise WeightsError(f"{where}: unknown detector setting(s) {', '.join(unknown)}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as error:
            raise WeightsError(f"{where}: bad detector settings ({error})") from error


class RCNNHeads(nn.Module):
    """torchvision's Faster R-CNN parts on one 96-channel stride-16 feature map: RPN, RoIAlign, two-MLP box head,
    class and box predictor. `forward` in training mode returns the four losses; `detect` returns raw proposals,
    class probabilities and regressed boxes for the selection rule."""

    def __init__(self, config: RCNNConfig):
        super().__init__()
        anchors = AnchorGenerator(sizes=(config.anchor_sizes,), aspect_ratios=(config.anchor_ratios,))
        self.rpn = RegionProposalNetwork(
            anchors, RPNHead(TRUNK_CHANNELS, anchors.num_anchors_per_location()[0]),
            fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=config.rpn_batch, positive_fraction=0.5,
            pre_nms_top_n={"training": config.rpn_train_topk[0], "testing": config.rpn_test_topk[0]},
            post_nms_top_n={"training": config.rpn_train_topk[1], "testing": config.rpn_test_topk[1]},
            nms_thresh=0.7,
        )
        pool = MultiScaleRoIAlign(featmap_names=["0"], output_size=config.pool_size, sampling_ratio=2)
        self.roi_heads = RoIHeads(
            pool, TwoMLPHead(TRUNK_CHANNELS * config.pool_size ** 2, config.head_dim),
            FastRCNNPredictor(config.head_dim, len(config.classes)),
            fg_iou_thresh=0.5, bg_iou_thresh=0.5, batch_size_per_image=config.roi_batch, positive_fraction=0.25,
            bbox_reg_weights=None, score_thresh=0.0, nms_thresh=1.0, detections_per_img=100,
        )

    def forward(self, maps: torch.Tensor, image_sizes: list[tuple[int, int]],
                targets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Training losses for trunk maps [N, 96, h, w] of images of `image_sizes` (detection scale)."""
        features = {"0": maps}
        proposals, rpn_losses = self.rpn(_image_list(maps, image_sizes), features, targets)
        _, roi_losses = self.roi_heads(features, proposals, image_sizes, targets)
        return {**rpn_losses, **roi_losses}

    def detect(self, maps: torch.Tensor, image_sizes: list[tuple[int, int]]):
        """Per image: proposals [P, 4], class probabilities [P, C] and each proposal's box regressed for its
        arg-max foreground class [P, 4], at detection scale."""
        proposals, _ = self.rpn(_image_list(maps, image_sizes), {"0": maps})
        probs, regressed = self.score_boxes(maps, proposals, image_sizes)
        return proposals, probs, regressed

    def score_boxes(self, maps: torch.Tensor, boxes: list[torch.Tensor], image_sizes: list[tuple[int, int]]):
        """Class probabilities [K, C] and arg-max regressed boxes [K, 4] for boxes per image (detection scale)."""
        heads = self.roi_heads
        pooled = heads.box_head(heads.box_roi_pool({"0": maps}, boxes, image_sizes))
        logits, deltas = heads.box_predictor(pooled)
        counts = [len(b) for b in boxes]
        probs = F.softmax(logits.float(), dim=1)  # [P, C]
        decoded = heads.box_coder.decode(deltas, boxes).reshape(len(probs), -1, 4)  # [P, C, 4]
        best = probs[:, 1:].argmax(dim=1) + 1 if probs.shape[1] > 1 else probs.new_zeros(len(probs), dtype=torch.long)
        chosen = decoded[torch.arange(len(probs)), best]  # [P, 4]
        regressed = [clip_boxes_to_image(b, size) for b, size in zip(chosen.split(counts), image_sizes, strict=True)]
        return list(probs.split(counts)), regressed


def detection_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """The detection input size of an image: shorter side `short_side`, aspect kept."""
    scale = short_side / min(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


class MobileNetRCNN(RegionDetector):
    """The trained detector behind the `RegionDetector` interface (see the module docstring)."""

    name = "shapes"

    def __init__(self, config: RCNNConfig, trunk: MobileNetV2Regions, weights_info: dict | None = None):
        super().__init__()
        self.config = config
        self.regions = trunk  # frozen: pools the stored features exactly as `mobilenet-v2` does
        self.heads = RCNNHeads(config)
        self.feature_dim = trunk.feature_dim
        self.cls_prob_dim = len(config.classes)
        self.weights_info = weights_info or {"weights": "random", "weights_sha256": None}
        self.eval()

    def prepare(self, image: np.ndarray) -> PreparedImage:
        return self.regions.prepare(image)

    def trunk_maps(self, pixels: torch.Tensor, images: list[PreparedImage]) -> tuple[torch.Tensor, list]:
        """Each image's valid pixels resized to the detection size, through the frozen trunk: maps [N, 96, h, w] and
        the detection sizes."""
        sizes, resized = [], []
        for i, image in enumerate(images):
            height, width = image.pixels.shape[1:]
            size = detection_size(height, width, self.config.detect_short_side)
            valid = pixels[i:i + 1, :, :height, :width]
            resized.append(F.interpolate(valid, size=size, mode="bilinear", align_corners=False, antialias=True)[0])
            sizes.append(size)
        batch = resized[0].new_zeros(len(resized), 3, max(s[0] for s in sizes), max(s[1] for s in sizes))
        for i, r in enumerate(resized):
            batch[i, :, : r.shape[1], : r.shape[2]] = r
        with torch.no_grad():
            return self.regions.trunk(batch), sizes

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor, images: list[PreparedImage],
                boxes: list[torch.Tensor] | None = None) -> list[DetectedRegions]:
        maps, sizes = self.trunk_maps(pixels, images)
        # detection scale per original pixel: detection size over the image's original size
        scales = [size[0] / im.image_hw[0] for size, im in zip(sizes, images, strict=True)]
        if boxes is None:
            proposals, probs, regressed = self.heads.detect(maps, sizes)
            rule = self.config.rule
            nms_boxes = regressed if rule.nms_boxes == "regressed" else proposals
            keeps = [keep for keep, _ in select_regions(nms_boxes, probs, rule)]
            stored = regressed if rule.pool_on == "selected" else proposals
            boxes = [_to_image(stored[i][keep] / scales[i], im.image_hw) for i, (keep, im)
                     in enumerate(zip(keeps, images, strict=True))]
            probs = [p[keep] for p, keep in zip(probs, keeps, strict=True)]
        else:
            boxes = [b.float().reshape(-1, 4) for b in boxes]
            probs, _ = self.heads.score_boxes(maps, [b * s for b, s in zip(boxes, scales, strict=True)], sizes)
        pooled = self.regions(pixels, images, boxes)
        results = []
        for region, prob in zip(pooled, probs, strict=True):
            conf, cls = prob[:, 1:].max(dim=1) if len(prob) else (prob.new_zeros(0), prob.new_zeros(0).long())
            results.append(DetectedRegions(features=region.features, boxes=region.boxes, cls_prob=prob,
                                           objects_id=cls + 1, objects_conf=conf))
        return results

    def train(self, mode: bool = True) -> MobileNetRCNN:
        super().train(mode)
        self.regions.train(False)  # the trunk is frozen, BatchNorm statistics included
        return self

    def extractor_info(self) -> dict:
        return {
            **self.regions.extractor_info(),
            "detector": self.name,
            **self.weights_info,
            "trunk_weights": self.regions.weights_info,
            "boxes": "detected",
            "detection": f"torchvision faster r-cnn (rpn + roi heads) on the trunk at short side "
                         f"{self.config.detect_short_side}",
            "selection": self.config.selection,
            "classes": self.config.classes,
            "world": self.config.world,
        }

    def heads_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().contiguous() for k, v in self.heads.state_dict().items()}


def build_trunk(weights: str | os.PathLike | None = None, random_init: bool = False) -> MobileNetV2Regions:
    """The frozen given-box pooler: packaged ImageNet weights (or a `.pth` path), or random for tests."""
    if random_init:
        return MobileNetV2Regions()
    path = Path(weights) if weights else packaged_weights_path()
    info = {"weights": path.name, "weights_sha256": sha256_file(path)}
    return MobileNetV2Regions(load_mobilenet_state_dict(path), info)


def save_detector(detector: MobileNetRCNN, directory: str | os.PathLike, results: dict | None = None) -> Path:
    """Write a detector directory atomically: `config.json` and `model.safetensors`."""
    directory = Path(directory)
    with atomic_path(directory, folder=True) as tmp:
        tmp.mkdir()
        save_file(detector.heads_state_dict(), str(tmp / WEIGHTS_FILE))
        document = {"format": "vilbert-mobilenet-rcnn", "format_version": FORMAT_VERSION,
                    "trunk_weights_sha256": detector.regions.weights_info.get("weights_sha256"),
                    "config": detector.config.to_dict(), "results": results or {}}
        (tmp / CONFIG_FILE).write_text(json.dumps(document, indent=1), encoding="utf-8")
    return directory


def read_detector_config(directory: str | os.PathLike) -> tuple[RCNNConfig, dict]:
    """(config, the whole config.json) of a detector directory; every problem names the file."""
    path = Path(directory) / CONFIG_FILE
    if not Path(directory).is_dir():
        raise WeightsError(f"{directory}: no detector directory (train one with `make detector`)")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise WeightsError(f"{path}: missing (a detector directory holds {CONFIG_FILE} and {WEIGHTS_FILE})") from error
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise WeightsError(f"{path}: not a readable detector config ({error})") from error
    if not isinstance(document, dict) or document.get("format") != "vilbert-mobilenet-rcnn":
        raise WeightsError(f"{path}: not a mobilenet-rcnn detector config (format {document.get('format')!r})"
                           if isinstance(document, dict) else f"{path}: expected a JSON object")
    if document.get("format_version") != FORMAT_VERSION:
        raise WeightsError(f"{path}: detector format version {document.get('format_version')!r}, this code reads "
                           f"{FORMAT_VERSION}; retrain with `make detector`")
    if not isinstance(document.get("config"), dict):
        raise WeightsError(f"{path}: no \"config\" object")
    return RCNNConfig.from_dict(document["config"], str(path)), document


def load_detector(directory: str | os.PathLike, trunk_weights: str | os.PathLike | None = None,
                  random_trunk: bool = False) -> MobileNetRCNN:
    """A detector directory as a `MobileNetRCNN`; a missing, corrupt or foreign file raises one `WeightsError`."""
    directory = Path(directory)
    config, document = read_detector_config(directory)
    trunk = build_trunk(trunk_weights, random_init=random_trunk)
    expected = document.get("trunk_weights_sha256")
    found = trunk.weights_info.get("weights_sha256")
    if expected and found and expected != found:
        raise WeightsError(f"{directory / CONFIG_FILE}: trained on a MobileNetV2 trunk with sha256 {expected[:12]}..., "
                           f"but the trunk weights here have {found[:12]}...")
    weights = directory / WEIGHTS_FILE
    try:
        state = load_file(str(weights))
    except FileNotFoundError as error:
        raise WeightsError(f"{weights}: missing") from error
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise WeightsError(f"{weights}: not a readable safetensors file ({error})") from error
    detector = MobileNetRCNN(config, trunk, {"weights": str(directory), "weights_sha256": sha256_file(weights)})
    try:
        detector.heads.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise WeightsError(f"{weights}: does not fit the detector of {CONFIG_FILE} ({str(error)[:300]})") from error
    if not all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()):
        raise WeightsError(f"{weights}: holds non-finite weights")
    return detector.eval()


DEFAULT_DIRECTORY = Path("data/shapes/detector")  # where `make detector` writes; relative to the working directory


def build_shapes_detector(weights: str | None = None, trunk_weights: str | None = None, random_trunk: bool = False,
                          **options) -> MobileNetRCNN:
    """The registry's builder: the detector directory `weights` (default `data/shapes/detector`, where
    `make detector` writes it). Options override selection settings (`conf_threshold=0.5`, `max_boxes=36`)."""
    detector = load_detector(weights or DEFAULT_DIRECTORY, trunk_weights, random_trunk)
    rule_fields = {f.name for f in fields(SelectionRule)} - {"name"}
    unknown = sorted(set(options) - rule_fields)
    if unknown:
        raise FeaturesError(f"shapes: unknown option(s) {', '.join(unknown)}; options are the selection settings "
                            f"{', '.join(sorted(rule_fields))}")
    if options:
        try:
            detector.config.selection = SelectionRule(**{**detector.config.selection, **options}).as_dict()
        except (TypeError, ValueError) as error:
            raise FeaturesError(f"shapes: bad selection options: {error}") from error
    return detector


def world_mismatch(detector_world: dict | None, features_world: dict | None, where: str) -> str | None:
    """Why a detector trained on `detector_world` does not fit features of `features_world` (name, version and
    classes must agree), or None. Both are the opaque records training and extraction keep."""
    if not features_world:
        return None
    keys = ("name", "version", "classes")
    if detector_world and all(detector_world.get(k) == features_world.get(k) for k in keys):
        return None
    found = (detector_world or {}).get("version")
    return (f"{where}: a detector of {(detector_world or {}).get('name') or 'no'} world version {found}, but the "
            f"features come from {features_world.get('name')} world version {features_world.get('version')}; "
            f"retrain it (`make detector`)")


def detector_for_features(extractor: dict, directory: str | os.PathLike | None = None,
                          **options) -> MobileNetRCNN | None:
    """The detector that finds boxes for given-box MobileNetV2 features of a synthetic world (the extractor of a
    store extracted on the world's ground-truth boxes records the world): the directory's detector (default
    `data/shapes/detector`) when there is one, else None. A detector of another world or another trunk raises.
    `options` are `build_shapes_detector`'s."""
    world = extractor.get("world")
    if extractor.get("detector") != "mobilenet-v2" or extractor.get("boxes") != "given" or not world:
        return None
    directory = Path(directory or DEFAULT_DIRECTORY)
    if not directory.is_dir():
        return None
    detector = build_shapes_detector(str(directory), **options)
    problem = world_mismatch(detector.config.world, world, str(directory / CONFIG_FILE))
    if problem:
        raise WeightsError(problem)
    expected, found = extractor.get("weights_sha256"), detector.regions.weights_info.get("weights_sha256")
    if expected and found and expected != found:
        raise WeightsError(f"{directory / CONFIG_FILE}: its MobileNetV2 trunk ({found[:12]}...) is not the one the "
                           f"features were pooled with ({expected[:12]}...)")
    return detector


def _to_image(boxes: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
    """Boxes [K, 4] clipped to the original image (rounding of the detection size can reach past it)."""
    return clip_boxes_to_image(boxes, tuple(int(v) for v in image_hw))


def _image_list(maps: torch.Tensor, image_sizes: list[tuple[int, int]]) -> ImageList:
    """The `ImageList` torchvision's RPN wants, for trunk maps: only its padded size matters (anchor strides)."""
    padded = maps.new_zeros(1).expand(len(maps), 3, maps.shape[2] * TRUNK_STRIDE, maps.shape[3] * TRUNK_STRIDE)
    return ImageList(padded, image_sizes)
