"""Every registered task trains compiled with the eager losses and gradients (issue 23).

`Trainer.fit` with `train.compile=true` and length-grouped batches (each cut to its longest item, so the steps
meet different shapes: dynamo compiles the first and recompiles with dynamic lengths) against the same run
eager, same data and weights: every step's loss within 1e-5 and every parameter's gradient within 1e-5 of the
gradients' scale. The backend is `aot_eager` (dynamo's graph capture and AOT autograd's forward and backward
graphs, without inductor's code generation, which takes about a minute per graph on a CPU);
tests/tasks/engine/test_compile_steps.py runs inductor on pretraining. Dynamo must capture each model's forward
in one graph: a graph break (a `.item()`, data-dependent Python control flow) fails the test.
"""

import json

import pytest
import torch
from torch import nn

from tasks.engine.config import OptimConfig, TrainConfig
from tasks.engine.padding import MASKS
from tasks.engine.trainer import Trainer
from tests.fixtures.task_zoo import ZOO_TASKS, build_task, write_zoo

STEPS = 3
# tiny data whose length-grouped batches of two all have one shape (the others meet two or more)
ONE_SHAPE = {"pretrain", "vqa", "retrieval", "visual7w", "guesswhat-pointing", "foil", "flickr-grounding", "vcr-qa"}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return write_zoo(tmp_path_factory.mktemp("zoo"))


def _fit(name, overrides, run_dir, **train):
    """Losses logged at each step, and each step's gradients and padded lengths, from `Trainer.fit`."""
    task = build_task(name, overrides)
    steps = []  # per step: {"lengths": ..., "grads": {parameter: gradient}}
    build_model, training_step = task.build_model, task.training_step

    def build_with_hooks():
        model = build_model()
        for module in model.modules():  # BERT's 0.02 init gives almost equal outputs: gradients near rounding noise
            if isinstance(module, nn.Linear):
                module.reset_parameters()
        for key, parameter in model.named_parameters():
            if parameter.requires_grad:
                parameter.register_post_accumulate_grad_hook(
                    lambda p, key=key: steps[-1]["grads"].__setitem__(key, p.grad.detach().clone()))
        return model

    def recording_step(model, batch):
        steps.append({"lengths": tuple(batch[key].shape[-1] for key in MASKS.values() if key in batch), "grads": {}})
        return training_step(model, batch)

    task.build_model, task.training_step = build_with_hooks, recording_step
    config = TrainConfig(output_dir=str(run_dir), epochs=STEPS, global_batch_size=2, max_steps=STEPS, num_workers=0,
                         log_every=1, save_every=100, eval_every=100, eval_at_end=False, device="cpu",
                         group_by_length=True, **train)
    Trainer(task, config, OptimConfig(lr=1e-3, warmup=0)).fit()
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if r["kind"] == "train"], steps


@pytest.mark.parametrize("name", ZOO_TASKS)
def test_a_compiled_training_run_gives_the_eager_losses_and_gradients(name, zoo, tmp_path):
    eager_losses, eager = _fit(name, zoo[name], tmp_path / "eager")
    torch._dynamo.reset()  # every task's model class starts with an empty cache (no recompile limit reached)
    torch._dynamo.utils.counters.clear()
    compiled_losses, compiled = _fit(name, zoo[name], tmp_path / "compiled", compile=True, compile_backend="aot_eager")
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] >= 1, "nothing was compiled"
    assert not counters["graph_break"], f"graph breaks: {dict(counters['graph_break'])}"

    assert len(eager_losses) == STEPS and compiled_losses == pytest.approx(eager_losses, rel=1e-5)
    assert [s["lengths"] for s in compiled] == [s["lengths"] for s in eager]
    if name not in ONE_SHAPE:
        assert len({s["lengths"] for s in eager}) > 1, "the length-grouped batches all had one shape"
    for step, (reference, got) in enumerate(zip(eager, compiled, strict=True)):
        assert reference["grads"] and set(reference["grads"]) <= set(got["grads"])
        # AOT autograd gives parameters the forward computes but the loss never reaches a zero gradient where
        # eager leaves None (AdamW then applies weight decay to them: the weights differ, the losses do not)
        for key in set(got["grads"]) - set(reference["grads"]):
            assert not got["grads"][key].any(), f"step {step + 1}: {key} has a gradient only when compiled"
        scale = max(g.abs().max() for g in reference["grads"].values())
        assert scale > 0
        for key, grad in reference["grads"].items():
            assert (got["grads"][key] - grad).abs().max() <= 1e-5 * scale, f"step {step + 1}: gradient of {key}"
