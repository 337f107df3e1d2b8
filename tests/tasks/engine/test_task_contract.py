"""The Task contract is the whole story: a task defined only here, registered at run time, goes through finetune,
evaluate, one-example prediction, the report (with its chance level) and a multi-task run, touching no other file.
Every registered fine-tuning task names the head module a checkpoint must hold."""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from features.detectors import DETECTORS
from tasks.cli import main
from tasks.engine.checkpoints import list_checkpoints
from tasks.engine.task import ExampleInputs
from tasks.errors import ConfigError
from tasks.finetuning import FinetuneConfig, FinetuneTask, task_ids_for
from tasks.image_text import ImageTextDataConfig, ImageTextTask, Sample, one_hot, read_json_lines
from tasks.registry import TASKS, task_class
from tasks.runners.checkpoint import check_serves, read_checkpoint
from tasks.shapes.report import finetuning_rows
from tests.fixtures.tiny_task_data import write_store, write_vocab
from vilbert import ViLBertConfig, ViLBertForVLTasks

COLOURS = ("red", "green", "blue")


@dataclass
class ColourConfig(FinetuneConfig):
    data: ImageTextDataConfig = field(default_factory=ImageTextDataConfig)


class ColourTask(ImageTextTask):
    """Which colour does the caption name? `colour_<split>.jsonl`: {"id", "image", "text", "colour"}."""

    name = "colour"
    head = "tri_logits"
    config_class = ColourConfig
    example_inputs = ExampleInputs("caption", example_text="a red shape")

    def annotation_file(self, split: str) -> Path:
        return Path(self.data.root) / f"colour_{split}.jsonl"

    def read_samples(self, split: str) -> list[Sample]:
        return [Sample(e["id"], [e["text"]], [e["image"]], COLOURS.index(e["colour"]))
                for _, e in read_json_lines(self.annotation_file(split))]

    def target(self, sample: Sample) -> torch.Tensor:
        return one_hot(sample.label, len(COLOURS))

    def decode(self, sample: Sample, logits: torch.Tensor) -> dict:
        return {"id": sample.id, "label": int(logits.argmax())}

    def choice_labels(self, sample: Sample) -> list[str]:
        return list(COLOURS)


@pytest.fixture
def colour_task(tmp_path, monkeypatch):
    """The task registered for this test only, its tiny data and its config file."""
    monkeypatch.setitem(TASKS, "colour", f"{__name__}:ColourTask")
    images = [f"img{i}" for i in range(8)]
    write_store(tmp_path / "f.h5", images)
    write_vocab(tmp_path / "tok")
    for split, first in (("train", 0), ("val", 4), ("test", 4)):
        rows = [{"id": f"{split}{i}", "image": images[first + i % 4], "text": f"a {COLOURS[i % 3]} shape",
                 "colour": COLOURS[min(i % 4, 2)]} for i in range(8)]  # red, green, blue, blue, ...
        (tmp_path / f"colour_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"model": {"preset": "tiny"},
              "train": {"output_dir": str(tmp_path / "run"), "global_batch_size": 4, "max_steps": 2,
                        "num_workers": 0, "device": "cpu", "log_every": 1},
              "data": {"root": str(tmp_path), "features": [str(tmp_path / "f.h5")], "tokenizer": str(tmp_path / "tok"),
                       "max_regions": 5, "max_text_length": 8, "eval_batch_size": 4}}
    (tmp_path / "colour.yaml").write_text(yaml.safe_dump(config))
    return tmp_path


def test_a_task_registered_at_run_time_trains_evaluates_predicts_and_reports(colour_task, capsys, monkeypatch):
    root = colour_task
    assert main(["finetune", "--task", "colour", "--config", str(root / "colour.yaml")]) == 0
    checkpoint = list_checkpoints(root / "run")[-1]
    assert json.loads((checkpoint / "run.json").read_text())["task"] == "colour"

    out = root / "eval"
    assert main(["evaluate", "--task", "colour", "--checkpoint", str(checkpoint), "--split", "test",
                 "--config", str(root / "colour.yaml"), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "colour" and metrics["num_items"] == 8 and 0 <= metrics["accuracy"] <= 100
    assert len(json.loads((out / "predictions.json").read_text())) == 8

    # one example on a new image through `vilbert predict-task`, which takes its --task choices from the registry
    monkeypatch.setitem(DETECTORS, "tiny-test-16", "tests.fixtures.tiny_multitask:build_wide_tiny_detector")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(root / "new.png")
    capsys.readouterr()
    assert main(["predict-task", "--task", "colour", "--checkpoint", str(checkpoint), "--image", str(root / "new.png"),
                 "--text", "a green shape", "--detector", "tiny-test-16", "--random-detector", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert sorted(a["answer"] for a in result["answers"]) == sorted(COLOURS)
    assert set(result["prediction"]) == {"id", "label"}
    assert COLOURS[result["prediction"]["label"]] == result["answers"][0]["answer"]

    # the report: the test split's accuracy beside the blind guess (always the most frequent training colour,
    # blue: 4 of the test split's 8 items)
    (row,) = finetuning_rows(root / "run", "colour", splits=[("held-out test", "test", None)])
    assert row.name == "held-out test: accuracy" and row.value == pytest.approx(metrics["accuracy"])
    assert row.chance == pytest.approx(50.0)


def test_a_task_registered_at_run_time_trains_in_a_multi_task_run(colour_task):
    root = colour_task
    multi = {"model": {"preset": "tiny"},
             "train": {"output_dir": str(root / "multi"), "global_batch_size": 4, "max_steps": 2, "num_workers": 0,
                       "device": "cpu", "log_every": 1},
             "tasks": [{"name": "colour", "config": str(root / "colour.yaml")},
                       {"name": "colour", "label": "colour-again", "config": str(root / "colour.yaml")}]}
    (root / "multi.yaml").write_text(yaml.safe_dump(multi))
    assert main(["finetune", "--task", "multi", "--config", str(root / "multi.yaml")]) == 0
    record = json.loads((list_checkpoints(root / "multi")[-1] / "run.json").read_text())
    assert record["tasks"] == ["colour", "colour"]


@pytest.fixture(scope="module")
def headless(tmp_path_factory):
    """head module -> a task checkpoint without it (written once per head)."""
    model, written = ViLBertForVLTasks(ViLBertConfig.from_preset("tiny")), {}

    def without(head: str) -> Path:
        if head not in written:
            written[head] = tmp_path_factory.mktemp(head)
            model.save_pretrained(written[head], state_dict={k: v for k, v in model.state_dict().items()
                                                             if not k.startswith(f"{head}.")})
        return written[head]
    return without


@pytest.mark.parametrize("name", [n for n in TASKS if issubclass(task_class(n), FinetuneTask)])
def test_every_fine_tuning_task_refuses_a_checkpoint_without_its_head_by_name(name, headless):
    cls = task_class(name)
    (head,) = cls.head_modules
    task = cls.__new__(cls)  # the check reads only class attributes
    with pytest.raises(ConfigError, match=re.escape(f"has no {head} weights (needed by {name})")):
        check_serves(read_checkpoint(headless(head)), task)


def test_a_task_token_a_12in1_model_lacks_is_one_clear_error():
    model = ViLBertForVLTasks(ViLBertConfig.from_preset("tiny", task_specific_tokens=True))
    with pytest.raises(ConfigError, match=r"task token 'colour': the model has 12-in-1 task tokens"):
        task_ids_for(model, "colour", 2, torch.device("cpu"))
    assert task_ids_for(ViLBertForVLTasks(ViLBertConfig.from_preset("tiny")), "colour", 2, "cpu") is None
