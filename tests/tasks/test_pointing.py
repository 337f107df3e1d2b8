"""Visual7W and GuessWhat pointing (candidates among GT boxes appended after detections), GuessWhat oracle."""

import pytest
import torch

from tasks.engine.config import ModelConfig
from tasks.errors import AnnotationError
from tasks.guesswhat import (
    ANSWERS,
    GuessWhatConfig,
    GuessWhatDataConfig,
    GuessWhatPointingConfig,
    GuessWhatPointingDataConfig,
    GuessWhatPointingTask,
    GuessWhatTask,
    read_games,
    read_pointing,
)
from tasks.metrics import accuracy
from tasks.pointing import Visual7WConfig, Visual7WDataConfig, Visual7WTask, candidate_rows, read_visual7w
from tests.fixtures.tiny_12in1_data import write_guesswhat, write_jsonl, write_visual7w
from tests.fixtures.tiny_task_data import write_store, write_vocab


def _data(root, folder, **data):
    return {"root": str(root / folder), "features": [str(root / "det.h5")], "tokenizer": str(root / "tok"),
            "max_regions": 4, "max_text_length": 16, "eval_batch_size": 3, **data}


def _stores(root, info):
    write_store(root / "det.h5", info["image_ids"], boxes_per_image=5)  # random "detections"
    write_store(root / "gt.h5", info["image_ids"], boxes=info["gt_boxes"], seed=1)
    write_vocab(root / "tok")


def _learns(task, model, batch, steps=10):
    first = task.training_step(model, batch).loss_sums["loss"].item()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        task.training_step(model, batch).loss_sums["loss"].backward()
        optimizer.step()
    model.eval()
    return task.training_step(model, batch).loss_sums["loss"].item() < first


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
    assert _learns(task, model, batch)
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


def test_guesswhat_pointing_without_gt_store_matches_detected_rows(tmp_path):
    info = write_guesswhat(tmp_path / "gw")
    write_store(tmp_path / "det.h5", info["image_ids"], boxes=info["gt_boxes"])  # the store holds the GT boxes
    write_vocab(tmp_path / "tok")
    samples = read_pointing(tmp_path / "gw" / "guesswhat.valid.jsonl")
    assert len(samples) == 2  # the failed game is left out
    assert samples[0].texts == ["a man holding a red ball No two dogs sitting on the left N/A"]  # the turns
    task = GuessWhatPointingTask(GuessWhatPointingConfig(model=ModelConfig(preset="tiny"),
                                                         data=GuessWhatPointingDataConfig(**_data(tmp_path, "gw"))))
    assert task.dataset("valid")[0]["rows"].tolist() == [1, 2, 3]
    model = task.build_model()
    predictions = task.predict(model, "valid")
    expected = accuracy({p["game_id"]: p["object_id"] for p in predictions}, {s.id: s.label for s in samples})
    assert task.evaluate(model, "valid")["accuracy"] == pytest.approx(expected)


def test_guesswhat_oracle_answers_each_question(tmp_path):
    info = write_guesswhat(tmp_path / "gw")
    write_store(tmp_path / "det.h5", info["image_ids"])
    write_vocab(tmp_path / "tok")
    task = GuessWhatTask(GuessWhatConfig(model=ModelConfig(preset="tiny"), data=GuessWhatDataConfig(
        **_data(tmp_path, "gw"))))
    assert len(task.samples("train")) == 6  # every question of every game
    model = task.build_model()
    batch = task.collate([task.dataset("train")[i] for i in range(6)])
    assert _learns(task, model, batch)
    predictions = task.predict(model, "valid")
    gold = {s.id: s.label for s in task.samples("valid")}
    assert task.evaluate(model, "valid")["accuracy"] == pytest.approx(
        accuracy({p["qa_id"]: ANSWERS.index(p["answer"]) for p in predictions}, gold))


def test_guesswhat_unknown_answer_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "guesswhat.valid.jsonl", [
        {"id": 1, "image": {"id": 2}, "objects": [], "object_id": 3, "qas": [{"question": "x", "answer": "maybe"}]}])
    with pytest.raises(AnnotationError, match=r"guesswhat.valid.jsonl: line 1 qas\[0\] has answer 'maybe'"):
        read_games(path)
