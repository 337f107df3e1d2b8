"""The one way outputs are written: atomically, never over what the command did not write, never over an input.

Everything the project writes for a user to keep (feature stores, checkpoints, configs, predictions, exports,
indexes) goes through `atomic_path`:

- the content is written to a temporary sibling `.NAME.tmp-PID@HOST`, renamed onto the final path only when the block
  ends without an error; on error the temporary is removed and whatever was at the path is untouched;
- a path equal to one of the command's `inputs` (or a folder holding one) is refused before anything is written;
- an existing folder is replaced only when this helper wrote it (it carries the `OWNED_MARKER` file); a folder
  the user made, or a folder where a file is to be written, is refused in one line naming it and the way out;
- temporaries left by a killed process (`.NAME.tmp-PID@HOST` of this host whose PID no longer runs) beside the
  output are removed by the next write there, so a SIGKILL never leaves a whole model or LMDB copy behind for good.

`check_output` runs the same refusals without writing, for commands that must refuse before any work;
`claim_folder` runs them for a folder filled in place, file by file, and marks it as this project's.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from features.errors import DiskFullError, OutputError

FULL_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
               errno.EFBIG: "file size limit exceeded"}
_NEARLY_FULL_BYTES = 64 << 20  # a failed write with less free space than this is taken as a full disk
_HOST = re.sub(r"[^\w.-]", "_", socket.gethostname()) or "host"
OWNED_MARKER = ".vilbert-output"  # inside every folder atomic_path wrote: the folder may be replaced by a rerun
_TEMPORARY = re.compile(r"^\..+\.tmp-(\d+)(?:@(.+))?$")  # .NAME.tmp-PID@HOST


def check_output(path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = (), folder: bool = False,
                 option: str = "--out") -> Path:
    """Refuse (`OutputError`) an output that would replace an input or something this project did not write.

    `folder` says the output is a folder (an LMDB, an index, a model directory); otherwise it is a file. An empty
    folder, or one carrying `OWNED_MARKER`, may be replaced by a folder output.
    """
    path = Path(path)
    target = path.resolve()
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{option} {path}: {parent} is a file, so no folder can be made there; choose another path")
    for given in inputs:
        if given is None:
            continue
        source = Path(given).resolve()
        if target == source or target in source.parents:
            what = "is" if target == source else "holds"
            raise OutputError(f"{option} {path}: {what} the input {given}; writing it would destroy what is being "
                              "read; choose another output path")
    if path.is_dir():
        if not folder:
            raise OutputError(f"{option} {path}: is a folder; give a file path such as {path / 'out'} (nothing "
                              "was written)")
        entries = sorted(p.name for p in path.iterdir())
        if entries and OWNED_MARKER not in entries:
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise OutputError(f"{option} {path}: is an existing folder this command did not write ({shown}); "
                              "it is left alone: remove it yourself or choose a new path")
    elif folder and path.exists():
        raise OutputError(f"{option} {path}: is a file, and this output is a folder; choose a new path")
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = (), folder: bool = False,
                option: str = "--out") -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write (a file, or with `folder` a directory the block creates);
    rename it onto `path` on success. `check_output` refuses first; the parent directory is created if needed."""
    path = check_output(path, inputs, folder, option)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    tmp = temporary_path(path)
    _remove(tmp)
    try:
        with disk_full_as_error(path):
            yield tmp
            if tmp.is_dir():
                (tmp / OWNED_MARKER).write_text("written by vilbert; a rerun may replace this folder\n")
        if tmp.is_dir() != folder and tmp.exists():
            kind = "a folder" if tmp.is_dir() else "a file"
            raise OutputError(f"{option} {path}: the writer made {kind}, not what was declared (a bug)")
        if path.is_dir() and tmp.is_dir():
            _remove(path)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def claim_folder(path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = (),
                 option: str = "--out") -> Path:
    """Make (or take back) a folder output that is filled in place, file by file, each file through `atomic_path`
    (a generated data set, resumable): `check_output`'s refusals, then the folder is created and carries
    `OWNED_MARKER`, so that a rerun after a kill may write into it again."""
    path = check_output(path, inputs, folder=True, option=option)
    path.mkdir(parents=True, exist_ok=True)
    (path / OWNED_MARKER).write_text("written by vilbert; a rerun may write over this folder\n")
    return path


def temporary_path(path: str | os.PathLike) -> Path:
    """Where this process writes `path` before renaming it: `.NAME.tmp-PID@HOST` beside it (the host, so that a
    process on another machine sharing the folder never takes it for a dead one's)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}@{_HOST}")


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove this host's `.NAME.tmp-PID@HOST` entries of `folder` whose process is gone (killed mid-write)."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in Path(folder).iterdir():
            found = _TEMPORARY.match(entry.name)
            if found and found.group(2) in (None, _HOST) and not _running(int(found.group(1))):
                _remove(entry)
                removed.append(entry)
    return removed


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def disk_full_reason(error: BaseException, where: str | os.PathLike) -> str | None:
    """Why writing under `where` failed, when the device (or the file size limit) is full: ENOSPC, EDQUOT, EFBIG as
    an OSError, in HDF5's text ("errno = 28"), or, with almost no space left, torch.save's "file write failed",
    a `SafetensorError` or an LMDB error (LMDB reports a full tmpfs as an I/O error)."""
    code = error.errno if isinstance(error, OSError) else None
    if code is None and isinstance(error, (OSError, RuntimeError)):
        found = re.search(r"errno = (\d+)", str(error))  # HDF5 reports the system error inside its own text
        code = int(found.group(1)) if found else None
    if code in FULL_ERRNOS:
        return FULL_ERRNOS[code]
    vague = (isinstance(error, RuntimeError) and "write failed" in str(error)) or \
        type(error).__name__ == "SafetensorError" or type(error).__module__.split(".")[0] == "lmdb"
    if vague:
        folder = Path(where)
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        with contextlib.suppress(OSError):
            if shutil.disk_usage(folder).free < _NEARLY_FULL_BYTES:
                return FULL_ERRNOS[errno.ENOSPC]
    return None


@contextlib.contextmanager
def disk_full_as_error(path: str | os.PathLike) -> Iterator[None]:
    """Turn a full disk while writing `path` into one `DiskFullError` line naming it; other errors pass."""
    try:
        yield
    except Exception as error:
        reason = None if isinstance(error, DiskFullError) else disk_full_reason(error, Path(path).parent)
        if reason:
            raise DiskFullError(f"{reason} while writing {path}") from error
        raise


def write_json_atomic(path: str | os.PathLike, data: Any, inputs: Iterable[str | os.PathLike | None] = (),
                      option: str = "--out") -> Path:
    """Write JSON so that readers never see half a file."""
    with atomic_path(path, inputs, option=option) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=1)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str, inputs: Iterable[str | os.PathLike | None] = (),
                      option: str = "--out") -> Path:
    with atomic_path(path, inputs, option=option) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return Path(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
