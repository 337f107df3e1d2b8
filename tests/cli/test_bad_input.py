"""Bad input and faults on the command line: exit 2, one line naming the file, nothing lost or half-written.

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
from PIL import Image

import tasks.engine.checkpoints as checkpoints_module
from features import store as store_module
from features.detectors import DETECTORS
from features.errors import DiskFullError
from features.extract import extract
from features.locks import OutputLock
from features.store import FeatureStore
from tasks.engine.checkpoints import list_checkpoints
from tests.fixtures.cli_check import assert_refused, run_cli
from tests.fixtures.tiny_task_data import write_store, write_vocab, write_vqa

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
    monkeypatch.setitem(DETECTORS, "tiny-test", "tests.fixtures.tiny_detector:build_tiny")
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


def test_a_real_second_process_on_a_locked_store_refuses_in_one_line(tmp_path):
    images, out = _images(tmp_path / "img", 1), tmp_path / "f.h5"
    (tmp_path / "boxes.json").write_text(json.dumps({"im0": [[0, 0, 10, 10]]}))
    with OutputLock(tmp_path / "f.h5.lock", "test holder"):  # held by this process; the CLI runs in another
        line = assert_refused(["extract", "--images", images, "--out", out, "--boxes", tmp_path / "boxes.json",
                               "--box-format", "xyxy", "--workers", "0", "--no-progress"],
                              names=[f"feature store {out}", f"pid {os.getpid()}"], watch=[tmp_path], subprocess=True)
        assert "in use by another process" in line


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
    from tests.fixtures.tiny_detector import TinyDetector

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
    from tasks.engine.config import load_config
    from tasks.registry import task_class
    from tests.fixtures.tiny_task_data import write_karpathy, write_refcoco

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


# ---------------------------------------------------------------- 7, 9, 10. one line for bad files, configs, checkpoints


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A VQA and a retrieval checkpoint of one step each, shared by the checkpoint cases (read-only)."""
    from tests.fixtures.tiny_task_data import write_karpathy

    root = tmp_path_factory.mktemp("trained")
    info = write_vqa(root / "vqa")
    write_store(root / "f.h5", [str(i) for i in info["image_ids"]])
    write_vocab(root / "tok")
    vqa_data = [f"data.root={root / 'vqa'}", f"data.features=[{root / 'f.h5'}]", f"data.tokenizer={root / 'tok'}"]
    assert run_cli(["finetune", "--task", "vqa", *COMMON, *vqa_data, f"train.output_dir={root / 'vqa-run'}",
                    "train.max_steps=1"])[0] == 0
    ids = write_karpathy(root / "flickr" / "dataset_flickr30k.json")
    write_store(root / "r.h5", ids)
    assert run_cli(["finetune", "--task", "retrieval", *COMMON[:6], f"data.root={root / 'flickr'}",
                    f"data.features=[{root / 'r.h5'}]", f"data.tokenizer={root / 'tok'}", "data.max_text_length=12",
                    "data.val_split=test", f"train.output_dir={root / 'retrieval-run'}", "train.max_steps=1"])[0] == 0
    return {"root": root, "vqa_data": vqa_data, "vqa": list_checkpoints(root / "vqa-run")[-1],
            "retrieval": list_checkpoints(root / "retrieval-run")[-1]}


def _finetune_vqa(trained, tmp_path, *extra, data=None):
    return ["finetune", "--task", "vqa", *COMMON, *(data or trained["vqa_data"]), "train.max_steps=1",
            f"train.output_dir={tmp_path / 'run'}", *extra]


def test_bad_configs_are_one_line_and_leave_nothing(trained, tmp_path):
    (tmp_path / "binary.yaml").write_bytes(bytes(range(256)))
    (tmp_path / "broken.yaml").write_text("train: [unclosed\n  - x: y\n")
    cases = [
        ((), ["--config", tmp_path / "binary.yaml"], [tmp_path / "binary.yaml", "not a YAML config"]),
        ((), ["--config", tmp_path / "broken.yaml"], [tmp_path / "broken.yaml", "not valid YAML", "line 2"]),
        (("model.overrides.hidden_size=abc",), [], ["model.overrides.hidden_size", "'abc'"]),
        (("model.overrides={hiden_size: 8}",), [], ["'hiden_size'", "did you mean 'hidden_size'"]),
        (("data.max_regions=0",), [], ["data.max_regions", "got 0"]),
        (("optim.lr=nan",), [], ["optim.lr", "nan"]),
        (("optim.lr=.inf",), [], ["optim.lr", "inf"]),
    ]
    for overrides, options, names in cases:
        line = assert_refused(_finetune_vqa(trained, tmp_path, *overrides, *options), names=names, watch=[tmp_path])
        assert "Traceback" not in line
    assert not (tmp_path / "run").exists()  # no config.yaml left by a refused run


def test_bad_checkpoints_for_init_and_resume_are_one_line(trained, tmp_path):
    import shutil

    root = trained["root"]
    (tmp_path / "config-only").mkdir()
    shutil.copy(trained["vqa"] / "config.json", tmp_path / "config-only")
    (tmp_path / "pickled").mkdir()
    shutil.copy(trained["vqa"] / "config.json", tmp_path / "pickled")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "pickled" / "pytorch_model.bin")
    (tmp_path / "big-tok").mkdir()
    (tmp_path / "big-tok" / "vocab.txt").write_text((root / "tok" / "vocab.txt").read_text()
                                                    + "".join(f"w{i}\n" for i in range(200)))
    big_vocab = [*trained["vqa_data"][:2], f"data.tokenizer={tmp_path / 'big-tok'}"]
    truncated = tmp_path / "truncated-run" / "checkpoints" / trained["vqa"].name
    shutil.copytree(trained["vqa"], truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    cases = [
        (["--init", tmp_path / "config-only"], None, [tmp_path / "config-only", "no model.safetensors"]),
        (["--init", tmp_path / "pickled"], None, [tmp_path / "pickled", "pickle, which is never loaded"]),
        (["--init", trained["vqa"]], big_vocab, [trained["vqa"], "another vocabulary"]),
        (["--resume", tmp_path / "truncated-run"], None, [weights, "cannot read the weights"]),
        (["--resume", trained["retrieval"]], None, [trained["retrieval"], "another task"]),
        (["--init", trained["vqa"]], [*trained["vqa_data"], "model.overrides.v_feature_size=13"],  # another width
         [root / "f.h5", "region features but the model", "takes 13-d (v_feature_size)"]),
    ]
    for options, data, names in cases:
        assert_refused(_finetune_vqa(trained, tmp_path, *options, data=data), names=names,
                       watch=[tmp_path, trained["vqa"], trained["retrieval"]])
    assert not (tmp_path / "run").exists()


def test_convert_of_files_that_are_not_vilbert_checkpoints_is_one_line(tmp_path):
    (tmp_path / "empty.bin").write_bytes(b"")
    torch.save({}, tmp_path / "empty-dict.bin")
    torch.save({"encoder.layer.weight": torch.zeros(3)}, tmp_path / "unrelated.bin")
    (tmp_path / "binary.json").write_bytes(bytes(range(256)))
    small = {"vocab_size": 40, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 1,
             "intermediate_size": 16, "v_hidden_size": 16, "v_num_hidden_layers": 1, "v_num_attention_heads": 1,
             "v_intermediate_size": 16, "bi_hidden_size": 16, "bi_num_attention_heads": 1, "bi_intermediate_size": 16,
             "v_biattention_id": [0], "t_biattention_id": [0], "v_feature_size": 16, "fixed_t_layer": 0,
             "fixed_v_layer": 0}
    (tmp_path / "small.json").write_text(json.dumps(small))
    cases = [
        (["--input", tmp_path / "empty.bin"], [tmp_path / "empty.bin", "not a readable weights-only state dict"]),
        (["--input", tmp_path / "empty-dict.bin"], [tmp_path / "empty-dict.bin", "holds no tensors"]),
        (["--input", tmp_path / "unrelated.bin", "--config", tmp_path / "small.json"],
         [tmp_path / "unrelated.bin", "not a vilbert-multi-task ViLBERT"]),
        (["--input", tmp_path / "unrelated.bin", "--config", tmp_path / "binary.json"],
         [tmp_path / "binary.json", "binary data"]),
    ]
    for options, names in cases:
        assert_refused(["convert", "--from", "vilbert-multi-task", "--out", tmp_path / "out", *options], names=names,
                       watch=[tmp_path])


def test_feature_store_paths_that_are_not_stores_and_outputs_that_are_directories(trained, tmp_path):
    (tmp_path / "a-dir").mkdir()
    (tmp_path / "junk.h5").write_bytes(b"junk" * 100)
    for store, problem in ((tmp_path / "a-dir", "is a directory"), (tmp_path / "junk.h5", "not a readable HDF5")):
        data = [trained["vqa_data"][0], f"data.features=[{store}]", trained["vqa_data"][2]]
        line = assert_refused(_finetune_vqa(trained, tmp_path, data=data), names=[store, problem], watch=[tmp_path])
        assert "more with --verbose" not in line  # h5py's multi-line text is not quoted
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "im.png")
    assert_refused(["predict", "--checkpoint", trained["vqa"], "--image", tmp_path / "im.png", "--question", "what",
                    "--random-detector", "--out", tmp_path / "a-dir"], names=["--out", tmp_path / "a-dir"],
                   watch=[tmp_path])


def test_multi_line_messages_print_one_line_and_the_rest_with_verbose(capsys):
    from tasks.cli import one_line

    error = RuntimeError("Weights only load failed.\nIn PyTorch 2.6 the default ...\n\nCheck the docs.")
    assert one_line(error) == "Weights only load failed. (more with --verbose)"
    assert one_line(error, verbose=True) == "Weights only load failed. In PyTorch 2.6 the default ... Check the docs."


def test_named_image_ids_do_not_match_another_image_by_their_number():
    from tasks.data.annotations import image_key_resolver

    resolve = image_key_resolver(["7", "COCO_val2014_000000000009", "other_dataset_7"])
    assert resolve("other_dataset_7") == "other_dataset_7"
    assert resolve("another_set_7") is None  # was "7"
    assert resolve(9) == resolve("9") == "COCO_val2014_000000000009"


def _rewrite_json(path, mutate):
    data = json.loads(path.read_text())
    mutate(data)
    path.write_text(json.dumps(data))


def _rewrite_refs(path, mutate):
    import pickle

    with open(path, "rb") as handle:
        refs = pickle.load(handle)
    mutate(refs)
    with open(path, "wb") as handle:
        pickle.dump(refs, handle, protocol=2)


VQA_TRAIN_Q = "v2_OpenEnded_mscoco_train2014_questions.json"
VQA_TRAIN_A = "v2_mscoco_train2014_annotations.json"
ANNOTATION_CASES = {  # name: (task, file, how to break it, what the line says)
    "vqa-question-id-abc": ("vqa", VQA_TRAIN_Q, lambda d: d["questions"][0].update(question_id="abc"),
                            "questions[0]: question_id must be an integer, got 'abc'"),
    "vqa-question-id-null": ("vqa", VQA_TRAIN_Q, lambda d: d["questions"][0].update(question_id=None),
                             "question_id must be an integer, got None"),
    "vqa-question-null": ("vqa", VQA_TRAIN_Q, lambda d: d["questions"][0].update(question=None),
                          "question must be a non-empty string, got None"),  # never the text "None"
    "vqa-empty-train": ("vqa", VQA_TRAIN_A, lambda d: d.update(annotations=[]),
                        "the train split has no annotated questions"),
    "retrieval-sentences-null": ("retrieval", "dataset_flickr30k.json",
                                 lambda d: d["images"][0].update(sentences=None), "sentences must be a list, got None"),
    "retrieval-no-captions": ("retrieval", "dataset_flickr30k.json", lambda d: d["images"][0].update(sentences=[]),
                              "images[0] has no captions"),
    "refs-ann-id-null": ("refcoco", "refs(unc).p", lambda refs: refs[0].update(ann_id=None),
                         "refs[0]: ann_id must be an integer, got None"),
    "refs-bbox-string": ("refcoco", "instances.json", lambda d: d["annotations"][0].update(bbox="1,2,3,4"),
                         "bbox must be a list of 4 numbers, got '1,2,3,4'"),
    "refs-bbox-3-numbers": ("refcoco", "instances.json", lambda d: d["annotations"][0].update(bbox=[1, 2, 3]),
                            "bbox must be a list of 4 numbers, got [1, 2, 3]"),  # was broadcast into 4
    "refs-bbox-400-digits": ("refcoco", "instances.json",
                             lambda d: d["annotations"][0].update(bbox=[int("9" * 400), 2, 3, 4]),
                             "bbox must be 4 finite numbers"),
}


@pytest.fixture(scope="module")
def task_data(tmp_path_factory):
    """Valid tiny data of each fine-tuning task (copied before a test breaks it) and its finetune arguments."""
    from tests.fixtures.tiny_task_data import write_three_tasks

    root = write_three_tasks(tmp_path_factory.mktemp("task-data"))
    extra = {"vqa": ["data.min_answer_count=1", "data.minval_size=4"],
             "retrieval": ["data.max_text_length=12", "data.val_split=test"], "refcoco": ["data.gt_features=[]"]}

    def argv(task, data_root, run_dir):
        return ["finetune", "--task", task, *COMMON[:6], "data.eval_batch_size=4", "train.max_steps=1",
                f"data.root={data_root}", f"data.features=[{root / (task + '.h5')}]", f"data.tokenizer={root / 'tok'}",
                *extra[task], f"train.output_dir={run_dir}"]

    return {"root": root, "argv": argv}


@pytest.mark.parametrize("name", list(ANNOTATION_CASES))
def test_bad_annotations_are_one_line_naming_the_file(task_data, tmp_path, name):
    import shutil

    task, file, mutate, problem = ANNOTATION_CASES[name]
    data_root = tmp_path / task
    shutil.copytree(task_data["root"] / task, data_root)
    (_rewrite_refs if file.endswith(".p") else _rewrite_json)(data_root / file, mutate)
    line = assert_refused(task_data["argv"](task, data_root, tmp_path / "run"), names=[data_root / file, problem],
                          watch=[tmp_path])
    assert len(line) < 400


def test_given_box_with_a_400_digit_coordinate_is_one_line(tmp_path, tiny_detector):
    images = _images(tmp_path / "img", 1)
    (tmp_path / "boxes.json").write_text('{"im0": [[0, 0, %s, 5]]}' % ("9" * 400))
    assert_refused(["extract", "--images", images, "--out", tmp_path / "f.h5", "--boxes", tmp_path / "boxes.json",
                    "--box-format", "xyxy", *tiny_detector], names=[tmp_path / "boxes.json", "4 finite numbers"],
                   watch=[tmp_path])


# ------------------------------------------------------------------------------------------- 4. memory, huge images


def test_a_huge_jpeg_is_decoded_at_the_size_the_detector_needs(tmp_path, monkeypatch):
    from PIL import ImageFile

    from features.images import read_image

    path = tmp_path / "huge.jpg"
    Image.new("RGB", (3000, 2000), (200, 40, 40)).save(path, quality=70)
    decoded = []
    real_load = ImageFile.ImageFile.load

    def load(self):
        decoded.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    loaded = read_image(path, input_scale=lambda h, w: min(150 / min(h, w), 250 / max(h, w)))  # input 225 x 150
    assert set(decoded) == {(750, 500)}  # Pillow's draft decoded 1/4 of each side, never the 6-megapixel image
    assert loaded.pixels.shape == (300, 450, 3)  # twice the detector's input; its own resize does the rest
    assert loaded.original_hw == (2000, 3000)  # boxes stay in original pixels
    decoded.clear()
    assert read_image(path).pixels.shape == (2000, 3000, 3) and set(decoded) == {(3000, 2000)}  # no detector


def test_a_batch_never_holds_more_than_the_pixel_budget(tmp_path):
    from features.inputs import list_images
    from tests.fixtures.tiny_detector import TinyDetector

    images = _images(tmp_path / "img", 5)  # 12 x 20 each
    detector, sizes = TinyDetector(), []
    real_forward = detector.forward

    def forward(pixels, prepared, boxes=None):
        sizes.append(pixels.shape[0] * pixels.shape[2] * pixels.shape[3])
        return real_forward(pixels, prepared, boxes)

    detector.forward = forward
    summary = extract(list_images(images), tmp_path / "f.h5", detector, batch_size=8, workers=0,
                      batch_pixels=2 * 12 * 20, progress=False)
    assert summary.images_written == 5 and max(sizes) <= 2 * 12 * 20 and len(sizes) == 3
