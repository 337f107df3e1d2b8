"""Visual Genome QA on tiny files in the official format: VQA-normalised answers through the VQA head."""

import pytest

from tasks.finetuning import ModelConfig
from tasks.genome_qa import GenomeQAConfig, GenomeQADataConfig, GenomeQATask
from tasks.metrics import accuracy
from tests.fixtures.task_steps import data_options, learns
from tests.fixtures.tiny_12in1_data import write_genome_qa
from tests.fixtures.tiny_task_data import write_store, write_vocab


def test_genome_qa_answers_through_the_vqa_head(tmp_path):
    write_store(tmp_path / "f.h5", write_genome_qa(tmp_path / "vg"))
    write_vocab(tmp_path / "tok")
    task = GenomeQATask(GenomeQAConfig(model=ModelConfig(preset="tiny"), data=GenomeQADataConfig(
        **data_options(tmp_path, "vg", val_images=1, min_answer_count=1))))
    assert len(task.samples("train")) == 9 and len(task.samples("val")) == 3
    assert sorted(task.answers()) == ["2", "red", "yes"]  # VQA-normalised ("Two" -> "2", "red." -> "red")
    model = task.build_model()
    assert model.config.num_labels == 3
    batch = task.collate([task.dataset("train")[i] for i in range(6)])
    assert learns(task, model, batch)
    predictions = task.predict(model, "val")
    gold = {s.id: s.label for s in task.samples("val")}
    assert task.evaluate(model, "val")["accuracy"] == pytest.approx(
        accuracy({p["qa_id"]: p["answer"] for p in predictions}, gold))
