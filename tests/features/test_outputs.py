"""Outputs never delete what the command did not write (issue 24, data loss): the one output helper
(`features.atomic`), exports, file outputs given a folder, stale temporaries, run directories and `--resume`,
and the store lock taken before anything of a second writer runs.
"""

from __future__ import annotations

import multiprocessing
import os
import signal

import numpy as np
import pytest

from features.atomic import OWNED_MARKER, atomic_path, check_output, temporary_path, write_json_atomic
from features.errors import OutputError, OutputLockedError
from features.importing import import_features
from features.store import FeatureStore, store_lock
from tests.fixtures.cli_check import assert_refused, run_cli, snapshot
from tests.fixtures.tiny_task_data import write_store


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
    assert_refused(["vcr-submission", "--checkpoint", str(tmp_path / "absent"), "--out", str(folder)],
                   names=[str(folder), "is a folder"], watch=[tmp_path])  # before reading the checkpoint
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
    stale = temporary_path(target).with_name(temporary_path(target).name.replace(str(os.getpid()), str(child.pid)))
    assert stale.exists() and not target.exists()
    live = target.with_name(f".other.tmp-{os.getppid()}")  # a live process's temporary is left alone
    live.write_text("in progress")
    elsewhere = target.with_name(".remote.tmp-999999999@another-host")  # another machine's, on a shared folder
    elsewhere.write_text("in progress")
    write_json_atomic(target.with_name("next.json"), [1])
    assert not stale.exists() and live.exists() and elsewhere.exists()


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


def _holder_with_a_worker(lock_file, worker_pid_file):
    """A run that takes the lock, forks a long-lived worker (as a DataLoader does), then is SIGKILLed."""
    from features.locks import OutputLock

    OutputLock(lock_file, "test output").acquire()
    worker = os.fork()
    if worker == 0:
        signal.pause()  # the orphaned worker lives on
        os._exit(0)
    worker_pid_file.write_text(str(worker))
    os.kill(os.getpid(), signal.SIGKILL)


def test_an_orphaned_worker_does_not_keep_a_killed_runs_lock(tmp_path):
    from features.locks import OutputLock

    lock_file, pid_file = tmp_path / "out.h5.lock", tmp_path / "worker.pid"
    holder = multiprocessing.get_context("fork").Process(target=_holder_with_a_worker, args=(lock_file, pid_file))
    holder.start()
    holder.join(timeout=60)
    worker = int(pid_file.read_text())
    try:
        assert holder.exitcode == -signal.SIGKILL
        os.kill(worker, 0)  # the worker is alive...
        with OutputLock(lock_file, "rerun"):  # ...and the rerun takes the lock at once
            pass
    finally:
        os.kill(worker, signal.SIGKILL)
