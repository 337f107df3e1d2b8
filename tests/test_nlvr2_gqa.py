"""NLVR2 (two images per sample, binary_logits, consistency) and GQA (answer list, exact match) on official files."""

import pickle

import pytest
import torch
from tiny_12in1_data import write_gqa, write_jsonl, write_nlvr2
from tiny_task_data import write_store, write_vocab

from tasks.engine.config import ModelConfig
from tasks.errors import AnnotationError
from tasks.gqa import GQAConfig, GQADataConfig, GQATask, read_gqa
from tasks.metrics import gqa_accuracy, nlvr2_scores
from tasks.nlvr2 import NLVR2Config, NLVR2DataConfig, NLVR2Task, image_pair, read_nlvr2


def _data(root, folder, **data):
    return {"root": str(root / folder), "features": [str(root / "f.h5")], "tokenizer": str(root / "tok"),
            "max_regions": 4, "max_text_length": 12, "eval_batch_size": 3, **data}


def _learns(task, model, batch, steps=10):
    first = task.training_step(model, batch).loss_sums["loss"].item()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        task.training_step(model, batch).loss_sums["loss"].backward()
        optimizer.step()
    model.eval()
    return task.training_step(model, batch).loss_sums["loss"].item() < first


def test_nlvr2_pairs_rows_and_scores_consistency(tmp_path, caplog):
    ids = write_nlvr2(tmp_path / "nlvr2")
    write_store(tmp_path / "f.h5", [i for i in ids if i != "dev-2-1-img1"])  # one dev pair lacks its right image
    write_vocab(tmp_path / "tok")
    assert image_pair("dev-850-0-3") == ["dev-850-0-img0", "dev-850-0-img1"]
    samples = read_nlvr2(tmp_path / "nlvr2" / "dev.json")
    assert samples[0].images == ["dev-1-0-img0", "dev-1-0-img1"] and samples[0].label is True
    assert read_nlvr2(tmp_path / "nlvr2" / "test1.json")[0].label is None
    task = NLVR2Task(NLVR2Config(model=ModelConfig(preset="tiny"), data=NLVR2DataConfig(**_data(tmp_path, "nlvr2"))))
    model = task.build_model()
    items = [task.dataset("train")[i] for i in range(4)]
    batch = task.collate(items)
    assert batch["input_ids"].shape[0] == 8 and batch["region_features"].shape[0] == 8  # 2 rows per sample
    assert torch.equal(batch["input_ids"][0], batch["input_ids"][1])  # the sentence with the left, then the right
    assert task.logits(model, batch).shape == (4, 2)
    assert _learns(task, model, batch)
    predictions = task.predict(model, "dev")
    assert len(predictions) == 6 and "dev-2-1-img1" in caplog.text  # 2 sentences of that pair skipped
    gold = {s.id: s.label for s in samples}
    expected = nlvr2_scores({p["identifier"]: p["prediction"] == "True" for p in predictions}, gold)
    metrics = task.evaluate(model, "dev")
    assert metrics["accuracy"] == pytest.approx(expected["accuracy"])
    assert metrics["consistency"] == pytest.approx(expected["consistency"])
    assert task.evaluate(model, "test1") == {"num_predictions": 8.0}


def test_nlvr2_bad_label_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "dev.json", [{"identifier": "dev-1-0-0", "sentence": "x", "label": "maybe"}])
    with pytest.raises(AnnotationError, match=r"dev.json: line 1 has label 'maybe'"):
        read_nlvr2(path)
    write_jsonl(path, [{"identifier": "dev-1", "sentence": "x", "label": "True"}])
    with pytest.raises(AnnotationError, match="not split-set-pair-sentence"):
        read_nlvr2(path)


def test_gqa_answer_list_training_and_exact_match(tmp_path):
    ids = write_gqa(tmp_path / "gqa")
    write_store(tmp_path / "f.h5", ids)
    write_vocab(tmp_path / "tok")
    with open(tmp_path / "label2ans.pkl", "wb") as f:
        pickle.dump(["no", "yes", "left", "red", "blue"], f, protocol=2)
    task = GQATask(GQAConfig(model=ModelConfig(preset="tiny"),
                             data=GQADataConfig(**_data(tmp_path, "gqa", answers_file=str(tmp_path / "label2ans.pkl")))))
    model = task.build_model()
    assert model.config.gqa_num_labels == 5 and model.config.gqa_answers[4] == "blue"
    batch = task.collate([task.dataset("train")[i] for i in range(6)])
    assert batch["target"].shape == (6, 5) and batch["target"].sum(1).tolist() == [1.0] * 6
    assert _learns(task, model, batch)
    predictions = task.predict(model, "testdev")
    assert set(predictions[0]) == {"questionId", "prediction"}
    gold = {s.id: s.label for s in read_gqa(tmp_path / "gqa" / "testdev_balanced_questions.json")}
    expected = gqa_accuracy({p["questionId"]: p["prediction"] for p in predictions}, gold)
    assert task.evaluate(model, "testdev")["accuracy"] == pytest.approx(expected)
    built = GQATask(GQAConfig(model=ModelConfig(preset="tiny"), data=GQADataConfig(**_data(tmp_path, "gqa"))))
    assert built.answers() == ["no", "yes", "left", "red"]  # train answers, most frequent first


def test_gqa_missing_image_id_names_the_question(tmp_path):
    (tmp_path / "q.json").write_text('{"7": {"question": "is it red"}}')
    with pytest.raises(AnnotationError, match=r"q.json: question 7 has no 'imageId'"):
        read_gqa(tmp_path / "q.json")


def test_predict_one_reads_the_statement_with_both_images(tmp_path):
    """`predict_one` answers one user example (the statement, two images' regions) as evaluation would score the
    same sample, with the choices ranked by score."""
    from features.store import FeatureStore
    from tasks.engine.task import ExampleImage, PredictExample
    from tasks.image_text import Sample

    ids = write_nlvr2(tmp_path / "nlvr2")
    write_store(tmp_path / "f.h5", ids)
    write_vocab(tmp_path / "tok")
    task = NLVR2Task(NLVR2Config(model=ModelConfig(preset="tiny"), data=NLVR2DataConfig(**_data(tmp_path, "nlvr2"))))
    model = task.build_model().eval()
    store = FeatureStore(tmp_path / "f.h5")
    regions = [store.read("dev-1-0-img0"), store.read("dev-1-0-img1")]
    text = "two dogs sitting on the left"
    example = PredictExample([ExampleImage(None, r, r.boxes, {}) for r in regions], text=text)
    result = task.predict_one(model, example)
    sample = Sample("mine-0-0-0", [text] * 2, ["a", "b"])
    with torch.no_grad():
        logits = task.logits(model, task.collate([{"index": 0, **task.encode(sample, regions)}]))[0]
    expected = str(bool(logits.argmax().item() == 1))
    assert result["prediction"]["prediction"] == expected and result["text"] == text
    assert [a["answer"] for a in result["answers"]] == [expected, str(expected == "False")]
    assert result["answers"][0]["score"] == pytest.approx(torch.sigmoid(logits.max()).item())
    with pytest.raises(IndexError):  # one image for a two-image task never reaches the model unnoticed
        task.predict_one(model, PredictExample(example.images[:1], text=text))
