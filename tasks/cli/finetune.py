"""Fine-tune a model on one task, or on several at once (`--task multi`).

`vilbert finetune --task vqa [--config FILE] [--init DIR] [key=value ...]` reads tasks/configs/<task>.yaml (or
FILE), applies the overrides, builds the task model (from --init: a pretraining, task or multi-task checkpoint
directory; a multi-task one keeps the task's head and task token) and runs the shared trainer; checkpoints and
logs go to train.output_dir. `--task multi --config tasks/configs/multitask_12in1.yaml [--clean-train-sets]`
trains the config's member tasks together (tasks/multitask.py).
"""

from __future__ import annotations

import argparse

from tasks.cli.options import task_choices


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True, choices=task_choices())
    parser.add_argument("--config", help="YAML config (default: tasks/configs/<task>.yaml)")
    parser.add_argument("--init", help="checkpoint directory to start from (pretraining or task)")
    parser.add_argument("--resume", help="resume from a checkpoint or run directory")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the run already in train.output_dir and start a new one there")
    parser.add_argument("--clean-train-sets", action="store_true",
                        help="multi: drop training items whose images are in any member's val/test splits")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.epochs=1")


def run(args: argparse.Namespace) -> int:
    from tasks.data.feature_provenance import warn_if_store_differs
    from tasks.engine.trainer import Trainer, summary_lines
    from tasks.errors import ConfigError
    from tasks.multitask import MultiTask
    from tasks.registry import build_task

    overrides = list(args.overrides) + ([f"model.init={args.init}"] if args.init else [])
    if args.clean_train_sets:
        if args.task != "multi":
            raise ConfigError("--clean-train-sets: only a multi-task run (--task multi) has other tasks' splits")
        overrides.append("multitask.clean_train_sets=true")
    task = build_task(args.task, args.config, overrides)
    for features in task.feature_files():
        warn_if_store_differs(task.config.model.init, features)
    trainer = Trainer(task)
    result = trainer.fit(resume=args.resume, overwrite=args.overwrite)
    for line in summary_lines(result, task):
        print(line)
    if isinstance(task, MultiTask) and task.removed:
        print("clean train sets    " + ", ".join(f"{name} -{count}" for name, count in task.removed.items()))
    return 0
