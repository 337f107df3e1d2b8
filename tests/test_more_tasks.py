"""Visual Genome QA, FOIL, Flickr30k Entities grounding and VCR on tiny files in their official formats."""

import pytest
import torch
from tiny_12in1_data import (
    VCR_WORDS,
    write_flickr_entities,
    write_foil,
    write_genome_qa,
    write_jsonl,
    write_vcr,
    write_vocab_with,
)
from tiny_task_data import write_store, write_vocab

from tasks.errors import AnnotationError
from tasks.finetuning import ModelConfig
from tasks.flickr_grounding import (
    FlickrGroundingConfig,
    FlickrGroundingDataConfig,
    FlickrGroundingTask,
    read_entity_boxes,
    read_phrases,
)
from tasks.foil import FoilConfig, FoilDataConfig, FoilTask
from tasks.genome_qa import GenomeQAConfig, GenomeQADataConfig, GenomeQATask
from tasks.metrics import accuracy, grounding_accuracy
from tasks.vcr import VCRConfig, VCRDataConfig, VCRRationaleTask, VCRTask, joint_scores, read_vcr


def _data(root, folder, **data):
    return {"root": str(root / folder), "features": [str(root / "f.h5")], "tokenizer": str(root / "tok"),
            "max_regions": 4, "max_text_length": 16, "eval_batch_size": 3, **data}


def _learns(task, model, batch, steps=10, lr=1e-3):
    first = task.training_step(model, batch).loss_sums["loss"].item()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        task.training_step(model, batch).loss_sums["loss"].backward()
        optimizer.step()
    model.eval()
    return task.training_step(model, batch).loss_sums["loss"].item() < first


def test_genome_qa_answers_through_the_vqa_head(tmp_path):
    write_store(tmp_path / "f.h5", write_genome_qa(tmp_path / "vg"))
    write_vocab(tmp_path / "tok")
    task = GenomeQATask(GenomeQAConfig(model=ModelConfig(preset="tiny"), data=GenomeQADataConfig(
        **_data(tmp_path, "vg", val_images=1, min_answer_count=1))))
    assert len(task.samples("train")) == 9 and len(task.samples("val")) == 3
    assert sorted(task.answers()) == ["2", "red", "yes"]  # VQA-normalised ("Two" -> "2", "red." -> "red")
    model = task.build_model()
    assert model.config.num_labels == 3
    batch = task.collate([task.dataset("train")[i] for i in range(6)])
    assert _learns(task, model, batch)
    predictions = task.predict(model, "val")
    gold = {s.id: s.label for s in task.samples("val")}
    assert task.evaluate(model, "val")["accuracy"] == pytest.approx(
        accuracy({p["qa_id"]: p["answer"] for p in predictions}, gold))


def test_foil_one_logit_per_caption(tmp_path):
    write_store(tmp_path / "f.h5", write_foil(tmp_path / "foil"))
    write_vocab(tmp_path / "tok")
    task = FoilTask(FoilConfig(model=ModelConfig(preset="tiny"), data=FoilDataConfig(**_data(tmp_path, "foil"))))
    model = task.build_model()
    batch = task.collate([task.dataset("train")[i] for i in range(4)])
    assert batch["target"].tolist() == [[1.0], [0.0], [1.0], [0.0]]
    assert _learns(task, model, batch)
    predictions = task.predict(model, "test")
    gold = {s.id: s.label for s in task.samples("test")}
    assert task.evaluate(model, "test")["accuracy"] == pytest.approx(
        accuracy({p["id"]: p["foil"] for p in predictions}, gold))
    (tmp_path / "bad.json").write_text('{"annotations": [{"id": 1, "image_id": 2, "caption": "x", "foil": "yes"}]}')
    with pytest.raises(AnnotationError, match=r"bad.json: annotations\[0\] has foil 'yes'"):
        from tasks.foil import read_foil

        read_foil(tmp_path / "bad.json")


def test_flickr_grounding_phrases_union_boxes_and_accuracy(tmp_path):
    info = write_flickr_entities(tmp_path / "f30k")
    write_store(tmp_path / "f.h5", info["image_ids"], boxes=info["boxes"])
    write_vocab(tmp_path / "tok")
    assert read_entity_boxes(tmp_path / "f30k" / "Annotations" / "5010.xml")[2] == [[50, 10, 60, 20], [70, 10, 80, 20]]
    phrases = read_phrases(tmp_path / "f30k", "val")
    assert [(p.text, p.entity_id) for p in phrases[:2]] == [("A man", 1), ("two balls", 2)]  # the scene has no box
    assert phrases[1].box == (50, 10, 80, 20) and len(phrases) == 8
    task = FlickrGroundingTask(FlickrGroundingConfig(model=ModelConfig(preset="tiny"), data=FlickrGroundingDataConfig(
        **_data(tmp_path, "f30k"))))
    model = task.build_model()
    batch = task.collate([task.dataset("train")[i] for i in range(4)])
    assert _learns(task, model, batch)
    predictions = task.predict(model, "val")
    assert set(predictions[0]) == {"image_id", "sentence", "phrase", "entity_id", "box", "score"}
    expected = grounding_accuracy({(p["image_id"], p["sentence"], p["phrase"]): p["box"] for p in predictions},
                                  {p.key: p.box for p in phrases})
    assert task.evaluate(model, "val")["accuracy"] == pytest.approx(expected)
    (tmp_path / "f30k" / "Sentences" / "5010.txt").write_text("[/EN#1/people A man .\n")
    with pytest.raises(AnnotationError, match=r"5010.txt: line 1 has a malformed"):
        read_phrases(tmp_path / "f30k", "val")


def test_vcr_tags_become_names_and_q_ar_needs_both(tmp_path):
    write_store(tmp_path / "f.h5", write_vcr(tmp_path / "vcr"))
    write_vocab_with(tmp_path / "tok", VCR_WORDS)
    answers = read_vcr(tmp_path / "vcr" / "val.jsonl", "answer")
    assert answers[0].texts[0] == ("What is Casey doing with dog ?", "Casey is walking it .")
    assert answers[0].texts[3][1] == "Casey and Riley are talking ."  # the second person gets the second name
    rationales = read_vcr(tmp_path / "vcr" / "val.jsonl", "rationale")
    assert rationales[1].texts[0][0] == "What is Casey doing with dog ? Riley runs ."  # with the correct answer
    data = VCRDataConfig(**_data(tmp_path, "vcr", max_text_length=24))
    qa, qar = (cls(VCRConfig(model=ModelConfig(preset="tiny"), data=data)) for cls in (VCRTask, VCRRationaleTask))
    model = qa.build_model()
    batch = qa.collate([qa.dataset("train")[i] for i in range(3)])
    assert batch["input_ids"].shape == (12, 24) and batch["token_type_ids"][0].max() == 1  # sentence pairs
    assert _learns(qa, model, batch, steps=25, lr=1e-2)  # a 4-way softmax over one logit learns slowly
    answer_predictions, rationale_predictions = qa.predict(model, "val"), qar.predict(model, "val")
    metrics = qa.evaluate(model, "val")
    assert metrics["q_a"] == pytest.approx(accuracy({p["annot_id"]: p["choice"] for p in answer_predictions},
                                                    {s.id: s.label for s in answers}))
    joint = joint_scores(answer_predictions, rationale_predictions, answers, rationales)
    assert joint["q_ar"] <= min(joint["q_a"], joint["qa_r"])
    assert qa.evaluate(model, "test") == {"num_predictions": 3.0}
    write_jsonl(tmp_path / "bad.jsonl", [{"annot_id": "x", "objects": ["dog"], "img_fn": "a.jpg",
                                          "question": [[3]], "answer_choices": [["a"]] * 4}])
    with pytest.raises(AnnotationError, match=r"bad.jsonl: line 1 tags object \[3\], but the item has 1 objects"):
        read_vcr(tmp_path / "bad.jsonl", "answer")
