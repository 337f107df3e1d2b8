"""End to end through the CLI on tiny data: finetune a few steps, evaluate, score, per task (the 12-in-1 tasks
included, and the VCR submission)."""

import json

import pytest

from tasks.cli import main
from tasks.errors import AnnotationError, DataError
from tasks.vcr import leaderboard_rows, read_vcr
from tests.fixtures.cli_check import assert_refused
from tests.fixtures.tiny_12in1_data import VCR_WORDS, write_nlvr2, write_vcr, write_visual7w, write_vocab_with
from tests.fixtures.tiny_task_data import write_karpathy, write_refcoco, write_store, write_vocab, write_vqa

COMMON = ["model.preset=tiny", "train.global_batch_size=4", "train.max_steps=2", "train.num_workers=0",
          "train.device=cpu", "train.log_every=1", "data.max_regions=5", "data.eval_batch_size=4"]


def _finetune(task, tmp_path, extra):
    run_dir = tmp_path / "run"
    code = main(["finetune", "--task", task, *COMMON, f"train.output_dir={run_dir}",
                 f"data.tokenizer={tmp_path / 'tok'}", *extra])
    assert code == 0
    checkpoints = sorted((run_dir / "checkpoints").iterdir())
    assert checkpoints
    return checkpoints[-1]


def test_vqa_finetune_evaluate_submit_and_score(tmp_path, capsys):
    info = write_vqa(tmp_path / "vqa")
    write_store(tmp_path / "f.h5", [str(i) for i in info["image_ids"]])
    write_vocab(tmp_path / "tok")
    data = [f"data.root={tmp_path / 'vqa'}", f"data.features=[{tmp_path / 'f.h5'}]", "data.min_answer_count=1",
            "data.minval_size=4"]
    checkpoint = _finetune("vqa", tmp_path, data)
    out = tmp_path / "eval"
    assert main(["evaluate", "--task", "vqa", "--checkpoint", str(checkpoint), "--split", "val",
                 "--out", str(out), f"data.tokenizer={tmp_path / 'tok'}", "data.max_regions=5", *data]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_questions"] == 12  # all of val, although the run's "val" role (data.val_split) is minval
    assert main(["evaluate", "--task", "vqa", "--checkpoint", str(checkpoint), "--split", "minval",
                 "--out", str(tmp_path / "minval"), f"data.tokenizer={tmp_path / 'tok'}", "data.max_regions=5",
                 *data]) == 0
    assert json.loads((tmp_path / "minval" / "metrics.json").read_text())["num_questions"] == 4
    # the CLI score of the written predictions (all of val, as the official evaluator requires) equals evaluate's
    assert main(["score", "--task", "vqa", "--predictions", str(out / "predictions.json"),
                 "--annotations", str(tmp_path / "vqa" / "v2_mscoco_val2014_annotations.json"),
                 "--questions", str(tmp_path / "vqa" / "v2_OpenEnded_mscoco_val2014_questions.json")]) == 0
    assert f"overall {metrics['accuracy']:.2f} over 12 questions" in capsys.readouterr().out
    test_out = tmp_path / "test"
    assert main(["evaluate", "--task", "vqa", "--checkpoint", str(checkpoint), "--split", "test-dev",
                 "--out", str(test_out), f"data.tokenizer={tmp_path / 'tok'}", "data.max_regions=5", *data]) == 0
    submission = json.loads((test_out / "predictions.json").read_text())
    questions = json.loads((tmp_path / "vqa" / "v2_OpenEnded_mscoco_test-dev2015_questions.json").read_text())
    assert sorted(s["question_id"] for s in submission) == sorted(q["question_id"] for q in questions["questions"])


def test_retrieval_finetune_and_evaluate(tmp_path):
    ids = write_karpathy(tmp_path / "flickr" / "dataset_flickr30k.json")
    write_store(tmp_path / "f.h5", ids)
    write_vocab(tmp_path / "tok")
    data = [f"data.root={tmp_path / 'flickr'}", f"data.features=[{tmp_path / 'f.h5'}]", "data.max_text_length=12",
            "data.val_split=test"]
    checkpoint = _finetune("retrieval", tmp_path, data)
    out = tmp_path / "eval"
    assert main(["evaluate", "--task", "retrieval", "--checkpoint", str(checkpoint), "--split", "test",
                 "--out", str(out), f"data.tokenizer={tmp_path / 'tok'}", "data.max_regions=5", *data]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_captions"] == 6 and metrics["r10"] == 100.0


@pytest.mark.parametrize("task", ["refcoco", "refcoco+"])
def test_refexp_finetune_and_evaluate(tmp_path, task):
    info = write_refcoco(tmp_path / task)
    write_store(tmp_path / "det.h5", info["image_ids"], boxes=info["boxes"])
    write_vocab(tmp_path / "tok")
    data = [f"data.root={tmp_path / task}", f"data.features=[{tmp_path / 'det.h5'}]", "data.gt_features=[]"]
    checkpoint = _finetune(task, tmp_path, data)
    out = tmp_path / "eval"
    assert main(["evaluate", "--task", task, "--checkpoint", str(checkpoint), "--split", "testA",
                 "--out", str(out), f"data.tokenizer={tmp_path / 'tok'}", "data.max_regions=5", *data]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    predictions = json.loads((out / "predictions.json").read_text())
    assert metrics["num_expressions"] == len(predictions) == 4 and len(predictions[0]["box"]) == 4
    # the metrics describe exactly the predictions written beside them (one inference pass)
    assert metrics["accuracy"] == pytest.approx(100 * sum(p["iou"] >= 0.5 for p in predictions) / 4)


def test_bad_annotation_file_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "p.json").write_text('[{"question_id": 1}]')
    (tmp_path / "a.json").write_text('{"annotations": []}')
    (tmp_path / "q.json").write_text('{"questions": []}')
    assert main(["score", "--task", "vqa", "--predictions", str(tmp_path / "p.json"), "--annotations",
                 str(tmp_path / "a.json"), "--questions", str(tmp_path / "q.json")]) == 2
    assert "p.json: entry 0 has no 'answer'" in capsys.readouterr().err

    (tmp_path / "p.json").write_text('[{"question_id": 1, "answer": "yes"}]')
    (tmp_path / "a.json").write_text('{"annotations": [{"question_id": 1, "answers": []}]}')
    (tmp_path / "q.json").write_text('{"questions": [{"question_id": 1}]}')
    assert main(["score", "--task", "vqa", "--predictions", str(tmp_path / "p.json"), "--annotations",
                 str(tmp_path / "a.json"), "--questions", str(tmp_path / "q.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a.json" in err[0] and "answers must be a non-empty list" in err[0]  # one line, no traceback


COMMON_12IN1 = ["model.preset=tiny", "train.global_batch_size=4", "train.max_steps=2", "train.num_workers=0",
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
    assert main(["finetune", "--task", task, *COMMON_12IN1, *data, f"train.output_dir={run_dir}"]) == 0
    checkpoint = sorted((run_dir / "checkpoints").iterdir())[-1]
    out = tmp_path / "eval"
    assert main(["evaluate", "--task", task, "--checkpoint", str(checkpoint), "--split", split, "--out", str(out),
                 *COMMON_12IN1, *data]) == 0
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
    assert main(["finetune", "--task", "vcr-qa", *COMMON_12IN1, *data, f"train.output_dir={run_dir}"]) == 0
    checkpoint = str(sorted((run_dir / "checkpoints").iterdir())[-1])
    out = tmp_path / "vcr_test.csv"
    assert main(["vcr-submission", "--checkpoint", checkpoint, "--out", str(out), *COMMON_12IN1, *data]) == 0
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
