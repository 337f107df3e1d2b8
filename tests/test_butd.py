"""The native BUTD detector on a tiny configuration: shapes, given boxes, proposals, preprocessing."""

import json

import numpy as np
import pytest
import torch

from features.butd import BUTDConfig, BUTDDetector, BUTDModel, cell_anchors, resize_scale
from features.butd_builder import build_butd_r101_c4
from features.detector import pad_batch
from features.detectors import build_detector
from features.selection import fixed_k_rule


@pytest.fixture
def detector():
    return BUTDDetector(BUTDConfig.tiny()).eval()


def _images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (50, 70, 3), dtype=np.uint8), rng.integers(0, 256, (80, 40, 3), dtype=np.uint8)]


def test_full_size_architecture_matches_the_caffe_model():
    with torch.device("meta"):
        model = BUTDModel(BUTDConfig())
    state = model.state_dict()
    assert len(model.backbone.res4) == 23 and len(model.roi_heads.res5) == 3
    assert state["proposal_generator.rpn_head.conv.weight"].shape == (512, 1024, 3, 3)
    assert state["proposal_generator.rpn_head.objectness_logits.weight"].shape[0] == 12
    assert state["roi_heads.box_predictor.cls_score.weight"].shape == (1601, 2048)
    assert state["roi_heads.box_predictor.bbox_pred.weight"].shape == (6404, 2048)
    assert state["roi_heads.box_predictor.fc_attr.weight"].shape == (512, 2304)
    assert state["roi_heads.box_predictor.attr_score.weight"].shape == (401, 512)
    # stride on the 1x1 conv; res5 keeps the resolution and dilates its 3x3 convs
    assert model.backbone.res3[0].conv1.stride == (2, 2) and model.backbone.res3[0].conv2.stride == (1, 1)
    assert model.roi_heads.res5[0].conv1.stride == (1, 1) and model.roi_heads.res5[0].shortcut.stride == (1, 1)
    assert all(b.conv2.dilation == (2, 2) and b.conv2.padding == (2, 2) for b in model.roi_heads.res5)


def test_caffe_stem_pools_without_padding_and_with_ceil_mode():
    model = BUTDModel(BUTDConfig.tiny())
    assert model.backbone.stem(torch.zeros(1, 3, 600, 800)).shape[-2:] == (150, 200)
    assert model.backbone(torch.zeros(1, 3, 600, 800)).shape[-2:] == (38, 50)  # res4 of a 600x800 input


def test_cell_anchors_are_size_major_with_the_requested_areas():
    anchors = cell_anchors((64, 128), (0.5, 1.0, 2.0))
    w, h = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    assert torch.allclose(w * h, torch.tensor([64.0**2] * 3 + [128.0**2] * 3))
    assert torch.allclose(h / w, torch.tensor([0.5, 1, 2, 0.5, 1, 2]))


def test_prepare_resizes_short_side_and_caps_long_side():
    assert resize_scale(480, 640, 600, 1000) == pytest.approx(1.25)
    assert resize_scale(100, 1000, 600, 1000) == pytest.approx(1.0)
    det = BUTDDetector(BUTDConfig.tiny(min_size=600, max_size=1000))
    img = np.zeros((240, 320, 3), dtype=np.uint8)
    img[..., 0] = 200  # red
    prepared = det.prepare(img)
    assert prepared.pixels.shape == (3, 600, 800) and prepared.scale == pytest.approx(2.5)
    assert prepared.image_hw == (240, 320)
    # BGR order, Caffe means subtracted, no std
    assert prepared.pixels[:, 10, 10].tolist() == pytest.approx([-102.9801, -115.9465, 200 - 122.7717], abs=1e-3)


def test_given_boxes_keep_order_and_count(detector):
    prepared = [detector.prepare(im) for im in _images()]
    boxes = [torch.tensor([[30.0, 5, 60, 45], [0, 0, 70, 50], [10, 10, 12, 12]]), torch.tensor([[1.0, 2, 39, 79]])]
    out = detector(pad_batch(prepared), prepared, boxes)
    assert [len(r.boxes) for r in out] == [3, 1]
    for given, regions in zip(boxes, out, strict=True):
        assert torch.equal(regions.boxes, given)
        assert regions.features.shape == (len(given), 128)
        assert regions.cls_prob.shape == (len(given), 7)
        assert torch.allclose(regions.cls_prob.sum(1), torch.ones(len(given)))
        assert regions.attrs_id.min() >= 1 and regions.objects_id.min() >= 1
    # reversing the boxes reverses the features: each row belongs to its box
    flipped = detector(pad_batch(prepared), prepared, [boxes[0].flip(0), boxes[1]])[0]
    assert torch.allclose(flipped.features, out[0].features.flip(0), atol=1e-5)


def test_batch_of_same_size_images_matches_one_at_a_time(detector):
    rng = np.random.default_rng(1)
    prepared = [detector.prepare(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)) for _ in range(2)]
    boxes = [torch.tensor([[5.0, 5, 40, 40]]), torch.tensor([[3.0, 10, 30, 45], [0, 0, 70, 50]])]
    batched = detector(pad_batch(prepared), prepared, boxes)
    for i in range(2):
        alone = detector(pad_batch([prepared[i]]), [prepared[i]], [boxes[i]])[0]
        assert torch.allclose(alone.features, batched[i].features, rtol=1e-4, atol=1e-4)


def test_rpn_path_proposes_boxes_inside_the_image(detector):
    prepared = [detector.prepare(im) for im in _images()]
    out = detector(pad_batch(prepared), prepared)
    for regions, (h, w) in zip(out, [(50, 70), (80, 40)], strict=True):
        assert 10 <= len(regions.boxes) <= 100  # default rule A clamp
        assert regions.features.shape == (len(regions.boxes), 128)
        b = regions.boxes
        assert (b[:, 0] >= 0).all() and (b[:, 2] <= w + 1e-3).all() and (b[:, 3] <= h + 1e-3).all()
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()


def test_regressed_boxes_differ_from_proposals_but_features_do_not():
    torch.manual_seed(0)
    proposal = BUTDDetector(BUTDConfig.tiny(), selection=fixed_k_rule(12)).eval()
    nn_init = proposal.model.roi_heads.box_predictor.bbox_pred
    torch.nn.init.normal_(nn_init.weight, std=0.05)
    regressed = BUTDDetector(BUTDConfig.tiny(), selection=fixed_k_rule(12), box_mode="regressed").eval()
    regressed.load_state_dict(proposal.state_dict())
    prepared = [proposal.prepare(_images()[0])]
    a = proposal(pad_batch(prepared), prepared)[0]
    b = regressed(pad_batch(prepared), prepared)[0]
    assert len(a.boxes) == len(b.boxes) == 12
    assert torch.equal(a.features, b.features)
    assert not torch.allclose(a.boxes, b.boxes)


def test_zero_proposals_give_empty_regions_not_a_crash(detector):
    rpn = detector.model.proposal_generator.rpn_head
    torch.nn.init.constant_(rpn.anchor_deltas.bias, -50.0)  # every proposal collapses to an empty box
    prepared = [detector.prepare(_images()[0])]
    out = detector(pad_batch(prepared), prepared)[0]
    assert out.boxes.shape == (0, 4) and out.features.shape == (0, 128)


def test_extractor_info_is_json_and_records_the_choices():
    det = build_butd_r101_c4(config=BUTDConfig.tiny(), selection="fixed-36", box_mode="regressed")
    info = json.loads(json.dumps(det.extractor_info()))
    assert info["weights"]["sha256"] == "random"
    assert info["selection"]["min_boxes"] == info["selection"]["max_boxes"] == 36
    assert info["box_mode"] == "regressed"
    assert info["input"]["min_size"] == 64 and info["feature_dim"] == 128
    assert "roipool" in info["pooling"]


def test_registry_builds_the_detector():
    det = build_detector("butd-r101-c4", config=BUTDConfig.tiny(), selection="vmb")
    assert isinstance(det, BUTDDetector) and det.selection.max_boxes == 100 and not det.training


def test_bf16_autocast_and_channels_last_run_and_stay_close(detector):
    detector = detector.to(memory_format=torch.channels_last)
    prepared = [detector.prepare(im) for im in _images()]
    boxes = [torch.tensor([[5.0, 5, 60, 45]]), torch.tensor([[3.0, 10, 30, 70]])]
    reference = detector(pad_batch(prepared), prepared, boxes)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = detector(pad_batch(prepared), prepared, boxes)
        proposed = detector(pad_batch(prepared), prepared)
    for a, b in zip(reference, fast, strict=True):
        assert b.features.dtype == torch.float32
        assert (a.features - b.features).abs().max() <= 0.03 * a.features.abs().max()
    assert all(len(r.boxes) >= 10 for r in proposed)


def test_builder_takes_command_line_options_and_names_unknown_ones():
    det = build_butd_r101_c4(preset="tiny", max_boxes=36, min_boxes=36, min_size=80, anchor_sizes=[32, 64])
    assert det.selection.min_boxes == det.selection.max_boxes == 36
    assert det.config.min_size == 80 and det.config.anchor_sizes == (32, 64)
    assert det.model.proposal_generator.rpn_head.objectness_logits.out_channels == 6
    from features.errors import FeaturesError

    with pytest.raises(FeaturesError, match="unknown option.*max_box\\b"):
        build_butd_r101_c4(preset="tiny", max_box=3)
    with pytest.raises(FeaturesError, match="box_mode"):
        build_butd_r101_c4(preset="tiny", box_mode="corners")


def test_box_mode_follows_the_rule_and_two_stage_refuses_proposal_boxes():
    assert build_butd_r101_c4(preset="tiny", selection="maxnms-36").box_mode == "regressed"
    assert build_butd_r101_c4(preset="tiny", selection="fixed-36").box_mode == "proposal"
    assert build_butd_r101_c4(preset="tiny", selection="maxnms", box_mode="proposal").box_mode == "proposal"
    info = build_butd_r101_c4(preset="tiny", selection="two-stage-36").extractor_info()
    assert info["box_mode"] == "regressed" and info["selection"]["pool_on"] == "selected"
    from features.errors import FeaturesError

    with pytest.raises(FeaturesError, match="two-stage-36.*box_mode 'regressed'"):
        build_butd_r101_c4(preset="tiny", selection="two-stage-36", box_mode="proposal")


@pytest.mark.parametrize("selection", ["maxnms-8", "two-stage-8"])
def test_regressed_box_rules_survive_images_without_proposals(selection):
    det = build_butd_r101_c4(preset="tiny", selection=selection)
    torch.nn.init.constant_(det.model.proposal_generator.rpn_head.anchor_deltas.bias, -50.0)
    prepared = [det.prepare(im) for im in _images()]
    out = det(pad_batch(prepared), prepared)
    assert [r.boxes.shape for r in out] == [(0, 4), (0, 4)] and out[0].features.shape == (0, 128)
