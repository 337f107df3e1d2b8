"""SNLI-VE: the official JSON lines → three-way samples, training on tri_logits, accuracy."""

import pytest
import torch

from tasks.errors import AnnotationError, DataError
from tasks.finetuning import ModelConfig
from tasks.metrics import accuracy
from tasks.snli_ve import LABELS, SNLIVEConfig, SNLIVEDataConfig, SNLIVETask, read_snli_ve
from tests.fixtures.tiny_12in1_data import write_jsonl, write_snli_ve
from tests.fixtures.tiny_task_data import write_store, write_vocab


@pytest.fixture
def snli(tmp_path):
    ids = write_snli_ve(tmp_path / "snli")
    write_store(tmp_path / "f.h5", ids)
    write_vocab(tmp_path / "tok")
    return tmp_path


def _task(root, **data):
    data = {"root": str(root / "snli"), "features": [str(root / "f.h5")], "tokenizer": str(root / "tok"),
            "max_regions": 5, "max_text_length": 12, "eval_batch_size": 4, **data}
    return SNLIVETask(SNLIVEConfig(model=ModelConfig(preset="tiny"), data=SNLIVEDataConfig(**data)))


def test_reads_labels_and_image_stems(snli):
    samples = read_snli_ve(snli / "snli" / "snli_ve_dev.jsonl")
    assert len(samples) == 6 and samples[0].images == ["1010"] and samples[0].texts == ["a man holding a red ball"]
    assert [s.label for s in samples[:3]] == [LABELS.index("neutral"), LABELS.index("contradiction"),
                                              LABELS.index("entailment")]


def test_bad_lines_name_the_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "snli_ve_dev.jsonl", [
        {"Flikr30kID": "1.jpg", "sentence2": "x", "gold_label": "entailment", "pairID": "a"},
        {"Flikr30kID": "1.jpg", "sentence2": "x", "gold_label": "maybe", "pairID": "b"}])
    with pytest.raises(AnnotationError, match=r"snli_ve_dev.jsonl: line 2 has gold_label 'maybe'"):
        read_snli_ve(path)
    path.write_text('{"Flikr30kID": "1.jpg", "gold_label": "neutral", "pairID": "a"}\n')
    with pytest.raises(AnnotationError, match=r"line 1 has no 'sentence2'"):
        read_snli_ve(path)
    path.write_text("{\n")
    with pytest.raises(AnnotationError, match="line 1 is not valid JSON"):
        read_snli_ve(path)


def test_training_step_learns_and_evaluate_scores_accuracy(snli):
    task = _task(snli)
    model = task.build_model()
    batch = task.collate([task.dataset("train")[i] for i in range(6)])
    assert batch["target"].shape == (6, 3) and batch["region_features"].shape == (6, 5, 16)
    first = task.training_step(model, batch).loss_sums["loss"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(10):
        optimizer.zero_grad()
        task.training_step(model, batch).loss_sums["loss"].backward()
        optimizer.step()
    model.eval()
    assert task.training_step(model, batch).loss_sums["loss"].item() < first.item()
    predictions = task.predict(model, "val")
    assert {p["pairID"] for p in predictions} == {s.id for s in task.samples("dev")}
    gold = {s.id: LABELS[s.label] for s in task.samples("dev")}
    expected = accuracy({p["pairID"]: p["gold_label"] for p in predictions}, gold)
    assert task.evaluate(model, "val")["accuracy"] == pytest.approx(expected)


def test_missing_images_are_skipped_and_counted_wrong(snli, caplog):
    write_store(snli / "f.h5", ["1010", "1011"])  # dev image 1012 has no features
    task = _task(snli)
    predictions = task.predict(task.build_model(), "dev")
    assert len(predictions) == 4
    assert "2 item(s) skipped (counted wrong): 1 image id(s) not in the feature store: 1012" in caplog.text
    everything_right = [{**p, "gold_label": LABELS[s.label]} for p in predictions for s in task.samples("dev")
                        if s.id == p["pairID"]]
    assert task.score(everything_right, "dev")["accuracy"] == pytest.approx(100 * 4 / 6)
    with pytest.raises(DataError, match="1012"):
        _task(snli, strict=True).dataset("dev")
