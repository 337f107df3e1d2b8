"""FOIL on tiny files in the official format: one logit per caption, accuracy, bad labels named."""

import pytest

from tasks.errors import AnnotationError
from tasks.finetuning import ModelConfig
from tasks.foil import FoilConfig, FoilDataConfig, FoilTask, read_foil
from tasks.metrics import accuracy
from tests.fixtures.task_steps import data_options, learns
from tests.fixtures.tiny_12in1_data import write_foil
from tests.fixtures.tiny_task_data import write_store, write_vocab


def test_foil_one_logit_per_caption(tmp_path):
    write_store(tmp_path / "f.h5", write_foil(tmp_path / "foil"))
    write_vocab(tmp_path / "tok")
    task = FoilTask(FoilConfig(model=ModelConfig(preset="tiny"), data=FoilDataConfig(**data_options(tmp_path, "foil"))))
    model = task.build_model()
    batch = task.collate([task.dataset("train")[i] for i in range(4)])
    assert batch["target"].tolist() == [[1.0], [0.0], [1.0], [0.0]]
    assert learns(task, model, batch)
    predictions = task.predict(model, "test")
    gold = {s.id: s.label for s in task.samples("test")}
    assert task.evaluate(model, "test")["accuracy"] == pytest.approx(
        accuracy({p["id"]: p["foil"] for p in predictions}, gold))
    (tmp_path / "bad.json").write_text('{"annotations": [{"id": 1, "image_id": 2, "caption": "x", "foil": "yes"}]}')
    with pytest.raises(AnnotationError, match=r"bad.json: annotations\[0\] has foil 'yes'"):
        read_foil(tmp_path / "bad.json")
