"""Exclusive output locks: one process at a time writes a feature store or a training run directory.

`OutputLock(path)` holds an advisory `flock` on a lock file that records the holder's pid and host. The kernel drops
the lock when its holder dies, so a lock file left by a killed process is stale by construction: the next process
takes it over (and logs that it did). A second live process gets `OutputLockedError`, one line naming the output
and the holder. The lock file is removed on release.

A forked child (a DataLoader worker, a decoding pool) closes its copies of the held locks at once: a flock lives
as long as any process holds the descriptor, and orphaned workers of a killed run would otherwise keep the output
locked for their whole life.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import weakref
from pathlib import Path

from features.errors import OutputLockedError

logger = logging.getLogger(__name__)
_HELD: weakref.WeakSet[OutputLock] = weakref.WeakSet()  # locks held by this process
_HELD_FDS: set[int] = set()  # their descriptors (also of locks dropped without release())


def _forget_in_child() -> None:
    """In a forked child: close the inherited lock descriptors; the parent keeps its locks."""
    for fd in _HELD_FDS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_FDS.clear()
    for lock in list(_HELD):
        lock._fd = None
    _HELD.clear()


os.register_at_fork(after_in_child=_forget_in_child)


class OutputLock:
    """An exclusive lock on `lock_file`, taken by `acquire()` (raises `OutputLockedError`) and dropped by `release()`.

    `what` names the protected output in the error message (`--out feats.h5`, `run directory runs/x`).
    """

    def __init__(self, lock_file: str | os.PathLike, what: str):
        self.lock_file = Path(lock_file)
        self.what = what
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> OutputLock:
        if self._fd is not None:
            return self
        self.lock_file.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise OutputLockedError(
                    f"{self.what} is in use by another process ({holder}, lock file {self.lock_file}); "
                    "wait for it to finish or choose another output"
                ) from None
            try:  # the holder before us may have removed the file after we opened it: lock the file at the path
                same = os.fstat(fd).st_ino == os.stat(self.lock_file).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _read_holder(fd)
        if previous != "unknown holder":
            logger.info("%s: taking over a stale lock (%s, no longer running)", self.lock_file, previous)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        self._fd = fd
        _HELD.add(self)
        _HELD_FDS.add(fd)
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.lock_file.unlink()  # while still holding the lock, so nobody locks a file about to vanish
        os.close(self._fd)
        _HELD_FDS.discard(self._fd)
        self._fd = None
        _HELD.discard(self)

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 256).decode(errors="replace").split()
    if len(text) >= 2:
        return f"pid {text[0]} on {text[1]}"
    return f"pid {text[0]}" if text else "unknown holder"
