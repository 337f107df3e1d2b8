"""The reference's side files: hard negatives, held-out test ids, MAttNet detections, COCO boxes for extract."""

import json
import pickle

import numpy as np
import pytest

from features.inputs import load_boxes
from features.store import FeatureStore
from tasks.cli import main
from tasks.data.reference_files import read_hard_negatives, read_image_ids
from tasks.errors import AnnotationError
from tests.fixtures.published_sources import make_rows, write_butd_tsv


def write_instances(path, images=((9, "COCO_train2014_000000000009.jpg"), (42, "COCO_train2014_000000000042.jpg"))):
    data = {
        "images": [{"id": i, "file_name": name, "height": 100, "width": 120} for i, name in images],
        "annotations": [
            {"id": 1, "image_id": 9, "bbox": [10, 20, 30, 40], "category_id": 1},
            {"id": 2, "image_id": 42, "bbox": [0, 0, 5.5, 6], "category_id": 2},
            {"id": 3, "image_id": 9, "bbox": [1, 2, 3, 4], "category_id": 3},
        ],
    }
    path.write_text(json.dumps(data))
    return path


def test_hard_negative_pkl_skips_column_zero(tmp_path):
    data = {"train_image_list": np.array([5, 7, 9]),
            "train_hard_pool": np.array([[0, 2, 1], [1, 0, 2], [2, 1, 0]])}
    with open(tmp_path / "hard_negative.pkl", "wb") as f:
        pickle.dump(data, f)
    assert read_hard_negatives(tmp_path / "hard_negative.pkl") == {"5": ["9", "7"], "7": ["5", "9"], "9": ["7", "5"]}
    data["train_hard_pool"] = np.array([[0, 3], [1, 0], [2, 1]])
    with open(tmp_path / "bad.pkl", "wb") as f:
        pickle.dump(data, f)
    with pytest.raises(AnnotationError, match="bad.pkl: train_hard_pool indexes outside train_image_list"):
        read_hard_negatives(tmp_path / "bad.pkl")


def test_test_ids_npy_keeps_images_out_of_an_import(tmp_path, capsys):
    np.save(tmp_path / "coco_test_ids.npy", np.array([2, 3]))
    assert read_image_ids(tmp_path / "coco_test_ids.npy") == {"2", "3"}
    source = write_butd_tsv(tmp_path / "s.tsv", make_rows(4))
    assert main(["features", "import", "--from", "butd-tsv", str(source), "--out", str(tmp_path / "f.h5"),
                 "--exclude-ids", str(tmp_path / "coco_test_ids.npy"), "--no-progress"]) == 0
    assert FeatureStore(tmp_path / "f.h5").ids == ["1", "4"]
    assert "2 excluded" in capsys.readouterr().out


def test_boxes_from_coco_annotations_feed_extract(tmp_path):
    instances = write_instances(tmp_path / "instances.json")
    assert main(["boxes", "--coco", str(instances), "--out", str(tmp_path / "boxes.json")]) == 0
    boxes = load_boxes(tmp_path / "boxes.json", "xyxy")
    assert sorted(boxes) == ["COCO_train2014_000000000009", "COCO_train2014_000000000042"]
    assert boxes["COCO_train2014_000000000009"].tolist() == [[10, 20, 40, 60], [1, 2, 4, 6]]
    assert boxes["COCO_train2014_000000000042"].tolist() == [[0, 0, 5.5, 6]]
    assert main(["boxes", "--coco", str(instances), "--ids-from", "int", "--out", str(tmp_path / "b.json")]) == 0
    assert sorted(load_boxes(tmp_path / "b.json", "xyxy")) == ["42", "9"]


def test_mattnet_detections_best_first_above_min_score(tmp_path):
    instances = write_instances(tmp_path / "instances.json")
    dets = [{"det_id": 1, "image_id": 9, "box": [0, 0, 10, 10], "score": 0.3, "category_id": 1},
            {"det_id": 2, "image_id": 9, "box": [5, 5, 10, 10], "score": 0.9, "category_id": 1},
            {"det_id": 3, "image_id": 42, "box": [1, 1, 2, 2], "score": 0.05, "category_id": 1}]
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    assert main(["boxes", "--coco", str(instances), "--detections", str(tmp_path / "dets.json"),
                 "--min-score", "0.1", "--out", str(tmp_path / "det.json")]) == 0
    boxes = load_boxes(tmp_path / "det.json", "xyxy")
    assert list(boxes) == ["COCO_train2014_000000000009"]
    assert boxes["COCO_train2014_000000000009"].tolist() == [[5, 5, 15, 15], [0, 0, 10, 10]]


def test_bad_annotation_is_one_line(tmp_path, capsys):
    data = {"images": [{"id": 9, "file_name": "a.jpg"}], "annotations": [{"image_id": 9, "bbox": [1, 2, -3, 4]}]}
    (tmp_path / "instances.json").write_text(json.dumps(data))
    assert main(["boxes", "--coco", str(tmp_path / "instances.json"), "--out", str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "instances.json: annotations[0]: box [1, 2, -3, 4] has a negative" in err[0]
    assert not (tmp_path / "b.json").exists()
