"""Visual7W pointing: candidates among the GT boxes, appended after the detections; bad box references named."""

import pytest

from tasks.errors import AnnotationError
from tasks.finetuning import ModelConfig
from tasks.metrics import accuracy
from tasks.pointing import Visual7WConfig, Visual7WDataConfig, Visual7WTask, candidate_rows, read_visual7w
from tests.fixtures.task_steps import data_options, learns
from tests.fixtures.tiny_12in1_data import write_visual7w
from tests.fixtures.tiny_task_data import write_store, write_vocab


def _data(root, folder, **data):
    return data_options(root, folder, features=[str(root / "det.h5")], **data)  # the detections: det.h5


def _stores(root, info):
    write_store(root / "det.h5", info["image_ids"], boxes_per_image=5)  # random "detections"
    write_store(root / "gt.h5", info["image_ids"], boxes=info["gt_boxes"], seed=1)
    write_vocab(root / "tok")


def test_candidates_match_the_best_overlapping_row():
    rows = [[0, 0, 10, 10], [20, 20, 40, 40]]
    assert candidate_rows([[21, 21, 40, 40], [0, 0, 10, 9], [60, 60, 70, 70]], rows, 4) == [5, 4, -1]


def test_visual7w_points_at_gt_rows_after_the_detections(tmp_path):
    info = write_visual7w(tmp_path / "v7w")
    _stores(tmp_path, info)
    samples = read_visual7w(tmp_path / "v7w" / "dataset_v7w_pointing.json", "val")
    assert len(samples) == 4 and len(samples[0].extra["candidates"]) == 4
    assert samples[0].label in samples[0].extra["candidates"]
    task = Visual7WTask(Visual7WConfig(model=ModelConfig(preset="tiny"), data=Visual7WDataConfig(
        **_data(tmp_path, "v7w", gt_features=[str(tmp_path / "gt.h5")]))))
    item = task.dataset("train")[0]
    assert item["rows"].tolist() == [4, 5, 6, 7]  # IMG + 3 detected rows, then the 4 GT boxes in order
    assert len(item["visuals"][0].features) == 8
    model = task.build_model()
    batch = task.collate([task.dataset("train")[i] for i in range(4)])
    assert task.logits(model, batch).shape == (4, 4)
    assert learns(task, model, batch)
    predictions = task.predict(model, "val")
    assert set(predictions[0]) == {"qa_id", "answer", "box"}
    expected = accuracy({p["qa_id"]: p["answer"] for p in predictions}, {s.id: s.label for s in samples})
    assert task.evaluate(model, "val")["accuracy"] == pytest.approx(expected)


def test_visual7w_bad_box_reference_names_the_entry(tmp_path):
    info = write_visual7w(tmp_path)
    assert info["image_ids"]
    data = (tmp_path / "dataset_v7w_pointing.json").read_text().replace('"multiple_choices": [1,', '"multiple_choices": [999,')
    (tmp_path / "bad.json").write_text(data)
    with pytest.raises(AnnotationError, match=r"bad.json: images\[0\].qa_pairs\[0\] names box_id 999"):
        read_visual7w(tmp_path / "bad.json", "train")
