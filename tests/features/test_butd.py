"""The native BUTD detector on a tiny configuration: shapes, given boxes, proposals, preprocessing; `vilbert extract` end
to end with it (detected and given boxes reach the store)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from features.butd import BUTDConfig, BUTDDetector, BUTDModel, argmax_class_boxes, cell_anchors, resize_scale
from features.butd_builder import build_butd_r101_c4
from features.detector import pad_batch
from features.detector_checkpoints import export_detectron2
from features.detectors import build_detector
from features.images import read_image
from features.selection import fixed_k_rule
from features.store import FeatureStore
from tasks.cli import main
from tests.fixtures.tiny_butd import randomise_butd_weights


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


@pytest.fixture
def image_dir(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for name, (h, w) in {"wide": (48, 72), "tall": (80, 40), "square": (60, 60)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    return folder


def _extract(image_dir, out, *extra):
    return main(["extract", "--images", str(image_dir), "--out", str(out), "--detector", "butd-r101-c4",
                 "--option", "preset=tiny", "--workers", "0", "--batch-size", "2", "--no-progress", *extra])


def test_detected_regions_follow_the_selection_rule(image_dir, tmp_path):
    out = tmp_path / "butd.h5"
    assert _extract(image_dir, out, "--option", "selection=fixed-12", "--option", "box_mode=regressed") == 0
    store = FeatureStore(out)
    assert sorted(store.ids) == ["square", "tall", "wide"]
    for image_id in store.ids:
        regions = store.read(image_id)
        h, w = regions.image_hw
        assert regions.features.shape == (12, 128) and regions.cls_prob.shape == (12, 7)
        assert (regions.boxes[:, 2] <= w + 1e-3).all() and (regions.boxes[:, 3] <= h + 1e-3).all()
    info = store.extractor
    assert info["detector"] == "butd-r101-c4" and info["box_mode"] == "regressed"
    assert info["selection"]["min_boxes"] == info["selection"]["max_boxes"] == 12
    assert info["weights"]["sha256"] == "random"


def test_given_boxes_are_stored_in_order(image_dir, tmp_path):
    boxes = {"wide": [[40, 2, 70, 30], [0, 0, 72, 48], [5, 5, 20, 40]], "tall": [[1, 1, 39, 79]],
             "square": [[10, 10, 50, 50], [0, 30, 60, 60]]}
    boxes_file = tmp_path / "boxes.json"
    boxes_file.write_text(json.dumps(boxes))
    out = tmp_path / "given.h5"
    assert _extract(image_dir, out, "--boxes", str(boxes_file), "--box-format", "xyxy") == 0
    store = FeatureStore(out)
    for image_id, given in boxes.items():
        regions = store.read(image_id)
        np.testing.assert_allclose(regions.boxes, np.asarray(given, dtype=np.float32))
        assert regions.features.shape == (len(given), 128)


@pytest.fixture
def random_weights(tmp_path):
    """A tiny BUTD whose regressed boxes move a few pixels off the proposals, saved in detectron2's layout."""
    det = randomise_butd_weights(BUTDDetector(BUTDConfig.tiny()).eval(), seed=5)
    predictor = det.model.roi_heads.box_predictor
    with torch.no_grad():  # scaled down so deltas are O(1) and class probabilities not saturated
        for layer in (predictor.cls_score, predictor.bbox_pred):
            layer.weight.mul_(0.04)
            layer.bias.zero_()
    path = tmp_path / "tiny_butd.pth"
    torch.save(export_detectron2(det.model.state_dict()), path)
    return path


def _proposals_and_regressed(weights, image_path):
    """Independently of the selection code: every proposal, its regressed arg-max box and its pooled feature."""
    det = build_butd_r101_c4(str(weights), preset="tiny")
    prepared = det.prepare(read_image(image_path).pixels)
    hw = torch.tensor([prepared.pixels.shape[1:]], dtype=torch.float32)
    with torch.no_grad():
        out = det.model(pad_batch([prepared]), hw)
    probs = torch.softmax(out["cls_logits"], dim=1)
    regressed = argmax_class_boxes(out["rois"][0], out["deltas"], probs, hw[0], det.config.bbox_reg_weights)
    return out["rois"][0] / prepared.scale, regressed / prepared.scale, out["pooled"]


@pytest.mark.parametrize("selection, extra, pooled_on_stored_box", [
    ("two-stage-12", [], True),  # rule D: second pass on the kept regressed boxes
    ("maxnms-12", [], False),  # rule B as airsplay: regressed boxes stored, features from the proposals
    ("maxnms-12", ["--option", "pool_on=selected"], True),
])
def test_regressed_box_rules_store_regressed_boxes_and_pool_where_documented(
        image_dir, tmp_path, random_weights, selection, extra, pooled_on_stored_box):
    names = ["wide", "tall"]
    images = tmp_path / "list.json"
    images.write_text(json.dumps([str(image_dir / f"{n}.png") for n in names]))
    common = ["--images", str(images), "--weights", str(random_weights), "--batch-size", "1", "--float32"]
    out = tmp_path / "selected.h5"
    assert _extract(image_dir, out, *common, "--option", f"selection={selection}", *extra) == 0
    store = FeatureStore(out)
    assert store.extractor["box_mode"] == "regressed" and store.extractor["selection"]["name"] == selection

    given = {n: store.read(n).boxes.tolist() for n in names}
    boxes_file = tmp_path / "boxes.json"
    boxes_file.write_text(json.dumps(given))
    repooled = tmp_path / "given.h5"
    assert _extract(image_dir, repooled, *common, "--boxes", str(boxes_file), "--box-format", "xyxy") == 0

    for name in names:
        regions, on_boxes = store.read(name), FeatureStore(repooled).read(name)
        assert len(regions) == 12
        proposals, regressed, pooled = _proposals_and_regressed(random_weights, image_dir / f"{name}.png")
        stored = torch.from_numpy(regions.boxes)
        distance = (stored[:, None] - regressed[None]).abs().amax(dim=-1)  # [12, P], largest coordinate gap
        source = distance.argmin(dim=1)  # the proposal each region came from
        assert distance.min(dim=1).values.max() < 1e-3  # every stored box is some proposal's regressed box
        from_proposals = (stored[:, None] - proposals[None]).abs().amax(dim=-1).min(dim=1).values
        assert from_proposals.max() > 0.5  # and not simply a proposal
        if pooled_on_stored_box:
            np.testing.assert_allclose(regions.features, on_boxes.features, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(regions.cls_prob, on_boxes.cls_prob, rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_allclose(regions.features, pooled[source].numpy(), rtol=1e-5, atol=1e-5)
            assert not np.allclose(regions.features, on_boxes.features, rtol=1e-3, atol=1e-3)
