"""GuessWhat: pointing at the guessed object among the detected rows, and the oracle answering each question."""

import pytest

from tasks.errors import AnnotationError
from tasks.finetuning import ModelConfig
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
from tests.fixtures.task_steps import data_options, learns
from tests.fixtures.tiny_12in1_data import write_guesswhat, write_jsonl
from tests.fixtures.tiny_task_data import write_store, write_vocab


def _data(root, folder, **data):
    return data_options(root, folder, features=[str(root / "det.h5")], **data)  # the detections: det.h5


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
    assert learns(task, model, batch)
    predictions = task.predict(model, "valid")
    gold = {s.id: s.label for s in task.samples("valid")}
    assert task.evaluate(model, "valid")["accuracy"] == pytest.approx(
        accuracy({p["qa_id"]: ANSWERS.index(p["answer"]) for p in predictions}, gold))


def test_guesswhat_unknown_answer_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "guesswhat.valid.jsonl", [
        {"id": 1, "image": {"id": 2}, "objects": [], "object_id": 3, "qas": [{"question": "x", "answer": "maybe"}]}])
    with pytest.raises(AnnotationError, match=r"guesswhat.valid.jsonl: line 1 qas\[0\] has answer 'maybe'"):
        read_games(path)
