"""The VMB X-152 FPN detector's steps against hand-computed cases."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from features.selection import VMB_RULE, SelectionRule
from features.vmb import (
    DELTA_CLAMP,
    RegionProposalNetwork,
    VMBConfig,
    VMBDetector,
    VMBModel,
    clip_legacy,
    decode_legacy,
    fork_cell_anchors,
    fpn_levels,
    grid_anchors,
    level_candidates,
    nms_and_top_n,
    resize_like_cv2,
    resize_scale,
    select_proposals,
)

# reference appendix: the fork's generator (sizes 32..512, strides 4..64, ratios 0.5 / 1 / 2)
APPENDIX_ANCHORS = {
    (4, 32): [[-22, -10, 25, 13], [-14, -14, 17, 17], [-10, -22, 13, 25]],
    (8, 64): [[-40, -20, 47, 27], [-28, -28, 35, 35], [-20, -44, 27, 51]],
    (16, 128): [[-84, -40, 99, 55], [-56, -56, 71, 71], [-36, -80, 51, 95]],
    (32, 256): [[-164, -72, 195, 103], [-112, -112, 143, 143], [-76, -168, 107, 199]],
    (64, 512): [[-332, -152, 395, 215], [-224, -224, 287, 287], [-148, -328, 211, 391]],
}


@pytest.mark.parametrize("stride, size", list(APPENDIX_ANCHORS))
def test_cell_anchors_are_the_forks(stride, size):
    anchors = fork_cell_anchors(stride, size, (0.5, 1.0, 2.0))
    assert anchors.tolist() == APPENDIX_ANCHORS[stride, size]


def test_model_holds_one_cell_anchor_buffer_per_level_and_uses_them_over_the_grid():
    model = VMBModel(VMBConfig.tiny())
    buffers = dict(model.named_buffers())
    assert [k for k in buffers if "cell_anchors" in k] == [f"rpn.anchor_generator.cell_anchors.{i}" for i in range(5)]
    # a checkpoint's buffer replaces the generated one: its values, shifted by the level's stride
    model.rpn.anchor_generator.cell_anchors.get_buffer("1").copy_(torch.tensor([[-1.0, -2, 3, 4]] * 3))
    anchors = model.rpn.anchor_generator.level_anchors(1, 1, 2)  # stride 8, one row, two columns
    assert anchors.tolist() == [[-1, -2, 3, 4]] * 3 + [[7, -2, 11, 4]] * 3


def test_grid_anchors_are_location_major_then_anchor():
    cell = torch.tensor([[0.0, 0, 1, 1], [-1.0, -1, 2, 2]])
    anchors = grid_anchors(cell, stride=4, height=2, width=2)
    assert anchors.tolist() == [
        [0, 0, 1, 1], [-1, -1, 2, 2],  # (y 0, x 0)
        [4, 0, 5, 1], [3, -1, 6, 2],  # (y 0, x 4)
        [0, 4, 1, 5], [-1, 3, 2, 6],  # (y 4, x 0)
        [4, 4, 5, 5], [3, 3, 6, 6],  # (y 4, x 4)
    ]


def test_decoding_uses_plus_one_widths_and_minus_one_corners():
    anchor = torch.tensor([[0.0, 0, 9, 19]])  # width 10, height 20, centre (5, 10)
    assert decode_legacy(torch.zeros(1, 4), anchor).tolist() == [[0, 0, 9, 19]]
    moved = decode_legacy(torch.tensor([[0.1, -0.2, math.log(2), 0.0]]), anchor)
    # centre x 5 + 0.1 * 10 = 6, width 20: 6 - 10 = -4, 6 + 10 - 1 = 15; centre y 10 - 4 = 6, height 20
    assert torch.allclose(moved, torch.tensor([[-4.0, -4, 15, 15]]))
    huge = decode_legacy(torch.tensor([[0.0, 0.0, 10.0, 0.0]]), anchor)  # dw clamped at log(1000 / 16)
    width = 10 * math.exp(DELTA_CLAMP)
    assert torch.allclose(huge[0, [0, 2]], torch.tensor([5 - width / 2, 5 + width / 2 - 1]))


def test_clipping_clamps_to_size_minus_one_and_removes_nothing():
    boxes = torch.tensor([[-5.0, 3, 40, 50], [40, 40, 50, 50], [2, 2, 5, 5]])
    assert clip_legacy(boxes, 32, 48).tolist() == [[0, 3, 40, 31], [40, 31, 47, 31], [2, 2, 5, 5]]


def test_rpn_nms_uses_plus_one_iou():
    boxes = torch.tensor([[[0.0, 0, 9, 9], [5, 0, 14, 9]]])
    logits, level = torch.tensor([[0.9, 0.8]]), torch.tensor([0, 0])
    # "+1": intersection 5 x 10 = 50, union 150, IoU 1/3; continuous: 36 / 126 = 0.29
    (kept,) = nms_and_top_n(boxes, logits, level, VMBConfig.tiny(rpn_nms_threshold=0.3))
    assert kept.tolist() == [[0, 0, 9, 9]]
    (kept,) = nms_and_top_n(boxes, logits, level, VMBConfig.tiny(rpn_nms_threshold=0.34))
    assert len(kept) == 2


@pytest.mark.parametrize("side, level", [
    (10, 0), (111, 0), (112, 1),  # sqrt of the "+1" area 112 = 224 / 2 is the P2 / P3 boundary
    (223, 1), (224, 2), (447, 2), (448, 3), (2000, 3),  # P4 from 224, P5 from 448, clamped at P5
])
def test_level_assignment_at_the_boundaries(side, level):
    box = torch.tensor([[0.0, 0.0, side - 1, side - 1]])  # "+1" side = side
    assert fpn_levels(box).tolist() == [level]


def test_level_candidates_take_the_top_n_per_image_then_decode_and_clip():
    anchors = torch.tensor([[0.0, 0, 9, 9], [0, 0, 9, 8], [20, 20, 29, 29], [40, 40, 49, 49], [60, 60, 69, 69]])
    logits = torch.tensor([[0.9, 0.8, 0.1, 0.7, 0.95], [0.1, 0.2, 0.3, 0.4, 0.5]])
    deltas = torch.zeros(2, 5, 4)
    deltas[1, 4, 2] = math.log(2)  # image 1's best anchor doubles in width: 65 +- 10 -> [55, 60, 74, 69]
    boxes, top = level_candidates(logits, deltas, anchors, torch.tensor([[100.0, 100], [100, 70]]), 3)
    assert top.tolist() == [pytest.approx([0.95, 0.9, 0.8]), pytest.approx([0.5, 0.4, 0.3])]
    assert boxes[0].tolist() == [[60, 60, 69, 69], [0, 0, 9, 9], [0, 0, 9, 8]]
    assert boxes[1].tolist() == [[55, 60, 69, 69], [40, 40, 49, 49], [20, 20, 29, 29]]  # x2 74 clipped to 69


def test_nms_then_top_n_per_level_then_per_image():
    config = VMBConfig.tiny(rpn_nms_threshold=0.7, rpn_post_nms_top_n=2, rpn_fpn_post_nms_top_n=3)
    a, a_twin, b, c = [0.0, 0, 9, 9], [0.0, 0, 9, 8], [20.0, 20, 29, 29], [40.0, 40, 49, 49]
    # two images; P2 holds four candidates, P3 two
    boxes = torch.tensor([[a, a_twin, b, c, b, c], [a, b, c, a, b, c]])
    logits = torch.tensor([[0.9, 0.8, 0.5, 0.4, 0.6, 0.7], [0.1, 0.2, 0.3, 0.9, 0.8, 0.7]])
    level = torch.tensor([0, 0, 0, 0, 1, 1])
    first, second = nms_and_top_n(boxes, logits, level, config)
    # image 0, P2: NMS drops a's twin (IoU 0.9), the cap keeps a 0.9 and b 0.5; P3 keeps c 0.7 and b 0.6;
    # the image's top 3: a, c, b (P3's b outscores P2's)
    assert first.tolist() == [a, c, b]
    # image 1, P2: a 0.9 suppresses its copy a 0.1, the cap keeps a 0.9 and c 0.3; P3 b 0.8, c 0.7
    assert second.tolist() == [a, b, c]


def test_rpn_caps_each_level_then_keeps_the_images_top_n():
    config = VMBConfig.tiny(anchor_ratios=(1.0,), anchor_sizes=(8, 16, 32, 64, 128), rpn_pre_nms_top_n=2,
                            rpn_post_nms_top_n=1, rpn_fpn_post_nms_top_n=3)
    rpn = RegionProposalNetwork(config)

    class Head(nn.Module):  # objectness = the level's own values, deltas zero: proposals are the anchors
        def forward(self, x):
            return x[:, :1], torch.zeros(x.shape[0], 4, *x.shape[2:])

    rpn.head = Head()
    logits = [[0.1, 0.9], [0.8, 0.2], [0.3, 0.4], [0.7, 0.05], [0.6, 0.65]]  # P2..P6, one row of two cells
    levels = [torch.tensor(v).view(1, 1, 1, 2) for v in logits]
    (boxes,) = rpn(levels, [(1000, 1000)])
    # per level the best one survives (0.9, 0.8, 0.4, 0.7, 0.65); the image keeps the top 3, best first:
    # P2 cell 1 (stride 4, size 8: [-2, -2, 5, 5] + 4 in x), P3 cell 0 (stride 8), P5 cell 0 (stride 32), clipped
    assert boxes.tolist() == [[2, 0, 9, 5], [0, 0, 11, 11], [0, 0, 47, 47]]


def test_resize_scale_follows_the_scripts_rounded_cap():
    assert resize_scale(480, 640, 800, 1333) == pytest.approx(800 / 480)
    assert resize_scale(500, 1000, 800, 1333) == pytest.approx(1333 / 1000)
    # 800 / 600 * 1000 = 1333.3 rounds to 1333, not above the cap: the short side still goes to 800
    assert resize_scale(600, 1000, 800, 1333) == pytest.approx(800 / 600)


def test_resize_samples_where_cv2_does():
    row = torch.tensor([0.0, 10, 20, 30]).view(1, 1, 4)
    out = resize_like_cv2(row, 1.5)  # 4 -> 6 wide, 1 -> 2 high; source x = (x + 0.5) / 1.5 - 0.5
    assert out.shape == (1, 2, 6)
    assert torch.allclose(out[0, 0], torch.tensor([0.0, 5, 35 / 3, 55 / 3, 25, 30]))


def test_prepare_gives_bgr_minus_the_means_padded_to_32():
    det = VMBDetector(VMBConfig.tiny(min_size=20, max_size=40))
    image = np.zeros((20, 30, 3), dtype=np.uint8)
    image[..., 0] = 255  # red
    prepared = det.prepare(image)
    assert prepared.scale == 1.0 and prepared.pixels.shape == (3, 20, 30) and prepared.image_hw == (20, 30)
    assert torch.allclose(prepared.pixels[:, 0, 0], torch.tensor([-102.9801, -115.9465, 255 - 122.7717]))
    other = det.prepare(np.zeros((10, 10, 3), dtype=np.uint8))  # scaled 2x to 20 x 20
    from features.detector import pad_batch

    batch = pad_batch([prepared, other], det.size_divisible)
    assert batch.shape == (2, 3, 32, 32)
    assert det.clip_sizes(batch, [prepared, other]) == [(32, 32), (32, 32)]
    det.config.clip_to = "batch"
    assert det.clip_sizes(torch.zeros(2, 3, 64, 96), [prepared, other]) == [(64, 96), (64, 96)]


def test_selection_suppresses_per_class_on_plus_one_iou_and_keeps_the_top_n():
    a, b, c = [0.0, 0, 9, 9], [3.0, 0, 12, 9], [50.0, 50, 60, 60]  # a-b: "+1" IoU 0.54, continuous 0.5
    boxes = torch.tensor([a, b, c])
    probs = torch.tensor([[0.3, 0.6, 0.1], [0.45, 0.5, 0.05], [0.8, 0.05, 0.15]])  # background first
    (keep,) = select_proposals([boxes], [probs], VMB_RULE)
    # a suppresses b in both classes (IoU 0.54 > 0.5; continuous IoU would not); c's best is 0.15
    assert keep.tolist() == [0, 2, 1]  # sorted by max_conf: a 0.6, c 0.15, b 0 (fills the top 100)
    # across classes: b survives through class 2 where it outscores a
    probs[1] = torch.tensor([0.3, 0.4, 0.3])
    (keep,) = select_proposals([boxes], [probs], VMB_RULE)
    assert keep.tolist() == [0, 1, 2]  # a 0.6, b 0.3 (class 2), c 0.15
    # a threshold with a minimum: 0.5 passes only a, but at least 2 boxes are kept
    rule = SelectionRule(**{**VMB_RULE.as_dict(), "conf_threshold": 0.5, "min_boxes": 2})
    (keep,) = select_proposals([boxes], [probs], rule)
    assert keep.tolist() == [0, 1]
    rule = SelectionRule(**{**VMB_RULE.as_dict(), "min_boxes": 1, "max_boxes": 1})
    assert select_proposals([boxes], [probs], rule)[0].tolist() == [0]
