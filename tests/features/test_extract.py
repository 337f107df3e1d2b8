"""The extraction pipeline: inputs, given boxes, failures, resume after SIGKILL, shards, and the command line."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from features.errors import FeaturesError
from features.extract import extract, shard_path
from features.inputs import clip_boxes, list_images, load_boxes
from features.store import FeatureStore, is_complete_store
from tasks.cli import main
from tests.fixtures.tiny_detector import TinyDetector

ROOT = Path(__file__).resolve().parents[2]


def _make_images(folder, count, seed=0):
    """`count` small PNGs of random solid colours, landscape and portrait; returns {id: (colour, (H, W))}."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    made = {}
    for i in range(count):
        hw = (12, 20) if i % 3 else (20, 12)
        colour = rng.integers(0, 256, 3).astype(np.uint8)
        Image.fromarray(np.broadcast_to(colour, (*hw, 3)).copy()).save(folder / f"im{i:02d}.png")
        made[f"im{i:02d}"] = (colour, hw)
    return made


def _features_by_id(path):
    store = FeatureStore(path)
    return {image_id: store.read(image_id) for image_id in store.ids}


def test_given_boxes_keep_their_order_and_count(tmp_path):
    made = _make_images(tmp_path / "img", 4)
    boxes = {
        image_id: np.array([[1, 2, 5, 6], [0, 0, 3, 3], [4, 1, 9, 7], [1, 2, 5, 6]], np.float32)[: 1 + i]
        for i, image_id in enumerate(made)
    }
    summary = extract(list_images(tmp_path / "img"), tmp_path / "f.h5", TinyDetector(), boxes=boxes,
                      batch_size=3, workers=2, progress=False)
    assert summary.images_written == 4 and summary.boxes_written == 1 + 2 + 3 + 4 and summary.images_failed == 0
    regions = _features_by_id(tmp_path / "f.h5")
    for image_id, (colour, hw) in made.items():
        np.testing.assert_array_equal(regions[image_id].boxes, boxes[image_id])
        np.testing.assert_allclose(regions[image_id].features[:, 3:], boxes[image_id], atol=1e-2)  # row i = box i
        np.testing.assert_allclose(regions[image_id].features[:, :3], np.tile(colour / 255, (len(boxes[image_id]), 1)),
                                   atol=2e-3)
        assert regions[image_id].image_hw == hw


def test_xywh_boxes_are_converted_to_corners(tmp_path):
    (tmp_path / "b.json").write_text(json.dumps({"a": [[1, 2, 3, 4], [0, 0, 0, 5]]}))
    np.testing.assert_array_equal(load_boxes(tmp_path / "b.json", "xywh")["a"], [[1, 2, 4, 6], [0, 0, 0, 5]])
    np.testing.assert_array_equal(load_boxes(tmp_path / "b.json", "xyxy")["a"], [[1, 2, 3, 4], [0, 0, 0, 5]])


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"a": [[1, 2, 3]]}', "image 'a': expected a list of boxes of 4 finite numbers"),
        ('[[1, 2, 3, 4]]', "expected a JSON object"),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_boxes_files_name_the_problem(tmp_path, content, message):
    (tmp_path / "b.json").write_text(content)
    with pytest.raises(FeaturesError, match=message):
        load_boxes(tmp_path / "b.json", "xyxy")


def test_clipping_counts_outside_and_degenerate_boxes():
    boxes = np.array([[-5, 0, 10, 10], [2, 2, 4, 4], [30, 30, 40, 40], [5, 5, 50, 8]], np.float32)
    result = clip_boxes(boxes, (20, 25))  # H 20, W 25
    np.testing.assert_array_equal(result.boxes, [[0, 0, 10, 10], [2, 2, 4, 4], [25, 20, 25, 20], [5, 5, 25, 8]])
    assert (result.clipped, result.degenerate) == (3, 1)


def test_clipped_boxes_are_reported_and_missing_entries_fail_the_image(tmp_path):
    _make_images(tmp_path / "img", 3)  # im00 is 20x12 (H x W)
    boxes = {"im00": [[-4, 0, 30, 6], [1, 1, 2, 2]], "im01": [[0, 0, 4, 4]]}  # im02 has no entry
    (tmp_path / "b.json").write_text(json.dumps(boxes))
    out = tmp_path / "f.h5"
    code = main(["extract", "--images", str(tmp_path / "img"), "--out", str(out), "--boxes", str(tmp_path / "b.json"),
                 "--box-format", "xyxy", "--workers", "0", "--no-progress", "--option", "random_init=true"])
    assert code == 0
    store = FeatureStore(out)
    assert sorted(store.ids) == ["im00", "im01"]
    np.testing.assert_array_equal(store.read("im00").boxes, [[0, 0, 12, 6], [1, 1, 2, 2]])
    lines = [json.loads(line) for line in Path(f"{out}.errors.jsonl").read_text().splitlines()]
    by_id = {line["image_id"]: line for line in lines}
    assert by_id["im02"]["level"] == "error" and "no boxes for image id 'im02'" in by_id["im02"]["reason"]
    assert by_id["im02"]["path"].endswith("im02.png")
    assert by_id["im00"]["level"] == "warning" and "1 box(es) reached outside" in by_id["im00"]["reason"]


def test_bad_images_are_logged_and_the_run_goes_on(tmp_path):
    made = _make_images(tmp_path / "img", 3)
    (tmp_path / "img" / "empty.jpg").write_bytes(b"")
    (tmp_path / "img" / "text.png").write_text("not an image")
    full = (tmp_path / "img" / "im00.png").read_bytes()
    (tmp_path / "img" / "cut.png").write_bytes(full[: len(full) // 2])
    summary = extract(list_images(tmp_path / "img"), tmp_path / "f.h5", TinyDetector(), workers=2, progress=False)
    assert summary.images_written == 3 and summary.images_failed == 3
    assert sorted(FeatureStore(tmp_path / "f.h5").ids) == sorted(made)
    lines = [json.loads(line) for line in Path(summary.errors_file).read_text().splitlines()]
    reasons = {line["image_id"]: line["reason"] for line in lines}
    assert set(reasons) == {"empty", "text", "cut"}
    assert "empty file" in reasons["empty"] and "not an image" in reasons["text"] and "cut.png" in reasons["cut"]
    assert all(set(line) == {"path", "image_id", "reason", "level"} for line in lines)


def test_self_detecting_detector_stores_its_boxes_and_labels(tmp_path):
    _make_images(tmp_path / "img", 2)
    extract(list_images(tmp_path / "img"), tmp_path / "f.h5", TinyDetector(), workers=0, progress=False)
    regions = FeatureStore(tmp_path / "f.h5").read("im01")  # 12 x 20
    np.testing.assert_array_equal(regions.boxes, [[0, 0, 20, 12], [0, 0, 10, 6]])
    assert regions.cls_prob.shape == (2, 3) and list(regions.objects_id) == [1, 2]


def test_duplicate_ids_are_refused_up_front(tmp_path, capsys):
    _make_images(tmp_path / "img" / "a", 2)
    _make_images(tmp_path / "img" / "b", 1)
    with pytest.raises(FeaturesError, match=r"1 duplicate image id\(s\): 'im00'"):
        list_images(tmp_path / "img")
    code = main(["extract", "--images", str(tmp_path / "img"), "--out", str(tmp_path / "f.h5")])
    assert code == 2 and "duplicate image id" in capsys.readouterr().err
    assert not (tmp_path / "f.h5").exists()


def test_lists_give_paths_and_ids(tmp_path):
    _make_images(tmp_path / "img", 2)
    (tmp_path / "list.txt").write_text("# two images\nimg/im00.png\n\nimg/im01.png\n")
    assert [(i.image_id, Path(i.path).name) for i in list_images(tmp_path / "list.txt")] == [
        ("im00", "im00.png"), ("im01", "im01.png")]
    (tmp_path / "ids.txt").write_text("first\nsecond\n")
    assert [i.image_id for i in list_images(tmp_path / "list.txt", tmp_path / "ids.txt")] == ["first", "second"]
    (tmp_path / "list.json").write_text(json.dumps([{"image_id": 7, "path": "img/im01.png"}, "img/im00.png"]))
    images = list_images(tmp_path / "list.json")
    assert [i.image_id for i in images] == ["7", "im00"] and Path(images[0].path).exists()


def test_rerun_after_sigkill_finishes_without_losing_or_repeating_images(tmp_path):
    _make_images(tmp_path / "img", 12)
    out = tmp_path / "f.h5"
    script = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
        "from tests.fixtures.tiny_detector import TinyDetector\n"
        "from features.inputs import list_images\n"
        "from features.extract import extract\n"
        f"extract(list_images({str(tmp_path / 'img')!r}), {str(out)!r}, TinyDetector(delay=0.25), batch_size=2,\n"
        "        workers=0, part_images=2, progress=False)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"})
    parts = Path(f"{out}.partial")
    deadline = time.monotonic() + 120
    while len(list(parts.glob("part-*.h5"))) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL  # killed mid-run, not finished
    assert not out.exists()
    assert all(is_complete_store(p) for p in parts.glob("part-*.h5"))  # nothing sealed is unreadable

    resumed = extract(list_images(tmp_path / "img"), out, TinyDetector(), batch_size=2, workers=0, progress=False)
    assert resumed.images_skipped >= 4 and resumed.images_skipped + resumed.images_written == 12
    assert not parts.exists()
    reference = extract(list_images(tmp_path / "img"), tmp_path / "ref.h5", TinyDetector(), batch_size=2,
                        workers=0, progress=False)
    assert reference.images_written == 12
    got, want = _features_by_id(out), _features_by_id(tmp_path / "ref.h5")
    assert sorted(got) == sorted(want) and len(FeatureStore(out).ids) == 12
    for image_id in want:
        np.testing.assert_array_equal(got[image_id].features, want[image_id].features)
        np.testing.assert_array_equal(got[image_id].boxes, want[image_id].boxes)
    again = extract(list_images(tmp_path / "img"), out, TinyDetector(), workers=0, progress=False)
    assert again.images_written == 0 and again.images_skipped == 12 and len(FeatureStore(out)) == 12


def test_shards_by_rank_merge_into_one_store(tmp_path):
    made = _make_images(tmp_path / "img", 5)
    images, out = list_images(tmp_path / "img"), tmp_path / "f.h5"
    first = extract(images, out, TinyDetector(), workers=0, rank=1, world_size=2, progress=False)
    assert first.images_written == 2 and shard_path(out, 1, 2).exists() and not out.exists()
    second = extract(images, out, TinyDetector(), workers=0, rank=0, world_size=2, progress=False)
    assert second.images_written == 3
    assert sorted(FeatureStore(out).ids) == sorted(made)
    assert not shard_path(out, 0, 2).exists() and not shard_path(out, 1, 2).exists()


def test_merge_command_joins_shards(tmp_path, capsys):
    _make_images(tmp_path / "img", 4)
    images = list_images(tmp_path / "img")
    shards = []
    for k in range(2):
        shards.append(tmp_path / f"s{k}.h5")
        extract(images[k::2], shards[-1], TinyDetector(), workers=0, progress=False)
    assert main(["extract", "--merge", str(tmp_path / "m.h5"), *map(str, shards)]) == 0
    assert sorted(FeatureStore(tmp_path / "m.h5").ids) == ["im00", "im01", "im02", "im03"]
    assert main(["features", "info", str(tmp_path / "m.h5")]) == 0
    printed = capsys.readouterr().out
    assert "images            4" in printed and "min 2  mean 2.00  max 2" in printed
    assert "extractor.detector" in printed and "tiny-test" in printed and "cls_prob" in printed


def test_features_info_reports_a_bad_file_in_one_line(tmp_path, capsys):
    (tmp_path / "x.h5").write_text("junk")
    assert main(["features", "info", str(tmp_path / "x.h5")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "x.h5: not a readable HDF5" in err


def test_boxes_need_an_explicit_format(tmp_path, capsys):
    _make_images(tmp_path / "img", 1)
    (tmp_path / "b.json").write_text("{}")
    code = main(["extract", "--images", str(tmp_path / "img"), "--out", str(tmp_path / "f.h5"),
                 "--boxes", str(tmp_path / "b.json")])
    assert code == 2 and "--box-format" in capsys.readouterr().err


def test_rerun_on_a_grown_folder_adds_only_the_new_images(tmp_path):
    _make_images(tmp_path / "img", 3)
    out = tmp_path / "f.h5"
    extract(list_images(tmp_path / "img"), out, TinyDetector(), workers=0, progress=False)
    before = _features_by_id(out)
    _make_images(tmp_path / "more", 5, seed=1)
    for name in ("im03.png", "im04.png"):
        (tmp_path / "more" / name).rename(tmp_path / "img" / name)
    summary = extract(list_images(tmp_path / "img"), out, TinyDetector(), workers=0, progress=False)
    assert (summary.images_written, summary.images_skipped) == (2, 3)
    after = _features_by_id(out)
    assert sorted(after) == ["im00", "im01", "im02", "im03", "im04"]
    np.testing.assert_array_equal(after["im01"].features, before["im01"].features)


def test_the_store_records_how_huge_images_were_reduced_and_parts_seal_every_ten_seconds(tmp_path):
    import inspect

    _make_images(tmp_path / "img", 1)
    extract(list_images(tmp_path / "img"), tmp_path / "f.h5", TinyDetector(), workers=0, progress=False,
            max_side=2048)
    decoding = FeatureStore(tmp_path / "f.h5").extractor["decoding"]
    assert decoding == {"max_side": 2048, "margin_over_input_scale": 2.0, "jpeg_draft": True}
    assert inspect.signature(extract).parameters["part_seconds"].default <= 10  # a kill redoes at most 10 s
