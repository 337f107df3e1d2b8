"""The `vilbert` command: one subcommand per module in `tasks.cli`.

Each command module defines `add_arguments(parser)` and `run(args) -> int`, plus a module docstring whose first
line is the subcommand's help. Errors of the project's own types print one line and exit with status 2 (with
--verbose, the whole message and
its traceback are logged as well).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings

from features.errors import DiskFullError, FeaturesError
from vilbert.errors import ViLBertError

# subcommand name -> module under tasks.cli
COMMANDS: dict[str, str] = {
    "shapes-world": "shapes_world",
    "extract": "extract",
    "train-detector": "train_detector",
    "features": "features",
    "pretrain": "pretrain",
    "finetune": "finetune",
    "multitask-baselines": "multitask_baselines",
    "evaluate": "evaluate",
    "predict": "predict",
    "predict-task": "predict_task",
    "report": "report",
    "score": "score",
    "convert": "convert",
    "serve": "serve",
    "boxes": "boxes",
    "index": "index",
    "search": "search",
    "vcr-submission": "vcr_submission",
    "classify": "classify",
    "study": "study",
}

USER_ERRORS = (ViLBertError, FeaturesError)  # tasks.errors.TasksError is a ViLBertError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vilbert", description="ViLBERT: features, pretraining, fine-tuning.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"tasks.cli.{module_name}")
        doc = (module.__doc__ or "").strip().splitlines()
        command = sub.add_parser(name, help=doc[0] if doc else None, description=module.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # keep examples as written
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    _quiet_libraries(args.verbose)
    try:
        return int(args.run(args) or 0)
    except USER_ERRORS as error:
        _close_progress_bars()
        print(f"vilbert {args.command}: error: {one_line(error, args.verbose)}", file=sys.stderr)
        if args.verbose:
            logging.getLogger("vilbert").debug("details", exc_info=error)
        if isinstance(error, DiskFullError) and argv is None:  # the program itself, not a caller in Python
            _exit_now(2)
        return 2
    except KeyboardInterrupt:
        print(f"vilbert {args.command}: interrupted", file=sys.stderr)
        return 130


def _exit_now(code: int) -> None:
    """Exit without the libraries' teardown. After a write failed on a full disk, HDF5 may still hold ids of the
    abandoned file (h5py could not free them while the write failed); at exit HDF5 flushes them into the full
    device and crashes (a segfault after the one-line error). Everything of ours is already cleaned up here."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _quiet_libraries(verbose: bool) -> None:
    """One line per problem and nothing when there is none: libraries' chatter that says nothing to a user goes.

    torch warns about every protocol-4 pickle before its own (one-line) refusal; faiss logs at INFO the optional
    AVX2/AVX512 builds it failed to import on its way to the one it loads; transformers draws a "Loading weights"
    bar for every checkpoint it reads (read before transformers is imported: nothing here imports it).
    """
    warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
    if not verbose:
        logging.getLogger("faiss.loader").setLevel(logging.WARNING)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def one_line(error: BaseException, verbose: bool = False) -> str:
    """The error's message as one line; a message of several lines (a library's text quoted in it) keeps its first
    line, and the rest is shown with --verbose."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if len(lines) == 1:
        return lines[0]
    return " ".join(lines) if verbose else f"{lines[0]} (more with --verbose)"


def _close_progress_bars() -> None:
    """Close the progress bars a failed command left open, so that its error starts a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


if __name__ == "__main__":
    sys.exit(main())
