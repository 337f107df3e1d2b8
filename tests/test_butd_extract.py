"""`vilbert extract` end to end with the tiny BUTD detector: detected and given boxes reach the store."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_butd import randomise_butd_weights

from features.butd import BUTDConfig, BUTDDetector, argmax_class_boxes
from features.butd_builder import build_butd_r101_c4
from features.detector import pad_batch
from features.detector_checkpoints import export_detectron2
from features.images import read_image
from features.store import FeatureStore
from tasks.cli import main


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
