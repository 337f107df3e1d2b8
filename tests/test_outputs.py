"""Outputs never delete what the command did not write (issue 24, data loss): the one output helper
(`features.atomic`), exports, file outputs given a folder, stale temporaries, run directories and `--resume`,
and the store lock taken before anything of a second writer runs.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal

import numpy as np
import pytest
from cli_check import assert_refused, run_cli, snapshot
from test_trainer import RegressionTask, train_config
from tiny_task_data import write_store

from features.atomic import OWNED_MARKER, atomic_path, check_output, write_json_atomic
from features.errors import OutputError, OutputLockedError
from features.importing import import_features
from features.store import FeatureStore, store_lock
from tasks.engine.checkpoints import list_checkpoints
from tasks.engine.config import OptimConfig, TrainConfig
from tasks.engine.trainer import Trainer
from tasks.errors import ConfigError, ResumeError


@pytest.fixture
def store(tmp_path):
    return write_store(tmp_path / "feats.h5", ["1", "2", "3"])


def _photos(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "holiday.jpg").write_bytes(b"\xff\xd8 a photo")
    (folder / "notes.txt").write_text("my notes\n")
    return folder


# ------------------------------------------------------------------------------------------------ the output helper


@pytest.mark.parametrize("to", ["vilbert-lmdb", "butd-tsv"])
def test_export_into_an_existing_folder_of_the_users_refuses_and_keeps_it(tmp_path, store, to):
    folder = _photos(tmp_path / "mine")
    line = assert_refused(["features", "export", "--to", to, str(store), "--out", str(folder)],
                          names=[str(folder)], watch=[tmp_path])
    assert "did not write" in line or "is a folder" in line


def test_export_onto_its_own_input_store_refuses(tmp_path, store):
    for to in ("vilbert-lmdb", "butd-tsv"):
        line = assert_refused(["features", "export", "--to", to, str(store), "--out", str(store)],
                              names=[str(store)], watch=[tmp_path])
        assert "input" in line
    assert len(FeatureStore(store)) == 3


def test_export_replaces_a_folder_it_wrote_itself(tmp_path, store):
    out = tmp_path / "export.lmdb"
    for _ in range(2):
        code, _, err = run_cli(["features", "export", "--to", "vilbert-lmdb", str(store), "--out", str(out)])
        assert code == 0, err
    assert (out / OWNED_MARKER).is_file() and (out / "data.mdb").is_file()
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_file_outputs_given_a_folder_refuse_in_one_line(tmp_path):
    folder = _photos(tmp_path / "mine")
    coco = tmp_path / "instances.json"
    coco.write_text('{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": []}')
    assert_refused(["boxes", "--coco", str(coco), "--out", str(folder)], names=[str(folder), "folder"],
                   watch=[tmp_path])
    assert_refused(["boxes", "--coco", str(coco), "--out", str(coco)], names=[str(coco), "input"], watch=[tmp_path])
    with pytest.raises(OutputError, match="is a folder"):
        write_json_atomic(folder, {"a": 1})
    assert snapshot([folder]) == snapshot([folder])


def test_convert_into_a_users_folder_refuses_before_reading_the_checkpoint(tmp_path):
    folder = _photos(tmp_path / "mine")
    line = assert_refused(["convert", "--from", "vilbert-multi-task", "--input", str(tmp_path / "absent.bin"),
                           "--out", str(folder)], names=[str(folder)], watch=[tmp_path])
    assert "did not write" in line


def test_an_output_under_a_file_refuses_instead_of_a_traceback(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        check_output(blocker / "out.json")


def _die_while_writing(target, folder):
    with atomic_path(target, folder=folder) as tmp:
        if folder:
            tmp.mkdir()
            (tmp / "weights").write_bytes(b"0" * 1000)
        else:
            tmp.write_bytes(b"0" * 1000)
        os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.parametrize("folder", [False, True])
def test_temporaries_of_a_killed_writer_are_removed_by_the_next_write(tmp_path, folder):
    target = tmp_path / "out" / ("model" if folder else "export.tsv")
    child = multiprocessing.get_context("fork").Process(target=_die_while_writing, args=(target, folder))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == -signal.SIGKILL
    stale = target.with_name(f".{target.name}.tmp-{child.pid}")
    assert stale.exists() and not target.exists()
    live = target.with_name(f".other.tmp-{os.getppid()}")  # a live process's temporary is left alone
    live.write_text("in progress")
    write_json_atomic(target.with_name("next.json"), [1])
    assert not stale.exists() and live.exists()


# ------------------------------------------------------------------------------------------------ run directories


def test_overwrite_refuses_a_folder_that_holds_no_run_and_deletes_nothing(tmp_path):
    folder = _photos(tmp_path / "dataset")
    before = snapshot([folder])
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match="holds no run") as error:
            Trainer(RegressionTask(), train_config(tmp_path, "dataset"), OptimConfig()).fit(overwrite=overwrite)
        assert "nothing there is removed" in str(error.value)
        assert snapshot([folder]) == before


def test_overwrite_removes_only_the_runs_own_files(tmp_path):
    config = train_config(tmp_path, "run", epochs=1)
    Trainer(RegressionTask(), config, OptimConfig()).fit()
    run_dir = tmp_path / "run"
    (run_dir / "notes.txt").write_text("why I ran this\n")
    (run_dir / "plots").mkdir()
    Trainer(RegressionTask(), config, OptimConfig()).fit(overwrite=True)
    assert (run_dir / "notes.txt").read_text() == "why I ran this\n" and (run_dir / "plots").is_dir()
    assert list_checkpoints(run_dir)


@dataclasses.dataclass
class RunConfig:
    train: TrainConfig
    optim: OptimConfig


def _crashed_run(tmp_path):
    train = train_config(tmp_path, "run")
    with pytest.raises(KeyboardInterrupt):
        Trainer(RegressionTask(crash_after_calls=10), train, OptimConfig(), RunConfig(train, OptimConfig())).fit()
    run_dir = tmp_path / "run"
    assert list_checkpoints(run_dir)
    return train, run_dir


def test_resume_with_another_config_is_refused_naming_what_differs_and_writes_nothing(tmp_path):
    train, run_dir = _crashed_run(tmp_path)
    before = snapshot([run_dir])
    other = OptimConfig(lr=1e-3)
    with pytest.raises(ResumeError, match=r"optim\.lr 0\.0001 -> 0\.001"):
        Trainer(RegressionTask(), train, other, RunConfig(train, other)).fit(resume=run_dir)
    assert snapshot([run_dir]) == before
    longer = dataclasses.replace(train, epochs=3, num_workers=0)  # how long it runs may change
    result = Trainer(RegressionTask(), longer, OptimConfig(), RunConfig(longer, OptimConfig())).fit(resume=run_dir)
    assert result.state.step == 12


def test_a_refused_resume_of_a_truncated_checkpoint_leaves_config_and_run_record_as_they_were(tmp_path):
    train, run_dir = _crashed_run(tmp_path)
    state = list_checkpoints(run_dir)[-1] / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    before = snapshot([run_dir])
    with pytest.raises(ResumeError, match="cannot read trainer state"):
        Trainer(RegressionTask(), train, OptimConfig(), RunConfig(train, OptimConfig())).fit(resume=run_dir)
    assert snapshot([run_dir]) == before


# ------------------------------------------------------------------------------------------------ store locks


def test_a_second_import_refused_by_the_lock_keeps_the_first_ones_error_log(tmp_path):
    source = tmp_path / "feats.npy"
    (source).mkdir()
    np.save(source / "1.npy", np.zeros((2, 4), np.float32))
    out = tmp_path / "out.h5"
    errors = tmp_path / "out.h5.errors.jsonl"
    errors.write_text('{"problem": "the first import is writing this"}\n')
    with store_lock(out):  # the first import, still running
        with pytest.raises(OutputLockedError, match="in use by another process"):
            import_features(source, "mmf-npy", out, skip_bad=True, progress=False)
    assert errors.read_text() == '{"problem": "the first import is writing this"}\n'


def test_extract_merge_takes_the_store_lock(tmp_path):
    a = write_store(tmp_path / "a.h5", ["1"])
    b = write_store(tmp_path / "b.h5", ["2"])
    out = tmp_path / "merged.h5"
    with store_lock(out):
        assert_refused(["extract", "--merge", str(out), str(a), str(b)], names=[str(out), "in use"])
    assert not out.exists()
    assert run_cli(["extract", "--merge", str(out), str(a), str(b)])[0] == 0
    assert sorted(FeatureStore(out).ids) == ["1", "2"]
