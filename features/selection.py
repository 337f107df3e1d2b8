"""Which detected regions an image keeps: the box-selection rules of the BUTD feature peers, as tensor functions.

Rule A (bottom-up-attention, Caffe `generate_tsv.py`): per-class NMS on the proposal boxes; each proposal's
`max_conf` is its best class score among the classes for which it survived NMS (0 if none); keep proposals with
`max_conf >= conf_threshold`, but at least `min_boxes` and at most `max_boxes` (the top ones by `max_conf`).
Fixed-K (e.g. 36 boxes) is rule A with `min_boxes = max_boxes = K`. Rule C (vqa-maskrcnn-benchmark, ViLBERT's
features): NMS 0.5, threshold 0, the top 100 by `max_conf`, sorted.

Everything runs on the device: one grouped NMS over (proposal, class) pairs grouped by class (and image), and
`scatter_reduce` for `max_conf`. Background is column 0 of the score matrix and never counts.

Only pairs scoring at least a floor take part, starting at the confidence threshold: a pair can only be suppressed
by a same-class pair scoring at least as much, so `max_conf` is exact for every proposal whose true value reaches
the floor. When a selection has to reach below the floor (fewer than `min_boxes` pass), the floor drops tenfold
and the image is redone, down to every positive pair. The result always equals Caffe's per-class loop, at a cost of
at most P / floor pairs per pass instead of P x K.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torchvision.ops import batched_nms, nms

# First floor when the threshold is 0 (rule C), and the last one before taking every positive pair.
START_FLOOR = 0.05
LAST_FLOOR = 1e-6
# On CUDA, NMS of up to this many pairs runs as one kernel (boxes of different groups shifted apart).
ONE_KERNEL_NMS_LIMIT = 40_000


@dataclass(frozen=True)
class SelectionRule:
    """Parameters of rule A / fixed-K / rule C. `sort_by_score` orders kept boxes by `max_conf` (rule C);
    otherwise boxes stay in proposal order unless the [min, max] clamp picks them by score (as Caffe does)."""

    name: str = "butd"
    nms_threshold: float = 0.3
    conf_threshold: float = 0.2
    min_boxes: int = 10
    max_boxes: int = 100
    sort_by_score: bool = False

    def __post_init__(self):
        if not 0 <= self.min_boxes <= self.max_boxes:
            raise ValueError(f"selection needs 0 <= min_boxes <= max_boxes, got {self.min_boxes}, {self.max_boxes}")
        if not 0.0 <= self.nms_threshold <= 1.0:
            raise ValueError(f"selection nms_threshold must be in [0, 1], got {self.nms_threshold}")

    def as_dict(self) -> dict:
        return asdict(self)


BUTD_RULE = SelectionRule()
VMB_RULE = SelectionRule(name="vmb", nms_threshold=0.5, conf_threshold=0.0, min_boxes=100, max_boxes=100,
                         sort_by_score=True)


def fixed_k_rule(k: int = 36, nms_threshold: float = 0.3, conf_threshold: float = 0.2) -> SelectionRule:
    """Fixed-K features (the 36-box BUTD set): rule A with min = max = K."""
    return SelectionRule(name=f"fixed-{k}", nms_threshold=nms_threshold, conf_threshold=conf_threshold,
                         min_boxes=k, max_boxes=k)


def rule_from_name(name: str, **overrides) -> SelectionRule:
    """`butd`, `vmb`, or `fixed-K`; keyword overrides replace single parameters."""
    if name == "butd":
        rule = BUTD_RULE
    elif name == "vmb":
        rule = VMB_RULE
    elif name.startswith("fixed-") and name[6:].isdigit():
        rule = fixed_k_rule(int(name[6:]))
    else:
        raise ValueError(f"unknown selection rule {name!r}; choose butd, vmb or fixed-K (e.g. fixed-36)")
    return SelectionRule(**{**rule.as_dict(), **{k: v for k, v in overrides.items() if v is not None}})


def grouped_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, threshold: float,
                one_kernel: bool | None = None) -> torch.Tensor:
    """NMS within each group; kept indices sorted by score. One kernel on CUDA (groups shifted apart in space),
    torchvision's per-group loop for large inputs on CPU, where one quadratic kernel would be slower."""
    if one_kernel is None:
        one_kernel = boxes.is_cuda and len(boxes) <= ONE_KERNEL_NMS_LIMIT
    if one_kernel and len(boxes) > 0:
        span = boxes.max() - boxes.min() + 1
        return nms(boxes + (groups.to(boxes) * span)[:, None], scores, threshold)
    return batched_nms(boxes, scores, groups, threshold)


def max_confidence(
    boxes: list[torch.Tensor], scores: list[torch.Tensor], nms_threshold: float, floor: float = 0.0
) -> list[torch.Tensor]:
    """Per-class NMS over every image at once; returns `max_conf` [P_i] per image.

    boxes[i] [P_i, 4] proposals; scores[i] [P_i, K+1] class probabilities, background at column 0.
    Only pairs with score >= `floor` (> 0 when `floor` is 0) take part; exact for every proposal whose true
    `max_conf` is >= `floor` (see the module docstring), 0 or a lower bound elsewhere.
    """
    counts = [b.shape[0] for b in boxes]
    if sum(counts) == 0:
        return [b.new_zeros(0) for b in boxes]
    all_boxes = torch.cat(boxes).float()  # [P, 4]
    fg = torch.cat(scores)[:, 1:].float()  # [P, K]
    num_fg = fg.shape[1]
    image_of = torch.repeat_interleave(torch.arange(len(boxes), device=fg.device),
                                       torch.tensor(counts, device=fg.device))  # [P]
    mask = fg >= floor if floor > 0 else fg > 0
    prop, cls = mask.nonzero(as_tuple=True)  # pairs [M]
    pair_scores = fg[prop, cls]
    keep = grouped_nms(all_boxes[prop], pair_scores, image_of[prop] * num_fg + cls, nms_threshold)
    max_conf = fg.new_zeros(fg.shape[0]).scatter_reduce(0, prop[keep], pair_scores[keep], "amax")
    return list(max_conf.split(counts))


def _pick(max_conf: torch.Tensor, rule: SelectionRule) -> torch.Tensor:
    """Indices kept for one image given exact `max_conf` [P]."""
    passing = (max_conf >= rule.conf_threshold).nonzero(as_tuple=True)[0]
    count = passing.numel()
    by_score = torch.sort(max_conf, descending=True, stable=True).indices  # ties: lower proposal index first
    if count < rule.min_boxes:
        return by_score[: rule.min_boxes]
    if count > rule.max_boxes:
        return by_score[: rule.max_boxes]
    if rule.sort_by_score:
        return by_score[:count]
    return passing


def select_regions(
    boxes: list[torch.Tensor], scores: list[torch.Tensor], rule: SelectionRule
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Apply `rule` to each image: returns (kept indices [k_i], max_conf [P_i]) per image.

    `max_conf` is exact wherever it is at least the last floor used for that image (every kept box's is).
    """
    results: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(boxes)
    pending = list(range(len(boxes)))
    floor = rule.conf_threshold if rule.conf_threshold > 0 else START_FLOOR
    while pending:
        confs = max_confidence([boxes[i] for i in pending], [scores[i] for i in pending], rule.nms_threshold, floor)
        still = []
        for i, conf in zip(pending, confs, strict=True):
            keep = _pick(conf, rule)
            if floor == 0 or keep.numel() == 0 or conf[keep].min() >= floor:
                results[i] = (keep, conf)
            else:
                still.append(i)
        pending = still
        floor = floor / 10 if floor / 10 >= LAST_FLOOR else 0.0
    return results
