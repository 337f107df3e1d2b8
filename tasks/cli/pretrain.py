"""Pretrain ViLBERT on image-caption pairs (masked language, masked regions, alignment).

Reads a run config (YAML, e.g. tasks/configs/pretrain_cc.yaml) with `key=value` overrides, trains with the
shared trainer (one process, or one per GPU/node under torchrun), and ends with a one-screen summary.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="run config YAML (tasks/configs/pretrain_*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. train.global_batch_size=64 optim.lr=5e-5")
    parser.add_argument("--resume", nargs="?", const="latest", metavar="DIR",
                        help="continue from a checkpoint or run directory (no DIR: train.output_dir's latest)")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the run already in train.output_dir and start a new one there")
    parser.add_argument("--strict", action="store_true", help="captions of images missing from the store are an error")


def run(args: argparse.Namespace) -> int:
    from tasks.engine.config import load_config
    from tasks.engine.trainer import Trainer, summary_lines
    from tasks.pretraining import PretrainConfig, PretrainingTask

    config = load_config(args.config, PretrainConfig, args.overrides)
    if args.strict:
        config.data.strict = True
    task = PretrainingTask(config)
    trainer = Trainer(task)
    resume = config.train.output_dir if args.resume == "latest" else args.resume
    result = trainer.fit(resume=resume, overwrite=args.overwrite)
    if trainer.dist.is_main:
        print("\n".join(summary_lines(result, task)))
    return 0
