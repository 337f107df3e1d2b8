"""`vilbert extract --detector vmb-x152-fpn` end to end on the tiny preset; loading the 810-key full-size file."""

import json
import logging
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from vmb_weights import random_vmb_state, reference_keys, write_random_vmb_weights

from features.detector import pad_batch
from features.detectors import build_detector
from features.errors import WeightsError
from features.selection import fixed_k_rule
from features.store import FeatureStore
from features.vmb import VMBConfig, VMBDetector, build_vmb_x152_fpn
from tasks.cli import main

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
        # multiple of 32, which none of these sizes is) and the widest proposals reach that far
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
        inside = (regions.boxes[:, 2] <= w) & (regions.boxes[:, 3] <= h)  # unclipped by the pipeline
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


class _PaddedProposals(torch.nn.Module):
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
