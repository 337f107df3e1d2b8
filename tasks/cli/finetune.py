"""Fine-tune a model on VQA, retrieval or referring expressions.

`vilbert finetune --task vqa [--config FILE] [--init DIR] [key=value ...]` reads tasks/configs/<task>.yaml (or
FILE), applies the overrides, builds the task model (from --init: a pretraining or task checkpoint directory)
and runs the shared trainer; checkpoints and logs go to train.output_dir.
"""

from __future__ import annotations

import argparse

from tasks.cli.evaluate import TASK_CHOICES
from tasks.data.feature_provenance import warn_if_store_differs
from tasks.runners.evaluate import load_task


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True, choices=TASK_CHOICES)
    parser.add_argument("--config", help="YAML config (default: tasks/configs/<task>.yaml)")
    parser.add_argument("--init", help="checkpoint directory to start from (pretraining or task)")
    parser.add_argument("--resume", help="resume from a checkpoint or run directory")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the run already in train.output_dir and start a new one there")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.epochs=1")


def run(args: argparse.Namespace) -> int:
    from tasks.engine.trainer import Trainer, summary_lines

    overrides = list(args.overrides) + ([f"model.init={args.init}"] if args.init else [])
    task = load_task(args.task, args.config, overrides)
    warn_if_store_differs(task.config.model.init, task.config.data.features)
    trainer = Trainer(task, task.config.train, task.config.optim, run_config=task.config)
    result = trainer.fit(resume=args.resume, overwrite=args.overwrite)
    for line in summary_lines(result, task):
        print(line)
    return 0
