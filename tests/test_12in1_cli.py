"""The new 12-in-1 tasks end to end through the CLI: finetune a few steps, then evaluate."""

import json

import pytest
from tiny_12in1_data import write_nlvr2, write_visual7w
from tiny_task_data import write_store, write_vocab

from tasks.cli import main

COMMON = ["model.preset=tiny", "train.global_batch_size=4", "train.max_steps=2", "train.num_workers=0",
          "train.device=cpu", "train.log_every=1", "data.max_regions=4", "data.eval_batch_size=4",
          "data.max_text_length=12"]


@pytest.mark.parametrize("task", ["nlvr2", "visual7w"])
def test_finetune_and_evaluate(tmp_path, task):
    if task == "nlvr2":
        write_store(tmp_path / "f.h5", write_nlvr2(tmp_path / "data"))
        data, split, count = [], "dev", 8
    else:
        info = write_visual7w(tmp_path / "data")
        write_store(tmp_path / "f.h5", info["image_ids"], boxes=info["gt_boxes"])
        data, split, count = ["data.gt_features=[]"], "test", 4
    write_vocab(tmp_path / "tok")
    data += [f"data.root={tmp_path / 'data'}", f"data.features=[{tmp_path / 'f.h5'}]",
             f"data.tokenizer={tmp_path / 'tok'}"]
    run_dir = tmp_path / "run"
    assert main(["finetune", "--task", task, *COMMON, *data, f"train.output_dir={run_dir}"]) == 0
    checkpoint = sorted((run_dir / "checkpoints").iterdir())[-1]
    out = tmp_path / "eval"
    assert main(["evaluate", "--task", task, "--checkpoint", str(checkpoint), "--split", split, "--out", str(out),
                 *COMMON, *data]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    predictions = json.loads((out / "predictions.json").read_text())
    assert metrics["num_predictions"] == len(predictions) == count
    # the metrics are the accuracy of exactly the predictions written beside them, against the official files
    if task == "nlvr2":
        lines = (tmp_path / "data" / "dev.json").read_text().splitlines()
        gold = {e["identifier"]: e["label"] for e in map(json.loads, lines)}
        hits = [gold[p["identifier"]] == p["prediction"] for p in predictions]
    else:
        questions = json.loads((tmp_path / "data" / "dataset_v7w_pointing.json").read_text())["images"]
        gold = {qa["qa_id"]: qa["answer"] for image in questions for qa in image["qa_pairs"]}
        hits = [gold[p["qa_id"]] == p["answer"] for p in predictions]
    assert metrics["accuracy"] == pytest.approx(100 * sum(hits) / count)
