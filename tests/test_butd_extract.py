"""`vilbert extract` end to end with the tiny BUTD detector: detected and given boxes reach the store."""

import json

import numpy as np
import pytest
from PIL import Image

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
