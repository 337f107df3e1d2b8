"""Claiming a training run directory: one run per directory, one process per run, nothing left by a failed start.

`claim_run_directory` is the only way the trainer gets its `train.output_dir`:

- a new run (no `--resume`) refuses a directory that already holds a run (checkpoints, a metrics log, a config),
  naming it and the ways out (`--resume`, another `train.output_dir`, `--overwrite`), so an old run's checkpoints
  can never be pruned in favour of, mixed with, or resumed instead of the new one; `overwrite=True` removes the
  run's own files (`RUN_FILES`) and nothing else;
- a non-empty directory that holds no run (notes, photos, a dataset) is refused with or without `--overwrite`,
  in words that say it holds no run: nothing of the user's is ever deleted;
- the directory is locked for the run (`<dir>/run.lock`, holder pid, stale locks taken over; `features.locks`), so
  a second process refuses in one line;
- a run that fails before writing a checkpoint removes the files it added (and the directory, if it made it), so
  a bad config, bad data or a bad `--resume` leaves no `config.yaml` behind to block the corrected rerun.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch.distributed as dist

from features.locks import OutputLock
from tasks.engine.checkpoints import list_checkpoints
from tasks.errors import ConfigError

LOCK_FILE = "run.lock"
# everything a training run writes at the top of its directory; `--overwrite` removes these and nothing else
RUN_FILES = frozenset({"config.yaml", "run.json", "metrics.jsonl", "tensorboard", "checkpoints"})


def run_contents(run_dir: Path) -> list[str]:
    """What a run directory holds besides its lock file (sorted names)."""
    if not run_dir.is_dir():
        return []
    return sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_FILE)


def holds_run(run_dir: Path) -> bool:
    """Whether `run_dir` holds a training run's own files (a config, a run record, a log or checkpoints)."""
    return any(name in RUN_FILES for name in run_contents(run_dir))


@contextlib.contextmanager
def claim_run_directory(run_dir: str | os.PathLike, resume: bool, overwrite: bool = False,
                        writer: bool = True) -> Iterator[Path]:
    """Hold `run_dir` for one training run (see the module docstring); `writer` is False on ranks other than 0,
    which only check."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"train.output_dir {run_dir}: exists and is not a directory")
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: resume continues the run, overwrite "
                          "deletes it")
    problem = _refusal(run_dir, resume, overwrite)  # read by every rank before rank 0 writes anything
    _barrier()
    if problem:  # every rank refuses alike
        raise ConfigError(problem)
    if not writer:
        if not _rank0_claimed(True):
            raise ConfigError(f"train.output_dir {run_dir}: rank 0 could not claim it (its message says why)")
        yield run_dir
        return
    created = not run_dir.exists()
    lock = OutputLock(run_dir / LOCK_FILE, f"run directory {run_dir}")
    try:
        lock.acquire()
    except BaseException:
        _rank0_claimed(False)  # the other ranks stop too instead of waiting in the first collective
        raise
    _rank0_claimed(True)
    try:
        problem = _refusal(run_dir, resume, overwrite)  # again under the lock: another process may have written
        if problem:
            raise ConfigError(problem)
        before = set(run_contents(run_dir))
        if before and not resume:
            for name in before & RUN_FILES:
                _remove(run_dir / name)
            before -= RUN_FILES
        checkpoints = set(list_checkpoints(run_dir))
        try:
            yield run_dir
        except BaseException:
            if set(list_checkpoints(run_dir)) <= checkpoints:  # this run saved nothing worth keeping
                for name in set(run_contents(run_dir)) - before:
                    _remove(run_dir / name)
            raise
    finally:
        lock.release()
        if created and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()


def _barrier() -> None:
    """Under torchrun, wait until every rank has looked at the directory (rank 0 writes into it next)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank0_claimed(claimed: bool) -> bool:
    """Under torchrun, rank 0's `claimed` as every rank's answer; else `claimed`."""
    if not (dist.is_available() and dist.is_initialized()):
        return claimed
    answer = [claimed]
    dist.broadcast_object_list(answer, src=0)
    return bool(answer[0])


def _refusal(run_dir: Path, resume: bool, overwrite: bool) -> str | None:
    """Why a run may not start in `run_dir` (None when it may)."""
    contents = run_contents(run_dir)
    shown = ", ".join(contents[:4]) + (", ..." if len(contents) > 4 else "")
    if resume:
        return None if holds_run(run_dir) or not contents else (
            f"train.output_dir {run_dir} holds no run ({shown}); a resumed run writes into its own run directory")
    if not contents:
        return None
    if not holds_run(run_dir):
        return (f"train.output_dir {run_dir} is not empty and holds no run ({shown}); nothing there is removed, "
                "--overwrite included: choose a new or empty train.output_dir")
    if overwrite:
        return None
    return (f"train.output_dir {run_dir} already holds a run ({shown}); continue it with --resume {run_dir}, "
            f"choose another train.output_dir, or replace it with --overwrite")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
