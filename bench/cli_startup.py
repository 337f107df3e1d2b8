"""Start-up time of the command line: `vilbert --help` and `vilbert COMMAND --help`, best of N fresh processes.

    python bench/cli_startup.py                    # the bare interpreter, `vilbert --help`, every command's --help
    python bench/cli_startup.py --repeat 10 --commands predict finetune

Each run is a new `python -m tasks.cli` process in this checkout (what the `vilbert` script runs), so a time includes
the interpreter's own start, shown on the first line for scale. The best of N is the run least disturbed by
other load on the machine. The last line says which heavy packages parsing every command's --help imported (the
command line promises none: tests/cli/test_startup.py).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "numpy", "h5py", "PIL", "matplotlib")
PARSE_ALL = """
import contextlib, io, sys
from tasks.cli import COMMANDS, build_parser
parser = build_parser()
for name in COMMANDS:
    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):
        parser.parse_args([name, "--help"])
print(" ".join(m for m in {heavy!r} if m in sys.modules) or "none")
"""


def best_of(argv: list[str], repeat: int) -> float:
    """The shortest wall time of `repeat` runs of argv, in seconds; each run must exit 0."""
    best = float("inf")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(argv, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per command line; the best is reported")
    parser.add_argument("--commands", nargs="*", help="subcommands to time (default: all)")
    args = parser.parse_args()
    # the command list from a child process: nothing outside tasks/cli imports it (tests/test_layers.py)
    commands = subprocess.run([sys.executable, "-c", "from tasks.cli import COMMANDS; print(*COMMANDS)"], cwd=ROOT,
                              check=True, capture_output=True, text=True).stdout.split()
    vilbert = [sys.executable, "-m", "tasks.cli"]
    rows = [("python -c pass", [sys.executable, "-c", "pass"]), ("vilbert --help", [*vilbert, "--help"])]
    rows += [(f"vilbert {name} --help", [*vilbert, name, "--help"]) for name in args.commands or commands]
    print(f"{'command':<38} best of {args.repeat} (s)")
    for label, argv in rows:
        print(f"{label:<38} {best_of(argv, args.repeat):.3f}")
    check = subprocess.run([sys.executable, "-c", PARSE_ALL.format(heavy=HEAVY)], cwd=ROOT, check=True,
                           capture_output=True, text=True)
    print(f"imported while parsing every command's --help: {check.stdout.strip()}")


if __name__ == "__main__":
    main()
