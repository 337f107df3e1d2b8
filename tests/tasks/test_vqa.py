"""VQA v2: official files → vocabulary, soft targets, splits, training step, evaluation, submission."""

import json

import pytest
import torch

from tasks.errors import AnnotationError, ConfigError
from tasks.finetuning import ModelConfig
from tasks.metrics import vqa_accuracy
from tasks.vqa import (
    VQAConfig,
    VQADataConfig,
    VQATask,
    attach_annotations,
    build_vocabulary,
    read_questions,
    read_split,
    soft_target,
    submission,
)
from tests.fixtures.tiny_task_data import write_json, write_store, write_vocab, write_vqa


@pytest.fixture
def vqa_root(tmp_path):
    info = write_vqa(tmp_path / "vqa")
    write_store(tmp_path / "feats.h5", [f"COCO_x_{i:012d}" for i in info["image_ids"]])
    write_vocab(tmp_path / "tok")
    return tmp_path


def _task(root, **data):
    config = VQAConfig(model=ModelConfig(preset="tiny"),
                       data=VQADataConfig(root=str(root / "vqa"), features=[str(root / "feats.h5")],
                                          tokenizer=str(root / "tok"), min_answer_count=1, minval_size=4,
                                          max_regions=5, eval_batch_size=5, train_split="train", **data))
    return VQATask(config)


def test_splits_follow_the_reference(vqa_root):
    root = vqa_root / "vqa"
    train, val = read_split(root, "train"), read_split(root, "val")
    minval, trainval = read_split(root, "minval", 4), read_split(root, "trainval", 4)
    assert [q.question_id for q in minval] == [q.question_id for q in val][-4:]
    assert len(trainval) == len(train) + len(val) - 4
    assert not {q.question_id for q in minval} & {q.question_id for q in trainval}
    assert len(read_split(root, "test")) == 12 and not read_split(root, "test")[0].answers
    assert len(read_split(root, "test-dev")) == 12


def test_vocabulary_counts_normalised_consensus_answers(vqa_root):
    questions = read_split(vqa_root / "vqa", "train") + read_split(vqa_root / "vqa", "val")
    vocabulary = build_vocabulary(questions, min_count=1)
    assert set(vocabulary) == {"red", "2", "yes", "blue"}  # "two"/"2" merged, consensus answers only
    assert len(build_vocabulary(questions, min_count=6)) == 4  # each is the consensus of 6 questions
    with pytest.raises(ConfigError, match="min_answer_count=7"):
        build_vocabulary(questions, min_count=7)


def test_soft_targets_use_normalised_human_counts():
    label_of = {"2": 0, "3": 1, "red": 2}
    target = soft_target(["two"] * 3 + ["2"] * 5 + ["3"] * 2, label_of)
    assert target == pytest.approx({0: 1.0, 1: 0.6})
    assert soft_target(["Red", "red", "red", "blue"], label_of) == pytest.approx({2: 0.9})


def test_missing_keys_name_the_file_and_entry(tmp_path):
    path = write_json(tmp_path / "q.json", {"questions": [{"question_id": 1, "image_id": 2}]})
    with pytest.raises(AnnotationError, match=r"q.json: questions\[0\] has no 'question'"):
        read_questions(path)
    with pytest.raises(AnnotationError, match="has no 'questions'"):
        read_questions(write_json(tmp_path / "bad.json", {"items": []}))
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(AnnotationError, match="not valid JSON"):
        read_questions(tmp_path / "broken.json")


def test_empty_answers_are_a_counted_warning_and_unknown_questions_an_error(tmp_path, caplog):
    questions = read_questions(write_json(tmp_path / "q.json", {"questions": [
        {"question_id": 1, "image_id": 2, "question": "what"}, {"question_id": 2, "image_id": 2, "question": "is"}]}))
    annotations = write_json(tmp_path / "a.json", {"annotations": [
        {"question_id": 1, "answers": [{"answer": "red"}] * 10}, {"question_id": 2, "answers": []}]})
    kept = attach_annotations(questions, annotations)
    assert [q.question_id for q in kept] == [1]
    assert "1 question(s) without usable answers skipped (1 with empty answers)" in caplog.text
    unknown = write_json(tmp_path / "u.json", {"annotations": [{"question_id": 7, "answers": []}]})
    with pytest.raises(AnnotationError, match="question_id 7"):
        attach_annotations(questions, unknown)


def test_unknown_image_ids_are_skipped_with_a_count(vqa_root, caplog):
    write_store(vqa_root / "feats.h5", ["COCO_x_000000000001"])  # only image 1 has features
    task = _task(vqa_root)
    dataset = task.dataset("train")
    assert len(dataset) == 4
    assert "8 questions skipped: 2 image id(s) not in the feature store" in caplog.text


def test_training_step_loss_is_bce_times_answers_and_decreases(vqa_root):
    task = _task(vqa_root)
    model = task.build_model()
    assert model.config.num_labels == len(task.vocabulary()) == 4
    batch = task.collate([task.dataset("train")[i] for i in range(6)])
    assert batch["region_features"].shape == (6, 5, 16) and batch["target"].shape == (6, 4)
    out = task.training_step(model, batch)
    logits = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids", "region_features",
                                            "region_locations", "region_mask")}, heads=["answer_logits"])
    assert out.loss_sums["loss"].ndim == 0 and out.loss_sums["loss"].item() > 0
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first = out.loss_sums["loss"].item()
    for _ in range(15):
        optimizer.zero_grad()
        task.training_step(model, batch).loss_sums["loss"].backward()
        optimizer.step()
    model.eval()
    assert task.training_step(model, batch).loss_sums["loss"].item() < first
    assert logits.answer_logits.shape == (6, 4)


def test_evaluate_scores_minval_with_the_official_accuracy(vqa_root):
    task = _task(vqa_root)
    model = task.build_model()
    predictions = task.predict(model, "minval")
    assert len(predictions) == 4
    metrics = task.evaluate(model, "minval")
    questions = {q.question_id: q for q in task.questions("minval")}
    expected = 100 * sum(vqa_accuracy(p["answer"], questions[p["question_id"]].answers) for p in predictions) / 4
    assert metrics["accuracy"] == pytest.approx(expected)
    assert metrics["num_questions"] == 4


def test_submission_covers_every_question_of_the_split(vqa_root):
    write_store(vqa_root / "feats.h5", [f"COCO_x_{i:012d}" for i in (1, 2, 3, 101, 102, 103, 201)])
    task = _task(vqa_root)
    model = task.build_model()
    questions = task.questions("test-dev")
    predictions = task.predict(model, "test-dev")
    assert len(predictions) == 4  # only image 201 has features
    result = submission(predictions, questions, fallback=task.vocabulary()[0])
    assert [r["question_id"] for r in result] == [q.question_id for q in questions]
    assert set(result[0]) == {"question_id", "answer"}
    json.dumps(result)
