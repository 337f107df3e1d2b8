"""NLVR2 on official files: two images per sample, binary_logits, consistency, one example on given regions."""

import pytest
import torch

from features.store import FeatureStore
from tasks.engine.task import ExampleImage, PredictExample
from tasks.errors import AnnotationError
from tasks.finetuning import ModelConfig
from tasks.image_text import Sample
from tasks.metrics import nlvr2_scores
from tasks.nlvr2 import NLVR2Config, NLVR2DataConfig, NLVR2Task, image_pair, read_nlvr2
from tests.fixtures.task_steps import data_options, learns
from tests.fixtures.tiny_12in1_data import write_jsonl, write_nlvr2
from tests.fixtures.tiny_task_data import write_store, write_vocab


def _task(root):
    data = NLVR2DataConfig(**data_options(root, "nlvr2", max_text_length=12))
    return NLVR2Task(NLVR2Config(model=ModelConfig(preset="tiny"), data=data))


def test_nlvr2_pairs_rows_and_scores_consistency(tmp_path, caplog):
    ids = write_nlvr2(tmp_path / "nlvr2")
    write_store(tmp_path / "f.h5", [i for i in ids if i != "dev-2-1-img1"])  # one dev pair lacks its right image
    write_vocab(tmp_path / "tok")
    assert image_pair("dev-850-0-3") == ["dev-850-0-img0", "dev-850-0-img1"]
    samples = read_nlvr2(tmp_path / "nlvr2" / "dev.json")
    assert samples[0].images == ["dev-1-0-img0", "dev-1-0-img1"] and samples[0].label is True
    assert read_nlvr2(tmp_path / "nlvr2" / "test1.json")[0].label is None
    task = _task(tmp_path)
    model = task.build_model()
    for module in model.modules():  # BERT's 0.02 init gives both rows of every pair almost the same output: whether
        if isinstance(module, torch.nn.Linear):  # 10 steps lower the loss then hangs on float rounding noise
            module.reset_parameters()
    items = [task.dataset("train")[i] for i in range(4)]
    batch = task.collate(items)
    assert batch["input_ids"].shape[0] == 8 and batch["region_features"].shape[0] == 8  # 2 rows per sample
    assert torch.equal(batch["input_ids"][0], batch["input_ids"][1])  # the sentence with the left, then the right
    assert task.logits(model, batch).shape == (4, 2)
    assert learns(task, model, batch)
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


def test_predict_one_reads_the_statement_with_both_images(tmp_path):
    """`predict_one` answers one user example (the statement, two images' regions) as evaluation would score the
    same sample, with the choices ranked by score."""
    ids = write_nlvr2(tmp_path / "nlvr2")
    write_store(tmp_path / "f.h5", ids)
    write_vocab(tmp_path / "tok")
    task = _task(tmp_path)
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
