"""Which detected regions an image keeps: the box-selection rules of the BUTD feature peers, as tensor functions.

Rule A (bottom-up-attention, Caffe `generate_tsv.py`): per-class NMS on the proposal boxes; each proposal's
`max_conf` is its best class score among the classes for which it survived NMS (0 if none); keep proposals with
`max_conf >= conf_threshold`, but at least `min_boxes` and at most `max_boxes` (the top ones by `max_conf`).
Fixed-K (e.g. 36 boxes) is rule A with `min_boxes = max_boxes = K`. Rule C (vqa-maskrcnn-benchmark, ViLBERT's
features): NMS 0.5, threshold 0, the top 100 by `max_conf`, sorted.

Everything runs on the device: one `batched_nms` over (proposal, class) pairs grouped by class (and image), and
`scatter_reduce` for `max_conf`. Background is column 0 of the score matrix and never counts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torchvision.ops import batched_nms

# A first pass keeps only (proposal, class) pairs scoring at least this much; see `max_confidence`.
PAIR_SCORE_FLOOR = 1e-3


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


def max_confidence(
    boxes: list[torch.Tensor], scores: list[torch.Tensor], nms_threshold: float, floor: float = 0.0
) -> list[torch.Tensor]:
    """Per-class NMS over every image at once; returns `max_conf` [P_i] per image.

    boxes[i] [P_i, 4] proposals; scores[i] [P_i, K+1] class probabilities, background at column 0.
    Only pairs with score >= `floor` (> 0 when `floor` is 0) take part. This is exact for every proposal whose
    true `max_conf` is >= `floor`: a pair can only be suppressed by a same-class pair scoring at least as much.
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
    keep = batched_nms(all_boxes[prop], pair_scores, image_of[prop] * num_fg + cls, nms_threshold)
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

    A first pass uses only pairs scoring >= min(PAIR_SCORE_FLOOR, conf_threshold) (a few thousand instead of
    P x K); images whose selection reaches below that floor are recomputed with every positive pair, so the
    result equals the full per-class NMS either way.
    """
    floor = min(PAIR_SCORE_FLOOR, rule.conf_threshold) if rule.conf_threshold > 0 else PAIR_SCORE_FLOOR
    confs = max_confidence(boxes, scores, rule.nms_threshold, floor)
    picks = [_pick(conf, rule) for conf in confs]
    redo = [i for i, (conf, keep) in enumerate(zip(confs, picks, strict=True)) if keep.numel() and conf[keep].min() < floor]
    if redo:
        exact = max_confidence([boxes[i] for i in redo], [scores[i] for i in redo], rule.nms_threshold, 0.0)
        for i, conf in zip(redo, exact, strict=True):
            confs[i], picks[i] = conf, _pick(conf, rule)
    return list(zip(picks, confs, strict=True))
