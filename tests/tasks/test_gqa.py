"""GQA on official files: the answer list, training on it, exact match."""

import pickle

import pytest

from tasks.errors import AnnotationError
from tasks.finetuning import ModelConfig
from tasks.gqa import GQAConfig, GQADataConfig, GQATask, read_gqa
from tasks.metrics import gqa_accuracy
from tests.fixtures.task_steps import data_options, learns
from tests.fixtures.tiny_12in1_data import write_gqa
from tests.fixtures.tiny_task_data import write_store, write_vocab


def _task(root, **data):
    data = GQADataConfig(**data_options(root, "gqa", max_text_length=12, **data))
    return GQATask(GQAConfig(model=ModelConfig(preset="tiny"), data=data))


def test_gqa_answer_list_training_and_exact_match(tmp_path):
    ids = write_gqa(tmp_path / "gqa")
    write_store(tmp_path / "f.h5", ids)
    write_vocab(tmp_path / "tok")
    with open(tmp_path / "label2ans.pkl", "wb") as f:
        pickle.dump(["no", "yes", "left", "red", "blue"], f, protocol=2)
    task = _task(tmp_path, answers_file=str(tmp_path / "label2ans.pkl"))
    model = task.build_model()
    assert model.config.gqa_num_labels == 5 and model.config.gqa_answers[4] == "blue"
    batch = task.collate([task.dataset("train")[i] for i in range(6)])
    assert batch["target"].shape == (6, 5) and batch["target"].sum(1).tolist() == [1.0] * 6
    assert learns(task, model, batch)
    predictions = task.predict(model, "testdev")
    assert set(predictions[0]) == {"questionId", "prediction"}
    gold = {s.id: s.label for s in read_gqa(tmp_path / "gqa" / "testdev_balanced_questions.json")}
    expected = gqa_accuracy({p["questionId"]: p["prediction"] for p in predictions}, gold)
    metrics = task.evaluate(model, "testdev")
    assert metrics["accuracy"] == pytest.approx(expected)
    types = {s.id: s.extra["question_type"] for s in read_gqa(tmp_path / "gqa" / "testdev_balanced_questions.json")}
    for name in ("query", "verify"):  # per question type: the same exact match over that type's questions alone
        mine = [p for p in predictions if types[p["questionId"]] == name]
        expected = gqa_accuracy({p["questionId"]: p["prediction"] for p in mine},
                                {key: gold[key] for key in gold if types[key] == name})
        assert metrics[f"question_type/{name}"] == pytest.approx(expected)
    assert [label for label, _, _ in task.report_lines(metrics)] == ["question type 'query'", "question type 'verify'"]
    built = _task(tmp_path)
    assert built.answers() == ["no", "yes", "left", "red"]  # train answers, most frequent first


def test_gqa_missing_image_id_names_the_question(tmp_path):
    (tmp_path / "q.json").write_text('{"7": {"question": "is it red"}}')
    with pytest.raises(AnnotationError, match=r"q.json: question 7 has no 'imageId'"):
        read_gqa(tmp_path / "q.json")
