"""A converted 12-in-1 checkpoint (random weights, reference key names and shapes) evaluates every new task.

The tiny multi-task model is exported to the reference's state-dict names, converted with `vilbert convert
--from vilbert-multi-task`, and `vilbert evaluate` runs each task's tiny official-format data on it; the task
model must load every converted weight unchanged (no head starts fresh) and use the task tokens.
"""

import json

import pytest
import torch

from tasks.cli import main
from tasks.finetuning import TASK_TOKEN_IDS
from tasks.registry import build_task
from tests.fixtures.task_zoo import write_zoo
from vilbert import ViLBertConfig, ViLBertForVLTasks
from vilbert.convert import export_reference_state_dict


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(converted checkpoint directory, the model it came from)."""
    root = tmp_path_factory.mktemp("multi_task")
    torch.manual_seed(0)
    model = ViLBertForVLTasks(ViLBertConfig.from_preset("tiny", task_specific_tokens=True)).eval()
    torch.save(export_reference_state_dict(model, "vilbert-multi-task"), root / "multi_task_model.bin")
    config = {k: v for k, v in model.config.to_dict().items()
              if k in ViLBertConfig.__dataclass_fields__ and k not in ("id2label", "label2id", "dtype")}
    (root / "config.json").write_text(json.dumps(config))
    assert main(["convert", "--from", "vilbert-multi-task", "--input", str(root / "multi_task_model.bin"),
                 "--out", str(root / "converted"), "--config", str(root / "config.json")]) == 0
    return root / "converted", model


# the split each task evaluates (its tiny data: tests/fixtures/task_zoo.py)
SPLITS = {"snli-ve": "dev", "nlvr2": "dev", "gqa": "testdev", "genome-qa": "val", "visual7w": "val",
          "guesswhat-pointing": "valid", "guesswhat": "valid", "foil": "test", "flickr-grounding": "val",
          "vcr-qa": "val", "vcr-qar": "val"}


@pytest.mark.parametrize("task", list(SPLITS))
def test_converted_12in1_checkpoint_evaluates(converted, tmp_path, task, monkeypatch):
    checkpoint, reference = converted
    split = SPLITS[task]
    overrides = [*write_zoo(tmp_path, [task])[task], "data.max_regions=4", "data.eval_batch_size=4"]

    task_object = build_task(task, None, [*overrides, f"model.init={checkpoint}"])
    model = task_object.build_model()
    for name, tensor in reference.state_dict().items():  # every converted weight loads unchanged
        assert torch.equal(model.state_dict()[name], tensor), name

    seen = []
    original = ViLBertForVLTasks.forward
    monkeypatch.setattr(ViLBertForVLTasks, "forward", lambda self, *a, task_ids=None, **k: (
        seen.append(task_ids), original(self, *a, task_ids=task_ids, **k))[1])
    out = tmp_path / "eval"
    assert main(["evaluate", "--task", task, "--checkpoint", str(checkpoint), "--split", split, "--out", str(out),
                 *overrides]) == 0
    assert seen and all(ids is not None and (ids == TASK_TOKEN_IDS[task]).all() for ids in seen)
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["accuracy"] <= 100
    assert json.loads((out / "predictions.json").read_text())
