"""A full disk, for real: a small tmpfs mounted for the test (root only; skipped with the reason elsewhere).

Every output ends in one line (`no space left on device while writing X`), exit 2, no traceback, no segfault
from HDF5's shutdown, and nothing half-written left at the output (issue 24).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from features.errors import DiskFullError
from features.store import FeatureStore
from tasks.engine.config import OptimConfig
from tasks.engine.trainer import Trainer
from tests.fixtures.cli_check import run_cli
from tests.fixtures.published_sources import make_rows, write_vilbert_lmdb
from tests.fixtures.small_disk import assert_refused_full, resize
from tests.fixtures.tiny_detector import save_random_shapes_detector
from tests.fixtures.tiny_task_data import write_store
from tests.tasks.engine.test_trainer import RegressionTask, train_config


def test_import_onto_a_full_disk_is_one_line_without_a_segfault(tmp_path, small_disk):
    source = write_vilbert_lmdb(tmp_path / "src.lmdb", make_rows(40, k=20, dim=256))
    assert_refused_full(["features", "import", "--from", "vilbert-lmdb", str(source), "--out",
                         str(small_disk / "a.h5"), "--no-progress"], small_disk)


@pytest.mark.parametrize("to, name", [("vilbert-lmdb", "out.lmdb"), ("butd-tsv", "out.tsv")])
def test_export_onto_a_full_disk_is_one_line(tmp_path, small_disk, to, name):
    store = write_store(tmp_path / "feats.h5", [str(i) for i in range(60)], boxes_per_image=20, feature_dim=256)
    assert_refused_full(["features", "export", "--to", to, str(store), "--out", str(small_disk / name)], small_disk)
    assert not (small_disk / name).exists()


def test_a_checkpoint_onto_a_full_disk_is_a_disk_full_error(small_disk):
    class Wide(RegressionTask):
        def build_model(self):  # about 1 MiB of weights: more than the disk holds
            import torch.nn as nn

            return nn.Sequential(nn.Linear(6, 512), nn.ReLU(), nn.Linear(512, 512), nn.Linear(512, 1))

    config = train_config(small_disk.parent, "disk", epochs=1)
    with pytest.raises(DiskFullError, match="no space left on device while writing"):
        Trainer(Wide(), config, OptimConfig()).fit()


def _images_and_boxes(tmp_path, names, boxes_per_image=40):
    """Noise PNGs `names` in tmp_path/img, of sizes divisible by nothing, and tmp_path/boxes.json with
    `boxes_per_image` boxes for each; returns the ids."""
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    boxes = {}
    for i, name in enumerate(names):
        h, w = 37 + i % 5, 53 - i % 7
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{name}.png")
        x, y = rng.uniform(0, w / 2, boxes_per_image), rng.uniform(0, h / 2, boxes_per_image)
        boxes[name] = np.stack([x, y, x + w / 3, y + h / 3], axis=1).round(1).tolist()
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))
    return sorted(boxes)


def _extract_argv(tmp_path, out, detector="mobilenet-v2"):
    """The embedded detector (mobilenet-v2, packaged weights) on given boxes, or a random shapes detector."""
    argv = ["extract", "--images", str(tmp_path / "img"), "--out", str(out), "--workers", "0", "--batch-size", "4",
            "--no-progress"]
    if detector == "shapes":
        return [*argv, "--detector", "shapes", "--weights", str(tmp_path / "detector"), "--option", "random_trunk=true"]
    return [*argv, "--boxes", str(tmp_path / "boxes.json"), "--box-format", "xyxy"]


def _finished(argv, out, ids, disk, boxes=40):
    code, _, stderr = run_cli(argv)
    assert code == 0, stderr
    store = FeatureStore(out)
    assert sorted(store.ids) == ids
    for image_id in ids:
        regions = store.read(image_id)
        assert len(regions.boxes) == boxes if boxes else 1 <= len(regions.boxes) <= 10
        h, w = regions.image_hw
        assert (regions.boxes >= 0).all() and (regions.boxes[:, 2] <= w).all() and (regions.boxes[:, 3] <= h).all()
    assert sorted(p.name for p in disk.iterdir()) == [out.name]


@pytest.mark.parametrize("detector", ["mobilenet-v2", "shapes"])
def test_extract_onto_a_full_disk_is_one_line_and_the_rerun_finishes(tmp_path, small_disk, detector):
    """HDF5 allocates a store's row chunks whole (about 2.2 MB), so the open part's write fails on 256 KiB; after
    the disk grows the same command writes the store, every image once, its boxes inside it."""
    ids = _images_and_boxes(tmp_path, [f"a{i}" for i in range(6)])
    if detector == "shapes":
        save_random_shapes_detector(tmp_path / "detector")
    out = small_disk / "feats.h5"
    line = assert_refused_full(_extract_argv(tmp_path, out, detector), small_disk)
    assert "feats.h5.partial/part-00000.h5" in line and list(small_disk.iterdir()) == []
    resize(small_disk, "8m")
    _finished(_extract_argv(tmp_path, out, detector), out, ids, small_disk, 40 if detector == "mobilenet-v2" else None)


def test_extract_whose_merge_fills_the_disk_keeps_the_store_and_the_sealed_part(tmp_path, small_disk):
    """A rerun on a grown folder: the store (2.2 MB) and the new part fit in 5 MiB, the merged copy does not. The
    old store stays whole, the sealed part stays for the rerun, which finishes once the disk has room."""
    ids = _images_and_boxes(tmp_path, [f"a{i}" for i in range(8)])
    later = tmp_path / "later"
    later.mkdir()
    for name in ids[4:]:
        (tmp_path / "img" / f"{name}.png").rename(later / f"{name}.png")
    resize(small_disk, "8m")
    out = small_disk / "feats.h5"
    _finished(_extract_argv(tmp_path, out), out, ids[:4], small_disk)
    for path in later.iterdir():
        path.rename(tmp_path / "img" / path.name)
    resize(small_disk, "5m")
    line = assert_refused_full(_extract_argv(tmp_path, out), small_disk)
    assert f"writing {out}" in line
    assert sorted(FeatureStore(out).ids) == ids[:4]
    assert [p.name for p in (small_disk / "feats.h5.partial").iterdir()] == ["part-00000.h5"]
    resize(small_disk, "12m")
    _finished(_extract_argv(tmp_path, out), out, ids, small_disk)
