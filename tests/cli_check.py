"""The bad-input contract of the command line, as one assertion every command and task can reuse.

`assert_refused(argv, names=...)` runs `vilbert ARGV` in-process (through `tasks.cli.main`) or, with
`subprocess=True`, as `python -m tasks.cli ARGV`, and asserts what the README promises for bad input: exit status 2,
exactly one error line on stderr that names the file (or key) at fault, no traceback, and nothing written or lost:
no new path appears under the `watch` folders and every file already there keeps its size and modification time.
It returns the error line so a test can check the wording of the problem.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess as subprocesses
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from tasks.cli import main

ROOT = Path(__file__).resolve().parents[1]


def snapshot(folders: Iterable[str | os.PathLike]) -> dict[str, tuple[int, int]]:
    """Every path under `folders` -> (size, mtime_ns); folders count with size -1."""
    seen = {}
    for folder in folders:
        folder = Path(folder)
        if not folder.exists():
            continue
        for path in [folder, *folder.rglob("*")]:
            info = path.lstat()
            seen[str(path)] = (-1 if path.is_dir() else info.st_size, 0 if path.is_dir() else info.st_mtime_ns)
    return seen


def run_cli(argv: Sequence[str], subprocess: bool = False, env: dict | None = None) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `vilbert ARGV`; in-process an exception escaping main is a traceback."""
    argv = [str(a) for a in argv]
    if subprocess:
        environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
        done = subprocesses.run([sys.executable, "-m", "tasks.cli", *argv], capture_output=True, text=True,
                                env=environment, cwd=ROOT, timeout=300)
        return done.returncode, done.stdout, done.stderr
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse
            code = exit_.code if isinstance(exit_.code, int) else 2
        except BaseException as error:  # noqa: BLE001 - reported as the traceback the user would have seen
            raise AssertionError(f"vilbert {' '.join(argv)} raised {type(error).__name__}: {error}") from error
    return code, out.getvalue(), err.getvalue()


def error_lines(stderr: str) -> list[str]:
    """The lines the CLI printed as errors (log records and progress bars are not errors)."""
    return [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("vilbert ")]


def assert_refused(argv: Sequence[str], names: str | os.PathLike | Sequence[str | os.PathLike],
                   watch: Iterable[str | os.PathLike] = (), subprocess: bool = False,
                   allowed_new: Iterable[str | os.PathLike] = ()) -> str:
    """Assert `vilbert ARGV` refuses with exit 2 and one line naming every item of `names`; returns the line.

    `watch`: folders where nothing may appear, change or vanish (paths in `allowed_new` may appear).
    """
    watch = list(watch)
    before = snapshot(watch)
    code, _, stderr = run_cli(argv, subprocess)
    assert "Traceback" not in stderr, stderr
    lines = error_lines(stderr)
    assert code == 2, f"exit {code}, stderr:\n{stderr}"
    assert len(lines) == 1, f"expected one error line, got:\n{stderr}"
    line = lines[0]
    assert ": error: " in line, line
    for name in [names] if isinstance(names, (str, os.PathLike)) else names:
        assert str(name) in line, f"{name!s} not named in: {line}"
    after = snapshot(watch)
    allowed = {str(p) for p in allowed_new}
    new = sorted(set(after) - set(before) - allowed)
    assert not new, f"{line}\nnew paths left behind: {new}"
    changed = sorted(p for p in before if after.get(p) != before[p])
    assert not changed, f"{line}\nchanged or removed: {changed}"
    return line
