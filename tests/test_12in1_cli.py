"""The new 12-in-1 tasks end to end through the CLI: finetune a few steps, then evaluate."""

import json

import pytest
from cli_check import assert_refused
from tiny_12in1_data import VCR_WORDS, write_nlvr2, write_vcr, write_visual7w, write_vocab_with
from tiny_task_data import write_store, write_vocab

from tasks.cli import main
from tasks.errors import AnnotationError, DataError
from tasks.vcr import leaderboard_rows, read_vcr

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


def test_vcr_leaderboard_csv(tmp_path, capsys):
    write_store(tmp_path / "f.h5", write_vcr(tmp_path / "vcr"))
    write_vocab_with(tmp_path / "tok", VCR_WORDS)
    data = [f"data.root={tmp_path / 'vcr'}", f"data.features=[{tmp_path / 'f.h5'}]", "data.gt_features=[]",
            f"data.tokenizer={tmp_path / 'tok'}", "data.max_text_length=24", "train.global_batch_size=3"]
    run_dir = tmp_path / "run"
    assert main(["finetune", "--task", "vcr-qa", *COMMON, *data, f"train.output_dir={run_dir}"]) == 0
    checkpoint = str(sorted((run_dir / "checkpoints").iterdir())[-1])
    out = tmp_path / "vcr_test.csv"
    assert main(["vcr-submission", "--checkpoint", checkpoint, "--out", str(out), *COMMON, *data]) == 0
    lines = out.read_text().splitlines()
    header = lines[0].split(",")
    assert header[:5] == ["annot_id", "answer_0", "answer_1", "answer_2", "answer_3"]
    assert header[5] == "rationale_conditioned_on_a0_0" and header[-1] == "rationale_conditioned_on_a3_3"
    rows = [line.split(",") for line in lines[1:]]
    assert [row[0] for row in rows] == ["test-0", "test-1", "test-2"] and all(len(row) == 21 for row in rows)
    for row in rows:  # five distributions over 4 choices
        values = [float(v) for v in row[1:]]
        assert all(abs(sum(values[k:k + 4]) - 1) < 1e-3 for k in range(0, 20, 4))
    assert "3 items" in capsys.readouterr().out
    # the four QA→R readings of an unlabelled item differ only in the answer placed in the context
    readings = [read_vcr(tmp_path / "vcr" / "test.jsonl", "rationale", answer=i)[0] for i in range(4)]
    assert [r.texts[0][0] for r in readings] == [
        "What is Casey doing with dog ? Casey is walking it .", "What is Casey doing with dog ? Riley runs .",
        "What is Casey doing with dog ? Nothing .", "What is Casey doing with dog ? Casey and Riley are talking ."]
    with pytest.raises(AnnotationError, match="test.jsonl: line 1 has no answer_label; QA→R needs the correct"):
        read_vcr(tmp_path / "vcr" / "test.jsonl", "rationale")

    # a Q→A checkpoint given as the QA→R one (run.json says which is which) is refused, nothing written
    out.unlink()
    line = assert_refused(["vcr-submission", "--checkpoint", checkpoint, "--rationale-checkpoint", checkpoint,
                           "--out", str(out), *COMMON, *data], names=["--rationale-checkpoint", "vcr-qa"],
                          watch=[tmp_path])
    assert "trained for vcr-qa" in line
    # a test item without features cannot be left out of the leaderboard: refused, naming the image
    partial = write_store(tmp_path / "partial.h5", [i for i in write_vcr(tmp_path / "vcr") if i != "test_1"])
    assert_refused(["vcr-submission", "--checkpoint", checkpoint, "--out", str(out), *COMMON, *data,
                    f"data.features=[{partial}]"], names=["test_1", "not in the feature store"], watch=[tmp_path])


def test_vcr_leaderboard_refuses_a_repeated_item():
    once = {"annot_id": "test-0", "probabilities": [0.25] * 4}
    with pytest.raises(DataError, match="'test-0' appears twice"):
        leaderboard_rows([once, once], [[once]] * 4)


def test_vcr_condition_on_answer_must_name_a_choice(tmp_path, capsys):
    assert main(["vcr-submission", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "x.csv"),
                 "data.condition_on_answer=4"]) == 2
    assert "data.condition_on_answer must be 0, 1, 2 or 3, got 4" in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()
