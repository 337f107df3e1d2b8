"""VQA-CP v2 on tiny files in the released layout: reading, training, scoring with the official accuracy per
answer and question type, the question-only prior's measurements, and the refusal of files of the wrong shape."""

import json

import pytest

from tasks.cli import main
from tasks.engine.config import OptimConfig, TrainConfig
from tasks.engine.trainer import Trainer
from tasks.errors import AnnotationError, ConfigError
from tasks.vqa import read_cp_split
from tests.fixtures.cli_check import assert_refused
from tests.fixtures.task_zoo import build_task, write_zoo
from tests.fixtures.tiny_task_data import VQA_CP_QUESTIONS, write_json


@pytest.fixture()
def zoo(tmp_path):
    return write_zoo(tmp_path, ["vqa-cp"])["vqa-cp"]


def _root(overrides):
    return next(o.split("=", 1)[1] for o in overrides if o.startswith("data.root="))


def test_the_released_layout_reads_with_coco_splits_and_types(zoo):
    train = read_cp_split(_root(zoo), "train")
    test = read_cp_split(_root(zoo), "test")
    assert len(train) == 9 and len(test) == 6
    assert {q.coco_split for q in train} == {"train2014", "val2014"}
    assert {q.question_type for q in test} == {t for _, t, _, _, _ in VQA_CP_QUESTIONS}
    assert all(len(q.answers) == 10 for q in test)


def test_the_vocabulary_comes_from_train_alone(zoo):
    task = build_task("vqa-cp", zoo)
    assert sorted(task.vocabulary()) == sorted(a for _, _, _, a, _ in VQA_CP_QUESTIONS)


def test_scores_give_the_official_accuracy_per_type_and_the_question_only_prior(zoo):
    task = build_task("vqa-cp", zoo)
    test = task.questions("test")
    # every question answered with its test answer (9 of 10 humans): accuracy 100 %; the prior (the train
    # answer, 1 human of 10) scores min(1/3, 1) for 9 of the 10 leave-one-out subsets and 0 for one: 30 %
    answers = {text: test_answer for text, _, _, _, test_answer in VQA_CP_QUESTIONS}
    predictions = [{"question_id": q.question_id, "answer": answers[q.question]} for q in test]
    metrics = task.score(predictions, "test")
    assert metrics["accuracy"] == pytest.approx(100.0)
    assert metrics["accuracy/yes/no"] == metrics["question_type/how many"] == pytest.approx(100.0)
    assert metrics["prior_accuracy"] == pytest.approx(30.0)
    assert metrics["prior_question_type/is the"] == pytest.approx(30.0)
    assert metrics["prior_agreement"] == 0.0
    assert task.chance("test") == {"accuracy": pytest.approx(30.0)}
    priors = {text: train_answer for text, _, _, train_answer, _ in VQA_CP_QUESTIONS}
    metrics = task.score([{"question_id": q.question_id, "answer": priors[q.question]} for q in test], "test")
    assert metrics["prior_agreement"] == 100.0 and metrics["accuracy"] == pytest.approx(30.0)
    labels = [label for label, _, _ in task.report_lines(metrics)]
    assert "answer type yes/no" in labels and "question type 'how many'" in labels


def test_trains_and_evaluates_on_the_test_split(zoo, tmp_path, capsys):
    task = build_task("vqa-cp", zoo)
    config = TrainConfig(output_dir=str(tmp_path / "run"), epochs=1, global_batch_size=3, max_steps=2,
                         num_workers=0, log_every=1, save_every=1000, eval_every=1000, device="cpu")
    result = Trainer(task, config, OptimConfig(lr=1e-3)).fit()
    record = json.loads((result.last_checkpoint / "run.json").read_text())
    assert record["task"] == "vqa-cp" and record["task_token"] == "vqa"  # VQA's 12-in-1 token
    evaluation = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in evaluation if r.get("kind") == "eval"][-1]
    assert 0.0 <= final["accuracy"] <= 100.0 and "prior_agreement" in final
    out = tmp_path / "eval"
    assert main(["evaluate", "--task", "vqa-cp", "--checkpoint", str(result.last_checkpoint), "--split", "test",
                 "--out", str(out), *zoo]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["prior_accuracy"] == pytest.approx(30.0) and metrics["accuracy"] == final["accuracy"]
    printed = capsys.readouterr().out
    assert "prior_agreement" in printed and "prior_question_type/what color is the" in printed


@pytest.mark.parametrize("damage, where", [
    (lambda data: {"questions": data}, "expected a JSON list"),
    (lambda data: [{k: v for k, v in e.items() if k != "coco_split"} for e in data], "coco_split"),
    (lambda data: [{**e, "coco_split": "test2015"} for e in data], "coco_split must be one of"),
])
def test_a_file_of_the_wrong_shape_is_refused_naming_it(zoo, damage, where, tmp_path):
    path = tmp_path / "vqa-cp" / "data" / "vqacp_v2_train_questions.json"
    write_json(path, damage(json.loads(path.read_text())))
    with pytest.raises(AnnotationError, match=where):
        read_cp_split(path.parent, "train")
    out = tmp_path / "run"
    line = assert_refused(["finetune", "--task", "vqa-cp", "model.preset=tiny", *zoo, f"train.output_dir={out}"],
                          names=[path], watch=[tmp_path / "vqa-cp" / "data"])
    assert where in line and not out.exists()


def test_a_split_vqa_cp_does_not_have_is_refused_naming_the_key(zoo):
    with pytest.raises(ConfigError, match="data.val_split: 'minval' is not a vqa-cp split"):
        build_task("vqa-cp", [*zoo, "data.val_split=minval"])
    line = assert_refused(["finetune", "--task", "vqa-cp", "model.preset=tiny", *zoo, "data.train_split=trainval"],
                          names=["data.train_split"])
    assert "train, test" in line

