"""Train each member of a shapes-world multi-task run alone for the steps it had, then compare them.

`vilbert multitask-baselines --run runs/multi_embedded` reads the run's last checkpoint (its config and how many
optimizer steps each member task had), trains every member alone from the same start (`model.init`) for as many
steps into RUN/single/<task> (a finished one is kept), evaluates both on the held-out test split and prints, per
task, multi-task accuracy, single-task accuracy and chance (`make finetune TASK=multi`).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", dest="run_dir", required=True, help="the multi-task run directory")


def run(args: argparse.Namespace) -> int:
    from tasks.engine.checkpoints import list_checkpoints, read_trainer_state
    from tasks.engine.config import load_config
    from tasks.engine.trainer import Trainer
    from tasks.multitask import MultiTaskConfig, load_member
    from tasks.shapes.report import last_checkpoint, multitask_report

    run_dir = Path(args.run_dir)
    checkpoint = last_checkpoint(run_dir)
    config = load_config(checkpoint / "run_config.yaml", MultiTaskConfig)
    micro_steps = read_trainer_state(checkpoint)["task"]["micro_steps"]
    singles = {}
    for spec in config.tasks:
        label = spec.label or spec.name
        steps = micro_steps[label] // config.train.grad_accumulation
        task = load_member(spec, config.model, config.train.seed)
        train = task.config.train
        train.output_dir, train.max_steps, train.epochs = str(run_dir / "single" / label), steps, 10_000
        train.eval_at_end, train.eval_every, train.save_every = False, 10**9, steps
        singles[spec.name] = (Path(train.output_dir), steps)
        if not list_checkpoints(train.output_dir):
            Trainer(task).fit()
    for line in multitask_report(run_dir, singles):
        print(line)
    return 0
