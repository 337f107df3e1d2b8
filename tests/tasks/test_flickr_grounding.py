"""Flickr30k Entities grounding on tiny files in the official format: phrases, union boxes, accuracy."""

import pytest

from tasks.errors import AnnotationError
from tasks.finetuning import ModelConfig
from tasks.flickr_grounding import (
    FlickrGroundingConfig,
    FlickrGroundingDataConfig,
    FlickrGroundingTask,
    read_entity_boxes,
    read_phrases,
)
from tasks.metrics import grounding_accuracy
from tests.fixtures.task_steps import data_options, learns
from tests.fixtures.tiny_12in1_data import write_flickr_entities
from tests.fixtures.tiny_task_data import write_store, write_vocab


def test_flickr_grounding_phrases_union_boxes_and_accuracy(tmp_path):
    info = write_flickr_entities(tmp_path / "f30k")
    write_store(tmp_path / "f.h5", info["image_ids"], boxes=info["boxes"])
    write_vocab(tmp_path / "tok")
    assert read_entity_boxes(tmp_path / "f30k" / "Annotations" / "5010.xml")[2] == [[50, 10, 60, 20], [70, 10, 80, 20]]
    phrases = read_phrases(tmp_path / "f30k", "val")
    assert [(p.text, p.entity_id) for p in phrases[:2]] == [("A man", 1), ("two balls", 2)]  # the scene has no box
    assert phrases[1].box == (50, 10, 80, 20) and len(phrases) == 8
    task = FlickrGroundingTask(FlickrGroundingConfig(model=ModelConfig(preset="tiny"), data=FlickrGroundingDataConfig(
        **data_options(tmp_path, "f30k"))))
    model = task.build_model()
    batch = task.collate([task.dataset("train")[i] for i in range(4)])
    assert learns(task, model, batch)
    predictions = task.predict(model, "val")
    assert set(predictions[0]) == {"image_id", "sentence", "phrase", "entity_id", "box", "score"}
    expected = grounding_accuracy({(p["image_id"], p["sentence"], p["phrase"]): p["box"] for p in predictions},
                                  {p.key: p.box for p in phrases})
    assert task.evaluate(model, "val")["accuracy"] == pytest.approx(expected)
    (tmp_path / "f30k" / "Sentences" / "5010.txt").write_text("[/EN#1/people A man .\n")
    with pytest.raises(AnnotationError, match=r"5010.txt: line 1 has a malformed"):
        read_phrases(tmp_path / "f30k", "val")
