"""Print a run's one-screen report: held-out metrics beside their chance levels, then the checkpoint.

`vilbert report --run runs/pretrain_embedded` reports a pretraining run (masked tokens, masked regions, alignment,
zero-shot R@1). `vilbert report --run runs/vqa_embedded --task vqa [--compare runs/vqa_embedded_textonly]`
evaluates a shapes-world fine-tuning run on the held-out and compositional splits, optionally beside another run.
"""

from __future__ import annotations

import argparse

from tasks.shapes.report import EVAL_SPLITS, finetuning_report, pretraining_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", dest="run_dir", required=True, help="run directory (train.output_dir)")
    parser.add_argument("--task", choices=sorted(EVAL_SPLITS), help="a fine-tuning run's task (omit for pretraining)")
    parser.add_argument("--compare", metavar="RUN", help="a second fine-tuning run of the same task, shown beside")


def run(args: argparse.Namespace) -> int:
    if args.task is None:
        lines = pretraining_report(args.run_dir)
    else:
        lines = finetuning_report(args.run_dir, args.task, args.compare)
    print("\n".join(lines))
    return 0
