"""Bad input and faults on the command line (issue 11): exit 2, one line naming the file, nothing lost or half-written.

Every case goes through `cli_check.assert_refused`; the run-directory and store cases also check what a second
attempt does (resume, overwrite, rerun after the fault).
"""

from __future__ import annotations

import errno
import json
import os

import numpy as np
import pytest
import torch
from cli_check import assert_refused, run_cli
from PIL import Image
from tiny_task_data import write_store, write_vocab, write_vqa

import tasks.engine.checkpoints as checkpoints_module
from features import store as store_module
from features.detectors import DETECTORS
from features.errors import DiskFullError
from features.extract import extract
from features.locks import OutputLock
from features.store import FeatureStore
from tasks.engine.checkpoints import list_checkpoints

COMMON = ["model.preset=tiny", "train.global_batch_size=4", "train.num_workers=0", "train.device=cpu",
          "train.log_every=1", "data.max_regions=5", "data.eval_batch_size=4", "data.min_answer_count=1",
          "data.minval_size=4"]


@pytest.fixture
def vqa(tmp_path):
    """Tiny VQA data and the `vilbert finetune --task vqa` arguments for it (run directory tmp_path/run)."""
    info = write_vqa(tmp_path / "vqa")
    write_store(tmp_path / "f.h5", [str(i) for i in info["image_ids"]])
    write_vocab(tmp_path / "tok")
    data = [f"data.root={tmp_path / 'vqa'}", f"data.features=[{tmp_path / 'f.h5'}]", f"data.tokenizer={tmp_path / 'tok'}"]
    return {"root": tmp_path, "run": tmp_path / "run", "data": data,
            "argv": ["finetune", "--task", "vqa", *COMMON, *data, f"train.output_dir={tmp_path / 'run'}"]}


def _metrics_steps(run_dir):
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] == "train"]


# --------------------------------------------------------------------------------------- 1. lost data: run directory


def test_new_run_into_a_directory_holding_a_run_refuses_and_overwrite_replaces_it(vqa):
    run_dir = vqa["run"]
    assert run_cli([*vqa["argv"], "train.max_steps=3"])[0] == 0
    old = [p.name for p in list_checkpoints(run_dir)]
    line = assert_refused([*vqa["argv"], "train.max_steps=2"], names=[run_dir, "--resume", "--overwrite"],
                          watch=[run_dir])
    assert "already holds a run" in line
    assert [p.name for p in list_checkpoints(run_dir)] == old  # the old run is untouched
    code, out, _ = run_cli([*vqa["argv"], "train.max_steps=2", "--overwrite"])
    assert code == 0
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-00000002"]  # no old step-3 outranks the new run
    assert _metrics_steps(run_dir) == [1, 2]  # one run's log, not two mixed
    assert "step-00000002" in out


def test_second_process_on_a_run_directory_refuses_and_a_stale_lock_is_taken_over(vqa):
    run_dir = vqa["run"]
    with OutputLock(run_dir / "run.lock", "test holder"):
        line = assert_refused([*vqa["argv"], "train.max_steps=1"], names=[f"run directory {run_dir}", str(os.getpid())])
        assert "in use by another process" in line
        assert sorted(p.name for p in run_dir.iterdir()) == ["run.lock"]  # nothing written beside the holder's lock
    (run_dir / "run.lock").write_text("999999999 elsewhere\n")  # left by a killed process: no flock held
    assert run_cli([*vqa["argv"], "train.max_steps=1"])[0] == 0
    assert not (run_dir / "run.lock").exists() and list_checkpoints(run_dir)


def test_failed_fine_tune_leaves_no_run_directory_behind(vqa, monkeypatch):
    from tasks.errors import DataError
    from tasks.vqa import VQATask

    def failing_evaluate(self, model, split):
        raise DataError(f"{vqa['root'] / 'vqa'}: evaluation failed")

    monkeypatch.setattr(VQATask, "evaluate", failing_evaluate)
    assert_refused([*vqa["argv"], "train.max_steps=1"], names=vqa["root"] / "vqa", watch=[vqa["root"]])
    assert not vqa["run"].exists()  # no config.yaml to block the corrected rerun


def test_disk_full_while_saving_a_checkpoint_is_one_line_and_the_last_checkpoint_resumes(vqa, monkeypatch):
    real_save, calls = torch.save, []

    def save(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoints_module.torch, "save", save)
    argv = [*vqa["argv"], "train.max_steps=3", "train.save_every=1", "train.keep_last=5"]
    line = assert_refused(argv, names=["no space left on device while writing", vqa["run"] / "checkpoints"])
    assert "step-00000002" in line
    assert [p.name for p in list_checkpoints(vqa["run"])] == ["step-00000001"]
    assert [p.name for p in (vqa["run"] / "checkpoints").iterdir()] == ["step-00000001"]  # no temporary left
    monkeypatch.setattr(checkpoints_module.torch, "save", real_save)  # space freed
    assert run_cli([*argv, "--resume", str(vqa["run"])])[0] == 0
    assert [p.name for p in list_checkpoints(vqa["run"])][-1] == "step-00000003"
    assert _metrics_steps(vqa["run"]) == [1, 2, 3]


# ---------------------------------------------------------------------------------- 2, 3, 8, 10. feature extraction


@pytest.fixture
def tiny_detector(monkeypatch):
    monkeypatch.setitem(DETECTORS, "tiny-test", "tiny_detector:build_tiny")
    return ["--detector", "tiny-test", "--workers", "0", "--no-progress"]


def _images(folder, count):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(np.full((12, 20, 3), 40 * i, np.uint8)).save(folder / f"im{i}.png")
    return folder


def test_second_extraction_on_the_same_output_refuses_in_one_line(tmp_path, tiny_detector):
    images, out = _images(tmp_path / "img", 2), tmp_path / "f.h5"
    with OutputLock(tmp_path / "f.h5.lock", "test holder"):
        line = assert_refused(["extract", "--images", images, "--out", out, *tiny_detector],
                              names=[f"feature store {out}", str(os.getpid())], watch=[tmp_path])
        assert "in use by another process" in line
    (tmp_path / "f.h5.lock").write_text("999999999 elsewhere\n")  # stale: its holder is gone
    assert run_cli(["extract", "--images", images, "--out", out, *tiny_detector])[0] == 0
    assert sorted(FeatureStore(out).ids) == ["im0", "im1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.h5", "img"]  # no lock, no .partial left


def test_extraction_where_every_image_fails_exits_2_and_keeps_the_errors_file(tmp_path, tiny_detector):
    (tmp_path / "img").mkdir()
    for name in ("a.jpg", "b.png"):
        (tmp_path / "img" / name).write_bytes(b"not an image at all")
    out = tmp_path / "f.h5"
    line = assert_refused(["extract", "--images", tmp_path / "img", "--out", out, *tiny_detector],
                          names=[out, "none of the 2 images"], watch=[tmp_path],
                          allowed_new=[tmp_path / "f.h5.errors.jsonl"])
    assert "f.h5.errors.jsonl" in line
    assert len((tmp_path / "f.h5.errors.jsonl").read_text().splitlines()) == 2


def test_disk_full_during_extraction_is_one_line_and_sealed_parts_resume(tmp_path, tiny_detector, monkeypatch):
    from tiny_detector import TinyDetector

    images, out = _images(tmp_path / "img", 6), tmp_path / "f.h5"
    real_append, calls, budget = store_module._append, [], [10 * 2]  # appends until the disk is full

    def append(dataset, start, stop, values):
        calls.append(dataset.name)
        if len(calls) > budget[0]:  # two parts of 2 images are sealed (10 datasets each), the third fails
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_append(dataset, start, stop, values)

    monkeypatch.setattr(store_module, "_append", append)
    from features.inputs import list_images

    with pytest.raises(DiskFullError, match="no space left on device while writing .*part-00002.h5"):
        extract(list_images(images), out, TinyDetector(), batch_size=2, workers=0, part_images=2, progress=False)
    parts = sorted(p.name for p in (tmp_path / "f.h5.partial").iterdir())
    assert parts == ["part-00000.h5", "part-00001.h5"]  # sealed parts intact, the failed one removed
    calls.clear()
    budget[0] = 0
    line = assert_refused(["extract", "--images", images, "--out", out, *tiny_detector],
                          names=["no space left on device while writing", tmp_path / "f.h5.partial"])
    assert line.endswith("part-00002.h5")
    monkeypatch.setattr(store_module, "_append", real_append)  # space freed: the rerun finishes the store
    summary = extract(list_images(images), out, TinyDetector(), batch_size=2, workers=0, progress=False)
    assert summary.images_skipped == 4 and summary.images_written == 2
    assert sorted(FeatureStore(out).ids) == [f"im{i}" for i in range(6)]



# ------------------------------------------------------------------------------------ 5, 9. vilbert score


@pytest.fixture
def score_files(tmp_path):
    """Annotations and questions of 3 questions, and a helper writing predictions / replacing a file's content."""
    annotations = {"annotations": [{"question_id": q, "answers": [{"answer": "yes"}] * 10, "answer_type": "yes/no"}
                                   for q in (1, 2, 3)]}
    questions = {"questions": [{"question_id": q, "image_id": 9, "question": "is it"} for q in (1, 2, 3)]}
    paths = {"predictions": tmp_path / "p.json", "annotations": tmp_path / "a.json", "questions": tmp_path / "q.json"}
    paths["annotations"].write_text(json.dumps(annotations))
    paths["questions"].write_text(json.dumps(questions))

    def argv(predictions=None, **replace):
        if predictions is not None:
            paths["predictions"].write_text(json.dumps(predictions))
        for name, content in replace.items():
            paths[name].write_text(content if isinstance(content, str) else json.dumps(content))
        return ["score", "--task", "vqa", *(x for name, path in paths.items() for x in (f"--{name}", path))]

    return paths, argv


def test_score_requires_exactly_the_annotated_questions(score_files):
    paths, argv = score_files
    line = assert_refused(argv([{"question_id": 1, "answer": "yes"}]), names=[paths["predictions"], paths["annotations"]])
    assert "2 of its questions missing (first: 2, 3)" in line  # not "100.00 over 1"
    line = assert_refused(argv([{"question_id": q, "answer": "yes"} for q in (1, 2, 3, 77)]), names=paths["predictions"])
    assert "1 not in it (first: 77)" in line
    line = assert_refused(argv([{"question_id": q, "answer": "yes"} for q in (1, 2, 3, 3)]), names=paths["predictions"])
    assert "appear more than once" in line
    code, out, _ = run_cli(argv([{"question_id": q, "answer": "yes"} for q in (1, 2, 3)]))
    assert code == 0 and "overall 100.00 over 3 questions" in out


@pytest.mark.parametrize("case", [
    ("predictions", [{"question_id": q, "answer": 1} for q in (1, 2, 3)], "answer must be a string"),
    ("predictions", [{"question_id": "abc", "answer": "yes"}], "question_id must be an integer, got 'abc'"),
    ("predictions", [{"question_id": None, "answer": "yes"}], "question_id must be an integer, got None"),
    ("predictions", [{"question_id": 1.5, "answer": "yes"}], "question_id must be an integer"),
    ("predictions", [{"question_id": int("9" * 400), "answer": "yes"}], "1 not in it (first: 999"),
    ("questions", {"questions": [{"image_id": 9}]}, "entry 0 has no 'question_id'"),
    ("questions", {"questions": [{"question_id": None}]}, "question_id must be an integer, got None"),
    ("annotations", {"annotations": {"1": {"question_id": 1}}}, '"annotations" is a dict, expected a list'),
    ("annotations", {"annotations": [{"question_id": 1, "answers": "yes"}]}, "answers must be a non-empty list"),
], ids=["answer-int", "qid-abc", "qid-null", "qid-float", "qid-400-digits", "question-no-id", "question-null-id",
        "annotations-object", "answers-string"])
def test_score_bad_files_are_one_line(score_files, case):
    paths, argv = score_files
    name, content, problem = case
    good = [{"question_id": q, "answer": "yes"} for q in (1, 2, 3)]
    args = argv(content) if name == "predictions" else argv(good, **{name: content})
    line = assert_refused(args, names=paths[name])
    assert problem in line
    assert len(line) < 400  # a 400-digit id is shortened, not echoed


# ------------------------------------------------------------------------ 6. items without features count as wrong


def test_vqa_evaluate_counts_questions_without_features_as_wrong_and_strict_refuses(vqa):
    root = vqa["root"]
    assert run_cli([*vqa["argv"], "train.max_steps=1"])[0] == 0
    checkpoint = list_checkpoints(vqa["run"])[-1]
    write_store(root / "some.h5", ["101", "102"])  # image 103 of val has no features: its 4 questions
    data = [f"data.root={root / 'vqa'}", f"data.tokenizer={root / 'tok'}", f"data.features=[{root / 'some.h5'}]",
            "data.max_regions=5", "data.val_split=val"]
    out = root / "eval"
    code, printed, _ = run_cli(["evaluate", "--task", "vqa", "--checkpoint", checkpoint, "--split", "val",
                                "--out", out, *data])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_questions"] == 12 and metrics["num_without_features"] == 4  # not "over 8"
    assert "num_without_features 4.00" in " ".join(printed.split())
    predictions = {p["question_id"]: p["answer"] for p in json.loads((out / "predictions.json").read_text())}
    from tasks.vqa import read_split

    answered = [q for q in read_split(root / "vqa", "val") if q.question_id in predictions]
    from tasks.metrics import vqa_accuracy

    correct = sum(vqa_accuracy(predictions[q.question_id], q.answers) for q in answered)
    assert metrics["accuracy"] == pytest.approx(100 * correct / 12)
    line = assert_refused(["evaluate", "--task", "vqa", "--checkpoint", checkpoint, "--split", "val", "--out",
                           root / "strict", "--strict", *data], names=root / "vqa", watch=[root])
    assert "4 questions have no features" in line


def test_refexp_and_retrieval_scores_count_items_without_features_as_wrong(tmp_path):
    from tiny_task_data import write_karpathy, write_refcoco

    from tasks.engine.config import load_config
    from tasks.registry import task_class

    info = write_refcoco(tmp_path / "refcoco")
    write_vocab(tmp_path / "tok")
    refexp = task_class("refcoco")(load_config(None, task_class("refcoco").config_class, [
        f"data.root={tmp_path / 'refcoco'}", f"data.tokenizer={tmp_path / 'tok'}", "model.preset=tiny"]))
    expressions = refexp.expressions("testA")
    perfect = [{"ref_id": e.ref_id, "sent_id": e.sent_id, "box": list(e.box)} for e in expressions]
    assert refexp.score(perfect, "testA")["accuracy"] == 100.0
    metrics = refexp.score(perfect[1:], "testA")  # the first has no features: no prediction
    assert metrics["accuracy"] == pytest.approx(100 * (len(perfect) - 1) / len(perfect))
    assert metrics["num_expressions"] == len(perfect) and metrics["num_without_features"] == 1
    assert info["image_ids"]

    ids = write_karpathy(tmp_path / "flickr" / "dataset_flickr30k.json", num_images=4, test_images=4)
    retrieval = task_class("retrieval")(load_config(None, task_class("retrieval").config_class, [
        f"data.root={tmp_path / 'flickr'}", f"data.tokenizer={tmp_path / 'tok'}", "model.preset=tiny"]))
    ranked = ids[:3]  # the 4th image has no features
    captions = [f"{i}-{j}" for i in range(3) for j in range(2)]
    scores = [[1.0 if i == c // 2 else 0.0 for i in range(3)] for c in range(6)]  # every ranked pair is first
    metrics = retrieval.score({"image_ids": ranked, "captions": captions, "caption_image": [c // 2 for c in range(6)],
                               "scores": scores}, "test")
    assert metrics["r1"] == pytest.approx(75.0) and metrics["i2t_r1"] == pytest.approx(75.0)
    assert metrics["num_images"] == 4 and metrics["num_captions"] == 8 and metrics["num_without_features"] == 1
