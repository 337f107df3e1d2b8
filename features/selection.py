"""Which detected regions an image keeps: the box-selection rules of the BUTD feature peers, as tensor functions.

Rule A (bottom-up-attention, Caffe `generate_tsv.py`): per-class NMS on the proposal boxes; each proposal's
`max_conf` is its best class score among the classes for which it survived NMS (0 if none); keep proposals with
`max_conf >= conf_threshold`, but at least `min_boxes` and at most `max_boxes` (the top ones by `max_conf`).
Fixed-K (e.g. 36 boxes) is rule A with `min_boxes = max_boxes = K`. Rule C (vqa-maskrcnn-benchmark, ViLBERT's
features): NMS 0.5, threshold 0, the top 100 by `max_conf`, sorted.

Rule B (airsplay's `maxnms`, the HF LXMERT port): each proposal stands for its arg-max foreground class c*, with
the box regressed for c* and the score S[i, c*]; one class-agnostic NMS starting at IoU 0.3, raised by 0.1 (up to
0.9) until at least `min_boxes` survive; the top `max_boxes` by score. Features still come from the proposals.
Rule D (MILVLG's two-stage `bboxes` mode): rule C's per-class NMS (0.3) and top-K run on the regressed arg-max
boxes instead of the proposals; features are then pooled again on the kept boxes (`pool_on="selected"`).
The rules here only pick indices: the caller passes the boxes a rule asks for (`nms_boxes`) and does the pooling.

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


NMS_KINDS = ("per-class", "class-agnostic")
BOX_KINDS = ("proposal", "regressed")
POOL_ON = ("proposal", "selected")


@dataclass(frozen=True)
class SelectionRule:
    """Parameters of rules A-D. `sort_by_score` orders kept boxes by score (rules B-D); otherwise boxes stay in
    proposal order unless the [min, max] clamp picks them by score (as Caffe does).

    `nms` is `per-class` (A, C, D) or `class-agnostic` (B: arg-max class score, IoU raised from `nms_threshold` by
    `nms_step` up to `max_nms_threshold` until `min_boxes` survive). `nms_boxes` says which boxes NMS sees: the
    proposals or each proposal's regressed arg-max box. `pool_on="selected"` pools the features again on the kept
    (stored) boxes instead of taking them from the proposals (rule D's second stage).
    """

    name: str = "butd"
    nms_threshold: float = 0.3
    conf_threshold: float = 0.2
    min_boxes: int = 10
    max_boxes: int = 100
    sort_by_score: bool = False
    nms: str = "per-class"
    nms_boxes: str = "proposal"
    nms_step: float = 0.1  # class-agnostic only
    max_nms_threshold: float = 0.9  # class-agnostic only
    pool_on: str = "proposal"

    def __post_init__(self):
        if not 0 <= self.min_boxes <= self.max_boxes:
            raise ValueError(f"selection needs 0 <= min_boxes <= max_boxes, got {self.min_boxes}, {self.max_boxes}")
        if not 0.0 <= self.nms_threshold <= 1.0:
            raise ValueError(f"selection nms_threshold must be in [0, 1], got {self.nms_threshold}")
        for field_name, allowed in (("nms", NMS_KINDS), ("nms_boxes", BOX_KINDS), ("pool_on", POOL_ON)):
            if getattr(self, field_name) not in allowed:
                raise ValueError(f"selection {field_name} must be one of {', '.join(allowed)}, "
                                 f"got {getattr(self, field_name)!r}")
        if self.nms == "class-agnostic" and not (self.nms_step > 0 and
                                                 self.nms_threshold <= self.max_nms_threshold <= 1.0):
            raise ValueError(f"class-agnostic selection needs nms_step > 0 and nms_threshold <= max_nms_threshold "
                             f"<= 1, got {self.nms_step}, {self.nms_threshold}, {self.max_nms_threshold}")

    def as_dict(self) -> dict:
        return asdict(self)

    def nms_schedule(self) -> list[float]:
        """IoU thresholds tried in turn by the class-agnostic rule: start, start + step, ... up to the maximum."""
        steps = int((self.max_nms_threshold - self.nms_threshold) / self.nms_step + 1e-6)
        return [round(self.nms_threshold + k * self.nms_step, 6) for k in range(steps + 1)]


BUTD_RULE = SelectionRule()
VMB_RULE = SelectionRule(name="vmb", nms_threshold=0.5, conf_threshold=0.0, min_boxes=100, max_boxes=100,
                         sort_by_score=True)


def fixed_k_rule(k: int = 36, nms_threshold: float = 0.3, conf_threshold: float = 0.2) -> SelectionRule:
    """Fixed-K features (the 36-box BUTD set): rule A with min = max = K."""
    return SelectionRule(name=f"fixed-{k}", nms_threshold=nms_threshold, conf_threshold=conf_threshold,
                         min_boxes=k, max_boxes=k)


def maxnms_rule(k: int = 36) -> SelectionRule:
    """Rule B, airsplay's fixed-K "maxnms" (LXMERT's 36-box features): see the module docstring.

    No score threshold (airsplay passes 0.2 but never applies it). If even the last IoU (0.9) leaves fewer than K
    boxes, which is always the case for an image with fewer than K proposals, the image keeps the boxes that survive
    it: fewer than K regions, never padded or repeated (airsplay's behaviour).
    """
    return SelectionRule(name=f"maxnms-{k}", nms_threshold=0.3, conf_threshold=0.0, min_boxes=k, max_boxes=k,
                         sort_by_score=True, nms="class-agnostic", nms_boxes="regressed")


def two_stage_rule(k: int = 100) -> SelectionRule:
    """Rule D, MILVLG's `bboxes` + `bbox_feats`: per-class NMS 0.3 on the regressed arg-max boxes, the top K by
    `max_conf` (no threshold, no minimum), then features pooled on those boxes."""
    return SelectionRule(name=f"two-stage-{k}", nms_threshold=0.3, conf_threshold=0.0, min_boxes=k, max_boxes=k,
                         sort_by_score=True, nms_boxes="regressed", pool_on="selected")


RULE_NAMES = "butd, vmb, fixed-K, maxnms[-K] or two-stage[-K] (e.g. fixed-36, maxnms-36, two-stage-100)"


def rule_from_name(name: str, **overrides) -> SelectionRule:
    """`butd`, `vmb`, `fixed-K`, `maxnms[-K]` (K = 36) or `two-stage[-K]` (K = 100); keyword overrides replace
    single parameters."""
    family, _, count = name.rpartition("-") if name[-1:].isdigit() else (name, "", "")
    if name == "butd":
        rule = BUTD_RULE
    elif name == "vmb":
        rule = VMB_RULE
    elif family == "fixed" and count:
        rule = fixed_k_rule(int(count))
    elif family == "maxnms":
        rule = maxnms_rule(int(count or 36))
    elif family == "two-stage":
        rule = two_stage_rule(int(count or 100))
    else:
        raise ValueError(f"unknown selection rule {name!r}; choose {RULE_NAMES}")
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
    """Apply `rule` to each image: returns (kept indices [k_i], score [P_i]) per image.

    boxes[i] [P_i, 4] are the boxes NMS sees (`rule.nms_boxes`: proposals, or the regressed arg-max boxes);
    scores[i] [P_i, K+1] class probabilities, background first. The score is `max_conf` for per-class rules (exact
    wherever it is at least the last floor used for that image, so for every kept box), the arg-max foreground
    probability S[i, c*] for the class-agnostic rule.
    """
    if rule.nms == "class-agnostic":
        return max_class_nms(boxes, scores, rule)
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


def max_class_nms(
    boxes: list[torch.Tensor], scores: list[torch.Tensor], rule: SelectionRule
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rule B: one class-agnostic NMS per image on (box, S[i, c*]), the IoU raised along `rule.nms_schedule()` for
    the images that still have fewer than `min_boxes` survivors; the top `max_boxes` by score. Same output as
    `select_regions`; every image of the batch goes through one grouped NMS per threshold."""
    conf = [s[:, 1:].float().max(dim=1).values if s.shape[1] > 1 else s.new_zeros(len(s)) for s in scores]  # [P_i]
    results: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(boxes)
    pending = list(range(len(boxes)))
    schedule = rule.nms_schedule()
    for step, threshold in enumerate(schedule):
        last = step == len(schedule) - 1
        survivors = _class_agnostic_nms([boxes[i] for i in pending], [conf[i] for i in pending], threshold,
                                        rule.conf_threshold)
        still = []
        for i, keep in zip(pending, survivors, strict=True):
            if keep.numel() >= rule.min_boxes or last:
                keep = keep[: rule.max_boxes]
                results[i] = (keep if rule.sort_by_score else keep.sort().values, conf[i])
            else:
                still.append(i)
        pending = still
        if not pending:
            break
    return results


def _class_agnostic_nms(boxes: list[torch.Tensor], conf: list[torch.Tensor], threshold: float,
                        conf_threshold: float) -> list[torch.Tensor]:
    """NMS within each image over the boxes scoring at least `conf_threshold`; kept indices per image, by score
    (ties: lower index first)."""
    counts = [len(c) for c in conf]
    if sum(counts) == 0:
        return [c.new_zeros(0, dtype=torch.long) for c in conf]
    all_conf = torch.cat(conf)  # [P]
    image_of = torch.repeat_interleave(torch.arange(len(conf), device=all_conf.device),
                                       torch.tensor(counts, device=all_conf.device))  # [P]
    candidates = (all_conf >= conf_threshold).nonzero(as_tuple=True)[0]
    # stable order by score so that equal scores keep the lower index, whatever order NMS sorts ties in
    candidates = candidates[torch.sort(all_conf[candidates], descending=True, stable=True).indices]
    rank = torch.arange(len(candidates), 0, -1, device=all_conf.device, dtype=torch.float32)
    kept = candidates[grouped_nms(torch.cat(boxes).float()[candidates], rank, image_of[candidates], threshold)]
    starts = torch.tensor([0, *counts[:-1]], device=all_conf.device).cumsum(0)
    kept = kept[torch.sort(image_of[kept], stable=True).indices]  # grouped by image, score order inside
    per_image = kept.split(torch.bincount(image_of[kept], minlength=len(conf)).tolist())
    return [k - start for k, start in zip(per_image, starts.tolist(), strict=True)]
