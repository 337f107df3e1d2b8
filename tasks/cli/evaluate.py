"""Evaluate a checkpoint on a task split with the official metric; write metrics and predictions.

`vilbert evaluate --task vqa --checkpoint DIR --split minval [--out DIR]` writes DIR/metrics.json and
DIR/predictions.json. For VQA test / test-dev the predictions are the submission file
([{"question_id", "answer"}] for every question of the split). For retrieval, `--hard-negatives OUT.json`
writes the hard-negative pool of the split's images (100 nearest by the model's scores) instead.
`--task multi` on a multi-task checkpoint evaluates every member task on its own split (`--split val`: each
member's validation split), metrics keyed `<task>/<metric>` plus their mean `score`.
A pretraining checkpoint evaluates retrieval zero-shot (alignment head). Retrieval `--mode coattention|dual|
dual+rerank [--rerank-k K]` ranks by co-attention, by the dual encoder, or by the dual encoder's top K re-ranked
by co-attention, and adds queries/s each way (tasks/ranking/search.py).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from features.atomic import check_output, write_json_atomic
from tasks.cli.options import task_choices
from tasks.errors import ConfigError

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True, choices=task_choices())
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (config.json + model.safetensors)")
    parser.add_argument("--split", required=True, help="vqa: train|val|trainval|minval|test|test-dev; "
                        "retrieval: train|val|test; refexp: val|testA|testB|test; others: their files' splits")
    parser.add_argument("--config", help="YAML config (default: tasks/configs/<task>.yaml; multi: the checkpoint's "
                        "run_config.yaml)")
    parser.add_argument("--out", help="output directory (default: <checkpoint>/eval-<split>)")
    parser.add_argument("--hard-negatives", metavar="OUT.json", help="retrieval: write the split's hard-negative pool")
    parser.add_argument("--mode", choices=("coattention", "dual", "dual+rerank"),
                        help="retrieval: how to rank (adds queries/s); default: co-attention, as before")
    parser.add_argument("--rerank-k", type=int, default=32, help="retrieval dual+rerank: candidates re-ranked")
    parser.add_argument("--strict", action="store_true",
                        help="items whose image has no features are an error (default: scored as wrong and counted "
                             "in num_without_features)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from tasks.data.feature_provenance import warn_if_store_differs
    from tasks.registry import build_task, task_class
    from tasks.runners.checkpoint import load_checkpoint_model

    cls = task_class(args.task)
    if args.strict and cls.strict_key is None:
        raise ConfigError(f"--strict: set data.strict in each member's config of a {args.task} run")
    strict = [f"{cls.strict_key}=true"] if args.strict else []
    config = args.config
    if cls.config_from_checkpoint and config is None:
        config = Path(args.checkpoint) / "run_config.yaml"
    task = build_task(args.task, config, [*cls.named_split_overrides(args.split), *args.overrides,
                                          f"model.init={args.checkpoint}", *cls.checkpoint_overrides, *strict])
    for features in task.feature_files():
        warn_if_store_differs(args.checkpoint, features)
    model = load_checkpoint_model(args.checkpoint, task)
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    out = Path(args.out or Path(args.checkpoint) / f"eval-{args.split}")
    for path in (out / "predictions.json", out / "metrics.json", args.hard_negatives):
        if path is not None:
            check_output(path, (args.checkpoint, config), option="--hard-negatives" if path == args.hard_negatives
                         else "--out")
    progress = lambda items: tqdm(items, desc=f"{args.task} {args.split}", leave=False)  # noqa: E731

    if args.hard_negatives:
        pool = task.hard_negative_pool(model, args.split, progress=progress)
        write_json_atomic(args.hard_negatives, pool)
        print(f"hard negatives of {len(pool)} images -> {args.hard_negatives}")
        return 0
    predictions, metrics = task.evaluation(model, args.split, progress, args.mode, args.rerank_k)
    write_json_atomic(out / "predictions.json", predictions)
    write_json_atomic(out / "metrics.json", {"task": args.task, "split": args.split,
                                             "checkpoint": str(args.checkpoint), **metrics})
    for key, value in metrics.items():
        print(f"{key:>24} {value:.2f}" if isinstance(value, float) else f"{key:>24} {value}")
    print(f"predictions and metrics -> {out}")
    return 0
