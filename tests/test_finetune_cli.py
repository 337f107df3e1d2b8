"""End to end through the CLI on tiny data: finetune a few steps, evaluate, score, per task."""

import json

import pytest
from tiny_task_data import write_karpathy, write_refcoco, write_store, write_vocab, write_vqa

from tasks.cli import main

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
                 "--out", str(out), f"data.tokenizer={tmp_path / 'tok'}", "data.max_regions=5", *data,
                 "data.val_split=val"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_questions"] == 12
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

