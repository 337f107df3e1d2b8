"""A converted 12-in-1 checkpoint (random weights, reference key names and shapes) evaluates every new task.

The tiny multi-task model is exported to the reference's state-dict names, converted with `vilbert convert
--from vilbert-multi-task`, and `vilbert evaluate` runs each task's tiny official-format data on it; the task
model must load every converted weight unchanged (no head starts fresh) and use the task tokens.
"""

import json
import pickle

import pytest
import torch
from tiny_12in1_data import (
    VCR_WORDS,
    write_flickr_entities,
    write_foil,
    write_genome_qa,
    write_gqa,
    write_guesswhat,
    write_nlvr2,
    write_snli_ve,
    write_vcr,
    write_visual7w,
    write_vocab_with,
)
from tiny_task_data import write_store

from tasks.cli import main
from tasks.cli.evaluate import load_task
from tasks.finetuning import TASK_TOKEN_IDS
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


def _answers(path, answers, size):
    with open(path, "wb") as f:
        pickle.dump(answers + [f"other{i}" for i in range(size - len(answers))], f, protocol=2)
    return path


def _data(task, root):
    """(data overrides, split) of the task's tiny data under `root`."""
    data = root / "data"
    if task == "snli-ve":
        ids, split, extra = write_snli_ve(data), "dev", []
    elif task == "nlvr2":
        ids, split, extra = write_nlvr2(data), "dev", []
    elif task == "gqa":
        ids, split = write_gqa(data), "testdev"
        extra = [f"data.answers_file={_answers(root / 'gqa.pkl', ['yes', 'no', 'red', 'left'], 11)}"]
    elif task == "genome-qa":
        ids, split = write_genome_qa(data), "val"
        extra = [f"data.answers_file={_answers(root / 'vqa.pkl', ['2', 'red', 'yes'], 10)}", "data.val_images=1"]
    elif task == "foil":
        ids, split, extra = write_foil(data), "test", []
    elif task == "guesswhat":
        ids, split, extra = write_guesswhat(data)["image_ids"], "valid", []
    elif task in ("vcr-qa", "vcr-qar"):
        ids, split, extra = write_vcr(data), "val", ["data.gt_features=[]"]
    elif task == "flickr-grounding":
        info = write_flickr_entities(data)
        write_store(root / "f.h5", info["image_ids"], boxes=info["boxes"])
        return [f"data.root={data}", f"data.features=[{root / 'f.h5'}]", "data.gt_features=[]"], "val"
    else:
        info = write_visual7w(data) if task == "visual7w" else write_guesswhat(data)
        write_store(root / "f.h5", info["image_ids"], boxes=info["gt_boxes"])
        split = "val" if task == "visual7w" else "valid"
        return [f"data.root={data}", f"data.features=[{root / 'f.h5'}]", "data.gt_features=[]"], split
    write_store(root / "f.h5", ids)
    return [f"data.root={data}", f"data.features=[{root / 'f.h5'}]", *extra], split


TASKS = ["snli-ve", "nlvr2", "gqa", "genome-qa", "visual7w", "guesswhat-pointing", "guesswhat", "foil",
         "flickr-grounding", "vcr-qa", "vcr-qar"]


@pytest.mark.parametrize("task", TASKS)
def test_converted_12in1_checkpoint_evaluates(converted, tmp_path, task, monkeypatch):
    checkpoint, reference = converted
    overrides, split = _data(task, tmp_path)
    write_vocab_with(tmp_path / "tok", VCR_WORDS)
    overrides += [f"data.tokenizer={tmp_path / 'tok'}", "data.max_regions=4", "data.max_text_length=20",
                  "data.eval_batch_size=4"]

    task_object = load_task(task, None, [*overrides, f"model.init={checkpoint}"])
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
