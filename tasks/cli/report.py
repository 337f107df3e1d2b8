"""Print a run's one-screen report: held-out metrics beside their chance levels, then the checkpoint.

`vilbert report --run runs/pretrain_embedded` reports a pretraining run (masked tokens, masked regions, alignment,
zero-shot R@1). `vilbert report --run runs/vqa_embedded --task vqa [--compare runs/vqa_embedded_textonly]`
evaluates a shapes-world fine-tuning run on the held-out and compositional splits, optionally beside another run.
`--json FILE` also writes the fine-tuning report's rows (each split's metric, chance and whole evaluation, and the
--compare run's) for tables built from several runs (`bench/debias_table.py`). `--plot curves.png` also draws
every logged metric against steps (the --compare run overlaid), VQA accuracy by question type and retrieval
recall@K; `--plot-only` draws the figure without the report (any run, while it trains).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tasks.cli.options import REPORT_TASKS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", dest="run_dir", required=True, help="run directory (train.output_dir)")
    parser.add_argument("--task", choices=REPORT_TASKS, help="a fine-tuning run's task (omit for pretraining)")
    parser.add_argument("--compare", metavar="RUN", help="a second run: beside in a fine-tuning report, overlaid in the plot")
    parser.add_argument("--plot", metavar="FILE.png", help="write the training curves figure")
    parser.add_argument("--plot-only", action="store_true", help="only the figure: no report, no evaluation")
    parser.add_argument("--json", metavar="FILE.json", help="a fine-tuning report: also write its rows to this file")


def run(args: argparse.Namespace) -> int:
    from features.atomic import write_json_atomic
    from tasks.errors import ConfigError
    from tasks.figures.curves import plot_runs, read_run
    from tasks.shapes.report import finetuning_report, finetuning_rows, pretraining_report, report_record

    if args.plot_only and not args.plot:
        raise ConfigError("--plot-only needs --plot FILE.png")
    if args.json and (args.task is None or args.plot_only):
        raise ConfigError("--json: writes a fine-tuning report's rows; give --task and no --plot-only")
    runs = [read_run(args.run_dir)] if args.plot else []  # a bad log fails before any evaluation
    if args.plot and args.compare:
        runs.append(read_run(args.compare))
    evaluations = None
    if not args.plot_only:
        if args.task is None:
            lines = pretraining_report(args.run_dir)
        else:
            rows = finetuning_rows(args.run_dir, args.task)
            other = finetuning_rows(args.compare, args.task) if args.compare else None
            lines = finetuning_report(args.run_dir, args.task, args.compare, rows, other)
            evaluations = {f"{Path(directory).name}: {row.name.split(':')[0]}": row.metrics
                           for directory, found in ((args.run_dir, rows), (args.compare, other or []))
                           for row in found}
        print("\n".join(lines))
        if args.json:
            write_json_atomic(args.json, report_record(args.run_dir, args.task, rows, args.compare, other),
                              inputs=[args.run_dir, args.compare], option="--json")
    if args.plot:
        # on stderr: the report's last line stays "checkpoint DIR" (the Makefile reads it)
        print(f"curves -> {plot_runs(runs, args.plot, evaluations)}", file=sys.stderr)
    return 0
