"""Box-selection rules on hand-made score matrices, and against a per-class loop reference."""

import math

import pytest
import torch
from torchvision.ops import nms

from features.butd import argmax_class_boxes
from features.selection import (
    BUTD_RULE,
    VMB_RULE,
    SelectionRule,
    fixed_k_rule,
    max_confidence,
    maxnms_rule,
    rule_from_name,
    select_regions,
    two_stage_rule,
)


def _apart(n):
    """n disjoint boxes, so NMS suppresses nothing."""
    return torch.tensor([[20.0 * i, 0, 20.0 * i + 10, 10] for i in range(n)])


def _scores(fg):
    """Rows of foreground scores → [P, K+1] with the background column first."""
    fg = torch.tensor(fg, dtype=torch.float32)
    return torch.cat([(1 - fg.sum(1, keepdim=True)).clamp(min=0), fg], dim=1)


def _reference_max_conf(boxes, scores, t):
    """Caffe's generate_tsv loop: NMS per foreground class on the proposals."""
    max_conf = torch.zeros(len(boxes))
    for c in range(1, scores.shape[1]):
        keep = nms(boxes, scores[:, c], t)
        max_conf[keep] = torch.maximum(max_conf[keep], scores[keep, c])
    return max_conf


def _select(boxes, scores, rule):
    (keep, conf), = select_regions([boxes], [scores], rule)
    return keep.tolist(), conf


def test_background_column_never_counts():
    scores = torch.tensor([[0.9, 0.05, 0.05], [0.1, 0.3, 0.6]])
    conf = max_confidence([_apart(2)], [scores], 0.3)[0]
    assert conf.tolist() == pytest.approx([0.05, 0.6])


def test_box_suppressed_for_one_class_survives_for_another():
    boxes = torch.tensor([[0.0, 0, 10, 10], [0.0, 0, 10, 11]])  # IoU 0.91
    scores = _scores([[0.6, 0.1], [0.5, 0.3]])
    conf = max_confidence([boxes], [scores], 0.3)[0]
    # class 1: box 1 (0.5) suppressed by box 0 (0.6); class 2: box 1 (0.3) suppresses box 0 (0.1)
    assert conf.tolist() == pytest.approx([0.6, 0.3])


def test_box_suppressed_for_every_class_gets_zero():
    boxes = torch.tensor([[0.0, 0, 10, 10], [0.0, 0, 10, 11]])
    conf = max_confidence([boxes], [_scores([[0.6, 0.3], [0.5, 0.2]])], 0.3)[0]
    assert conf.tolist() == pytest.approx([0.6, 0.0])


def test_in_range_keeps_passing_boxes_in_proposal_order():
    rule = SelectionRule(min_boxes=1, max_boxes=5)
    keep, _ = _select(_apart(4), _scores([[0.25], [0.1], [0.9], [0.2]]), rule)
    assert keep == [0, 2, 3]  # threshold 0.2 is inclusive


def test_fewer_than_min_takes_top_min_by_score():
    rule = SelectionRule(min_boxes=3, max_boxes=5)
    keep, _ = _select(_apart(5), _scores([[0.05], [0.3], [0.1], [0.01], [0.15]]), rule)
    assert keep == [1, 4, 2]


def test_more_than_max_takes_top_max_by_score():
    rule = SelectionRule(min_boxes=1, max_boxes=2)
    keep, _ = _select(_apart(4), _scores([[0.5], [0.7], [0.6], [0.9]]), rule)
    assert keep == [3, 1]


def test_ties_at_the_cut_prefer_the_earlier_proposal():
    rule = fixed_k_rule(2)
    keep, _ = _select(_apart(4), _scores([[0.3], [0.5], [0.3], [0.3]]), rule)
    assert keep == [1, 0]


def test_fixed_k_with_fewer_proposals_returns_them_all():
    keep, _ = _select(_apart(3), _scores([[0.3], [0.5], [0.1]]), fixed_k_rule(36))
    assert sorted(keep) == [0, 1, 2]


def test_no_proposals_gives_no_regions():
    keep, conf = _select(torch.zeros(0, 4), torch.zeros(0, 3), BUTD_RULE)
    assert keep == [] and conf.numel() == 0


def test_vmb_rule_sorts_by_score_and_keeps_100():
    torch.manual_seed(1)
    boxes = _apart(150)
    scores = torch.softmax(torch.randn(150, 5), dim=1)
    keep, conf = _select(boxes, scores, VMB_RULE)
    assert len(keep) == 100
    assert torch.all(conf[keep][:-1] >= conf[keep][1:])


@pytest.mark.parametrize("rule", [BUTD_RULE, fixed_k_rule(36), VMB_RULE, SelectionRule(conf_threshold=0.0005)])
def test_matches_per_class_nms_loop_on_random_detections(rule):
    torch.manual_seed(0)
    xy = torch.rand(120, 2) * 100
    boxes = torch.cat([xy, xy + 10 + torch.rand(120, 2) * 40], dim=1)
    scores = torch.softmax(torch.randn(120, 31) * 3, dim=1)  # many small scores below the pair floor
    keep, conf = _select(boxes, scores, rule)
    ref = _reference_max_conf(boxes, scores, rule.nms_threshold)
    order = torch.sort(ref, descending=True, stable=True).indices
    passing = (ref >= rule.conf_threshold).nonzero().flatten()
    if len(passing) < rule.min_boxes:
        expected = order[: rule.min_boxes]
    elif len(passing) > rule.max_boxes:
        expected = order[: rule.max_boxes]
    else:
        expected = order[: len(passing)] if rule.sort_by_score else passing
    assert keep == expected.tolist()
    assert torch.allclose(conf[keep], ref[keep])


def test_tiny_scores_fall_back_to_every_positive_pair():
    boxes = _apart(4)
    scores = _scores([[1e-5, 2e-5], [3e-5, 1e-6], [5e-6, 4e-6], [2e-6, 0.0]])
    keep, conf = _select(boxes, scores, fixed_k_rule(3))
    assert keep == [1, 0, 2]
    assert conf[keep].tolist() == pytest.approx([3e-5, 2e-5, 5e-6])


def test_several_images_select_independently():
    torch.manual_seed(2)
    boxes = [_apart(30), _apart(5)]
    scores = [torch.softmax(torch.randn(30, 4) * 2, 1), torch.softmax(torch.randn(5, 4) * 2, 1)]
    together = select_regions(boxes, scores, BUTD_RULE)
    for b, s, (keep, conf) in zip(boxes, scores, together, strict=True):
        (alone_keep, alone_conf), = select_regions([b], [s], BUTD_RULE)
        assert keep.tolist() == alone_keep.tolist()
        assert torch.equal(conf, alone_conf)


def test_rule_names_and_overrides():
    assert rule_from_name("fixed-36").min_boxes == rule_from_name("fixed-36").max_boxes == 36
    assert rule_from_name("butd", max_boxes=50).max_boxes == 50
    with pytest.raises(ValueError, match="unknown selection rule"):
        rule_from_name("maxnms36")
    with pytest.raises(ValueError, match="unknown selection rule"):
        rule_from_name("fixed")
    with pytest.raises(ValueError, match="min_boxes <= max_boxes"):
        SelectionRule(min_boxes=5, max_boxes=2)


def test_one_kernel_grouped_nms_matches_per_group_nms():
    from torchvision.ops import batched_nms

    from features.selection import grouped_nms

    torch.manual_seed(3)
    xy = torch.rand(3000, 2) * 50
    boxes = torch.cat([xy, xy + 5 + torch.rand(3000, 2) * 20], dim=1)
    scores, groups = torch.rand(3000), torch.randint(0, 40, (3000,))
    shifted = grouped_nms(boxes, scores, groups, 0.4, one_kernel=True)
    assert shifted.tolist() == batched_nms(boxes, scores, groups, 0.4).tolist()


# ---------------------------------------------------------------------------------------------------------------
# Rule B (maxnms) and rule D (two-stage)


def _shifted(*xs):
    """10x10 boxes at the given x offsets: a shift of d gives IoU (10 - d) / (10 + d)."""
    return torch.tensor([[x, 0.0, x + 10, 10] for x in xs])


# proposal order D, B, A, C: A (0.9) at 0, B (0.8) at 4 (IoU 0.43 with A), C (0.7) at 30, D (0.6) at 31 (IoU 0.82)
RAISING_BOXES = _shifted(31, 4, 0, 30)
RAISING_SCORES = _scores([[0.6, 0.0], [0.0, 0.8], [0.9, 0.0], [0.1, 0.7]])


@pytest.mark.parametrize("k, expected", [(2, [2, 3]), (3, [2, 1, 3]), (4, [2, 1, 3, 0])])
def test_maxnms_raises_the_iou_until_k_boxes_survive(k, expected):
    # 0.3 and 0.4 keep A and C; 0.5 adds B (IoU 0.43); only 0.9 adds D (IoU 0.82)
    keep, conf = _select(RAISING_BOXES, RAISING_SCORES, maxnms_rule(k))
    assert keep == expected  # by score, not proposal order
    assert conf.tolist() == pytest.approx([0.6, 0.8, 0.9, 0.7])


def test_maxnms_keeps_the_top_k_by_score_at_the_first_iou_that_suffices():
    scores = _scores([[0.2, 0.1], [0.1, 0.7], [0.5, 0.3], [0.05, 0.3], [0.9, 0.0]])
    keep, _ = _select(_apart(5), scores, maxnms_rule(3))
    assert keep == [4, 1, 2]


def test_maxnms_suppresses_across_classes_using_the_arg_max_score():
    boxes = _shifted(0, 1)  # IoU 0.82
    scores = _scores([[0.5, 0.1], [0.0, 0.6]])  # different arg-max classes
    keep, _ = _select(boxes, scores, maxnms_rule(1))
    assert keep == [1]
    # per-class rules would keep both (each is the only box of its class above 0.2)
    assert sorted(_select(boxes, scores, SelectionRule(min_boxes=1, max_boxes=2))[0]) == [0, 1]


def test_maxnms_with_fewer_than_k_survivors_keeps_what_the_last_iou_leaves():
    assert _select(_apart(3), _scores([[0.3], [0.5], [0.1]]), maxnms_rule(36))[0] == [1, 0, 2]
    near_duplicates = _shifted(0, 0.2, 50)  # IoU 0.96 > 0.9: suppressed even at the last threshold
    assert _select(near_duplicates, _scores([[0.3], [0.5], [0.1]]), maxnms_rule(36))[0] == [1, 2]
    assert _select(torch.zeros(0, 4), torch.zeros(0, 3), maxnms_rule(36))[0] == []


def test_maxnms_images_of_a_batch_raise_their_iou_independently():
    boxes = [RAISING_BOXES, _apart(6), torch.zeros(0, 4)]
    scores = [RAISING_SCORES, torch.softmax(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), 1),
              torch.zeros(0, 3)]
    together = select_regions(boxes, scores, maxnms_rule(3))
    for b, s, (keep, conf) in zip(boxes, scores, together, strict=True):
        (alone, alone_conf), = select_regions([b], [s], maxnms_rule(3))
        assert keep.tolist() == alone.tolist() and torch.equal(conf, alone_conf)
    assert together[0][0].tolist() == [2, 1, 3]


def test_maxnms_score_threshold_and_proposal_order_options():
    rule = SelectionRule(**{**maxnms_rule(3).as_dict(), "conf_threshold": 0.65, "sort_by_score": False})
    assert _select(RAISING_BOXES, RAISING_SCORES, rule)[0] == [1, 2, 3]  # D (0.6) below the threshold


def test_two_stage_keeps_the_top_k_by_per_class_max_conf_zeros_included():
    boxes = _shifted(0, 1, 50)  # the regressed arg-max boxes; the first two overlap (IoU 0.82)
    scores = _scores([[0.9, 0.05], [0.8, 0.1], [0.3, 0.2]])
    # class 1: box 1 suppressed by box 0; class 2: box 1 (0.1) suppresses box 0 (0.05) -> max_conf 0.9, 0.1, 0.3
    assert _select(boxes, scores, two_stage_rule(2))[0] == [0, 2]
    assert _select(boxes, scores, two_stage_rule(3))[0] == [0, 2, 1]
    suppressed_everywhere = _scores([[0.9, 0.2], [0.8, 0.1], [0.3, 0.2]])
    keep, conf = _select(boxes, suppressed_everywhere, two_stage_rule(3))
    assert keep == [0, 2, 1] and conf[1] == 0  # MILVLG sorts every box, max_conf 0 included


def test_rule_b_and_d_names_and_parameters():
    b, d = rule_from_name("maxnms"), rule_from_name("two-stage")
    assert (b.name, b.min_boxes, b.max_boxes, b.nms, b.nms_boxes, b.pool_on) == (
        "maxnms-36", 36, 36, "class-agnostic", "regressed", "proposal")
    assert b.nms_schedule() == pytest.approx([0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    assert (d.name, d.max_boxes, d.nms_threshold, d.nms, d.nms_boxes, d.pool_on) == (
        "two-stage-100", 100, 0.3, "per-class", "regressed", "selected")
    assert rule_from_name("maxnms-10").max_boxes == 10 and rule_from_name("two-stage-36").min_boxes == 36
    assert rule_from_name("maxnms", max_nms_threshold=1.0).nms_schedule()[-1] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="pool_on"):
        rule_from_name("butd", pool_on="box")
    with pytest.raises(ValueError, match="max_nms_threshold"):
        rule_from_name("maxnms", max_nms_threshold=0.2)


def test_regressed_box_of_the_arg_max_foreground_class():
    rois = torch.tensor([[0.0, 0, 10, 10], [20.0, 20, 30, 40]])
    deltas = torch.zeros(2, 4, 4)  # [P, K+1, 4] with weights (1, 1, 1, 1): dx = class index, in widths
    deltas[:, :, 0] = torch.arange(4.0)
    deltas[1, 3, 3] = math.log(2)  # class 3 of proposal 1 doubles the height
    probs = torch.tensor([[0.7, 0.1, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]])  # background wins row 0: ignored
    boxes = argmax_class_boxes(rois, deltas.view(2, 16), probs, torch.tensor([100.0, 100.0]), (1, 1, 1, 1))
    torch.testing.assert_close(boxes, torch.tensor([[20.0, 0, 30, 10], [50.0, 10, 60, 50]]))
    clipped = argmax_class_boxes(rois, deltas.view(2, 16), probs, torch.tensor([45.0, 55.0]), (1, 1, 1, 1))
    torch.testing.assert_close(clipped, torch.tensor([[20.0, 0, 30, 10], [50.0, 10, 55, 45]]))
