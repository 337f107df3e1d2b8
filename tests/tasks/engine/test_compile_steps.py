"""`train.compile: true` trains with the eager losses (issue 23): the inductor-compiled model on the same data and
weights, loss for loss within 1e-5. Batches are padded to a multiple of 32, so every step has one shape and the
test compiles one graph (inductor on a CPU takes about a minute of compiling)."""

import json

import pytest

from tasks.engine.config import OptimConfig, TrainConfig
from tasks.engine.trainer import Trainer
from tests.fixtures.task_zoo import build_task, write_zoo


def _losses(task_name, overrides, run_dir, **train):
    task = build_task(task_name, overrides)
    config = TrainConfig(output_dir=str(run_dir), global_batch_size=4, max_steps=2, num_workers=0, log_every=1,
                         save_every=100, eval_every=100, eval_at_end=False, device="cpu", group_by_length=True,
                         **train)
    Trainer(task, config, OptimConfig(lr=1e-3, warmup=0)).fit()
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if r["kind"] == "train"]


def test_compiled_pretraining_steps_give_the_eager_losses(tmp_path):
    overrides = write_zoo(tmp_path, ["pretrain"])["pretrain"]
    eager = _losses("pretrain", overrides, tmp_path / "eager")
    compiled = _losses("pretrain", overrides, tmp_path / "compiled", compile=True, pad_to_multiple=32)
    assert len(eager) == len(compiled) == 2
    assert compiled == pytest.approx(eager, rel=1e-5)
