"""The VMB X-152 FPN detector: its steps against hand-computed cases; `vilbert extract --detector vmb-x152-fpn` end to
end on the tiny preset; loading the 810-key full-size file."""

import json
import logging
import math
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from features.detector import pad_batch
from features.detectors import build_detector
from features.errors import WeightsError
from features.selection import VMB_RULE, SelectionRule, fixed_k_rule
from features.store import FeatureStore
from features.vmb import (
    DELTA_CLAMP,
    RegionProposalNetwork,
    VMBConfig,
    VMBDetector,
    VMBModel,
    build_vmb_x152_fpn,
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
from tasks.cli import main
from tests.fixtures.vmb_weights import random_vmb_state, reference_keys, write_random_vmb_weights

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


IMAGES = {"wide": (90, 130), "tall": (140, 80), "square": (100, 100)}


@pytest.fixture
def image_dir(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for name, hw in IMAGES.items():
        pixels = np.full((*hw, 3), 200, np.uint8)
        for _ in range(4):  # a few flat rectangles, so proposals have something to find
            y, x = rng.integers(0, hw[0] // 2), rng.integers(0, hw[1] // 2)
            pixels[y : y + hw[0] // 3, x : x + hw[1] // 3] = rng.integers(0, 256, 3)
        Image.fromarray(pixels).save(folder / f"{name}.png")
    return folder


@pytest.fixture
def tiny_weights(tmp_path):
    """The tiny network with every tensor random (BN statistics too), in the fork's checkpoint layout."""
    gen = torch.Generator().manual_seed(7)
    state = VMBDetector(VMBConfig.tiny()).model.state_dict()
    for name, t in state.items():
        if name.endswith("running_var"):
            t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
        elif name.endswith(("running_mean", "bias")) and "cell_anchors" not in name:
            t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
    path = tmp_path / "tiny_vmb.pth"
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "iteration": 90000}, path)
    return path


def _extract(image_dir, out, weights, *extra):
    return main(["extract", "--images", str(image_dir), "--out", str(out), "--detector", "vmb-x152-fpn",
                 "--weights", str(weights), "--option", "preset=tiny", "--workers", "0", "--batch-size", "2",
                 "--float32", "--no-progress", *extra])


def _read_all(path):
    store = FeatureStore(path)
    return {i: store.read(i) for i in store.ids}, store.extractor


def test_extraction_is_deterministic_and_the_store_round_trips(image_dir, tiny_weights, tmp_path):
    assert _extract(image_dir, tmp_path / "a.h5", tiny_weights) == 0
    assert _extract(image_dir, tmp_path / "b.h5", tiny_weights) == 0
    first, info = _read_all(tmp_path / "a.h5")
    second, _ = _read_all(tmp_path / "b.h5")
    assert sorted(first) == sorted(IMAGES)
    for image_id, regions in first.items():
        other = second[image_id]
        for field in ("features", "boxes", "cls_prob", "objects_id", "objects_conf"):
            np.testing.assert_array_equal(getattr(regions, field), getattr(other, field))
        assert regions.image_hw == IMAGES[image_id]
        assert regions.features.shape == (100, 32) and regions.cls_prob.shape == (100, 7)
        np.testing.assert_allclose(regions.cls_prob.sum(axis=1), 1.0, atol=2e-3)  # stored float16
        np.testing.assert_array_equal(regions.objects_id, regions.cls_prob[:, 1:].argmax(axis=1) + 1)
        assert (regions.features >= 0).all()  # fc6 after its ReLU
        # proposals in original pixels: inside the image itself, although the RPN clips to its padded size (a
        # multiple of 32, which none of these sizes is)
        h, w = regions.image_hw
        assert (regions.boxes >= 0).all()
        assert (regions.boxes[:, 2] <= w).all() and (regions.boxes[:, 3] <= h).all()
    assert info["detector"] == "vmb-x152-fpn" and info["feature"] == "fc6 after ReLU"
    assert info["weights"]["file"] == "tiny_vmb.pth" and len(info["weights"]["sha256"]) == 64
    assert info["selection"]["name"] == "vmb" and info["selection"]["nms_threshold"] == 0.5
    assert info["config"]["min_size"] == 160 and info["input"]["size_divisible"] == 32


def test_given_boxes_skip_the_rpn_and_match_the_detected_features(image_dir, tiny_weights, tmp_path):
    assert _extract(image_dir, tmp_path / "detected.h5", tiny_weights) == 0
    detected, _ = _read_all(tmp_path / "detected.h5")
    given = {}
    for image_id, regions in detected.items():
        h, w = regions.image_hw
        inside = (regions.boxes[:, 2] < w) & (regions.boxes[:, 3] < h)  # not clipped to the image
        given[image_id] = np.flatnonzero(inside)[:8]
    boxes_file = tmp_path / "boxes.json"
    boxes_file.write_text(json.dumps({i: detected[i].boxes[rows].tolist() for i, rows in given.items()}))
    for out in ("given1.h5", "given2.h5"):
        assert _extract(image_dir, tmp_path / out, tiny_weights, "--boxes", str(boxes_file),
                        "--box-format", "xyxy") == 0
    once, info = _read_all(tmp_path / "given1.h5")
    twice, _ = _read_all(tmp_path / "given2.h5")
    assert info["given_boxes"]["format"] == "xyxy"
    for image_id, rows in given.items():
        np.testing.assert_array_equal(once[image_id].features, twice[image_id].features)
        np.testing.assert_allclose(once[image_id].boxes, detected[image_id].boxes[rows])
        # the same boxes pooled in the detection pass (up to the float rounding of boxes * scale / scale)
        np.testing.assert_allclose(once[image_id].features, detected[image_id].features[rows], rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(once[image_id].cls_prob, detected[image_id].cls_prob[rows], atol=1e-4)


def test_config_yaml_values_replace_the_defaults(image_dir, tiny_weights, tmp_path):
    yaml_file = tmp_path / "detectron_config.yaml"
    yaml_file.write_text(
        "MODEL:\n  META_ARCHITECTURE: GeneralizedRCNN\n"
        "  RPN:\n    USE_FPN: true\n    PRE_NMS_TOP_N_TEST: 100\n    POST_NMS_TOP_N_TEST: 10\n"
        "    FPN_POST_NMS_TOP_N_TEST: 20\n    NMS_THRESH: 0.6\n"
        "  RESNETS:\n    STRIDE_IN_1X1: true\n"
        "  ROI_BOX_HEAD:\n    POOLER_SAMPLING_RATIO: 1\n"
        "INPUT:\n  MIN_SIZE_TEST: 600\n")
    assert _extract(image_dir, tmp_path / "c.h5", tiny_weights, "--config", str(yaml_file)) == 0
    regions, info = _read_all(tmp_path / "c.h5")
    config = info["config"]
    assert (config["rpn_pre_nms_top_n"], config["rpn_post_nms_top_n"], config["rpn_fpn_post_nms_top_n"]) == (
        100, 10, 20)
    assert config["rpn_nms_threshold"] == 0.6 and config["stride_in_1x1"] is True
    assert config["pooler_sampling_ratio"] == 1 and config["min_size"] == 160  # INPUT.* is the script's, not read
    assert info["weights"]["config_file"]["file"] == "detectron_config.yaml"
    assert all(len(r.boxes) == 20 for r in regions.values())  # at most 20 proposals per image
    det = build_detector("vmb-x152-fpn", preset="tiny", config_file=str(yaml_file))
    assert det.model.backbone.body.layer2[0].conv1.stride == (2, 2)  # STRIDE_IN_1X1: the 1x1 conv strides
    assert det.model.backbone.body.layer2[0].conv2.stride == (1, 1)


def test_bad_config_yaml_is_one_error(image_dir, tmp_path, capsys):
    yaml_file = tmp_path / "bad.yaml"
    yaml_file.write_text("MODEL:\n  BACKBONE:\n    CONV_BODY: R-50-C4\n")
    code = main(["extract", "--images", str(image_dir), "--out", str(tmp_path / "x.h5"), "--detector",
                 "vmb-x152-fpn", "--config", str(yaml_file), "--option", "preset=tiny"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "bad.yaml" in err[0] and "R-50-C4" in err[0]


def test_loading_strips_module_ignores_extras_and_names_missing_tensors(tiny_weights, tmp_path, caplog):
    det = build_vmb_x152_fpn(str(tiny_weights), preset="tiny")
    saved = torch.load(tiny_weights, weights_only=True)["model"]
    for name, value in det.model.state_dict().items():
        assert torch.equal(value, saved[f"module.{name}"]), name

    state = {k.removeprefix("module."): v for k, v in saved.items()}
    extra = {**state, "roi_heads.box.predictor.cls_embed.weight": torch.zeros(7, 4), "attr_linear1.bias": torch.zeros(3)}
    torch.save({"model": extra}, tmp_path / "extra.pth")
    with caplog.at_level(logging.INFO, logger="features.vmb_checkpoint"):
        build_vmb_x152_fpn(str(tmp_path / "extra.pth"), preset="tiny")
    assert "ignoring 2 tensors" in caplog.text and "attr_linear1.bias" in caplog.text

    missing = dict(state)
    del missing["rpn.anchor_generator.cell_anchors.3"], missing["roi_heads.box.feature_extractor.fc6.weight"]
    torch.save({"model": missing}, tmp_path / "missing.pth")
    with pytest.raises(WeightsError, match=r"missing.pth.*2 missing \(rpn.anchor_generator.cell_anchors.3, "
                                           r"roi_heads.box.feature_extractor.fc6.weight\)"):
        build_vmb_x152_fpn(str(tmp_path / "missing.pth"), preset="tiny")

    wrong = {**state, "roi_heads.box.predictor.cls_score.weight": torch.zeros(5, 32)}
    torch.save(wrong, tmp_path / "wrong.pth")  # a bare state dict loads too, and is checked the same way
    with pytest.raises(WeightsError, match=r"cls_score.weight \(5, 32\) \(expected \(7, 32\)\)"):
        build_vmb_x152_fpn(str(tmp_path / "wrong.pth"), preset="tiny")

    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"model": {"x": print}}, f, protocol=2)
    with pytest.raises(WeightsError, match="evil.pth"):
        build_vmb_x152_fpn(str(tmp_path / "evil.pth"), preset="tiny")


def test_the_full_size_model_loads_the_810_key_file_strictly(tmp_path):
    keys = reference_keys()
    assert len(keys) == 810
    with torch.device("meta"):
        expected = VMBDetector(VMBConfig()).model.state_dict()
    assert {k: tuple(v.shape) for k, v in expected.items()} == keys
    path = write_random_vmb_weights(tmp_path / "detectron_model.pth", seed=1, prefix="module.",
                                    extra={"module.attr_linear2.weight": torch.zeros(400, 512)})
    det = build_detector("vmb-x152-fpn", weights=str(path), min_size=64, max_size=96)
    state = det.model.state_dict()
    reference = random_vmb_state(seed=1)
    assert len(state) == 810
    for name in ("backbone.body.stem.conv1.weight", "backbone.body.layer3.35.bn3.running_var",
                 "backbone.fpn.fpn_inner4.bias", "rpn.anchor_generator.cell_anchors.4",
                 "roi_heads.box.feature_extractor.fc6.weight", "roi_heads.box.predictor.bbox_pred.bias"):
        assert torch.equal(state[name], reference[name]), name
    assert sum(p.numel() for p in det.parameters()) == 205_784_084  # the released model's count
    assert sum(b.numel() for b in det.buffers()) == 590_140  # frozen BN statistics and the cell anchors
    image = np.random.default_rng(0).integers(0, 256, (60, 60, 3), dtype=np.uint8)
    prepared = det.prepare(image)
    (regions,) = det(pad_batch([prepared], det.size_divisible), [prepared])
    assert regions.features.shape[1] == 2048 and regions.cls_prob.shape[1] == 1601
    assert 0 < len(regions.boxes) <= 100


class _PaddedProposals(nn.Module):
    """Stands in for the network: proposals spanning each image's padded size, as the RPN's clip allows."""

    def forward(self, pixels, clip_hw, rois=None):
        rois = [torch.tensor([[0.0, 0.0, w - 1.0, h - 1.0], [w / 2, h / 2, w - 1.0, h - 1.0]]) for h, w in clip_hw]
        logits = torch.tensor([[0.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0]]).repeat(2 * len(clip_hw), 1)
        return {"rois": rois, "cls_logits": logits, "fc6": torch.ones(2 * len(clip_hw), 32)}


def test_stored_boxes_stay_inside_images_whose_size_is_not_a_multiple_of_the_padding():
    detector = VMBDetector(VMBConfig.tiny(), selection=fixed_k_rule(2))
    detector.model = _PaddedProposals()
    images = [detector.prepare(np.zeros((h, w, 3), np.uint8)) for h, w in ((300, 320), (90, 130), (140, 81))]
    for regions, image in zip(detector(pad_batch(images), images), images, strict=True):
        h, w = image.image_hw
        boxes = regions.boxes
        assert (boxes >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all(), (image.image_hw, boxes)
        assert boxes[:, 2].max() == w or boxes[:, 3].max() == h  # the padding reached past the image: clipped
