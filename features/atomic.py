"""Atomic writes: a file or directory appears at its final path complete, or not at all.

Everything the project writes for a user to keep (feature stores, checkpoints, configs, predictions) goes through
`atomic_path`: the content is written to a temporary sibling, which is renamed onto the final path only when the
block ends without an error; on error the temporary is removed and an existing file at the path is untouched.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from features.errors import DiskFullError

FULL_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
               errno.EFBIG: "file size limit exceeded"}
_NEARLY_FULL_BYTES = 64 << 20  # a failed write with less free space than this is taken as a full disk


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write (a file, or a directory the block creates); rename on success.

    A directory at `path` is replaced whole. The parent directory is created if needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        with disk_full_as_error(path):
            yield tmp
        if path.is_dir() and tmp.is_dir():
            _remove(path)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def disk_full_reason(error: BaseException, where: str | os.PathLike) -> str | None:
    """Why writing under `where` failed, when the device (or the file size limit) is full: ENOSPC, EDQUOT, EFBIG as
    an OSError, in HDF5's text ("errno = 28"), or torch.save's "file write failed" with almost no space left."""
    code = error.errno if isinstance(error, OSError) else None
    if code is None and isinstance(error, (OSError, RuntimeError)):
        found = re.search(r"errno = (\d+)", str(error))  # HDF5 reports the system error inside its own text
        code = int(found.group(1)) if found else None
    if code in FULL_ERRNOS:
        return FULL_ERRNOS[code]
    if isinstance(error, RuntimeError) and "write failed" in str(error):
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
    except (OSError, RuntimeError) as error:
        reason = None if isinstance(error, DiskFullError) else disk_full_reason(error, Path(path).parent)
        if reason:
            raise DiskFullError(f"{reason} while writing {path}") from error
        raise


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """Write JSON so that readers never see half a file."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=1)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return Path(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
