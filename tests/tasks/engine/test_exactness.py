"""One process, two gloo ranks and two accumulation micro-steps train the same model.

Every loss is a sum over labelled items divided by the global count of those items, so the step's loss and
gradients are the same (≤ 1e-5 relative, fp32) however the global batch is split. The two ranks are spawned once
for the whole module and compute every registered single task (task_zoo.ZOO_TASKS); each task's test compares them
with one process and with accumulation. Frozen layers (`fixed_t_layer`) train under two ranks through `Trainer.fit`
(its sampler shards, no
"Expected to have finished reduction" error) and log the single-process losses and gradient norms.
"""

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from tasks.engine.checkpoints import list_checkpoints
from tasks.engine.config import OptimConfig, TrainConfig
from tasks.engine.trainer import Trainer
from tests.fixtures.exact_ranks import fit_losses, rank_worker, step_loss_and_grads
from tests.fixtures.local_ports import free_port
from tests.fixtures.task_zoo import ZOO_TASKS, build_task, write_zoo

FROZEN = ["model.overrides.fixed_t_layer=1"]



@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return write_zoo(tmp_path_factory.mktemp("zoo"))


# the dual encoder's InfoNCE gathers its negatives over ranks: exact across ranks, not across accumulation steps
# (a micro-step's negatives are its own batch)
CONTRASTIVE = {f"{name} + contrastive": name for name in ("pretrain", "retrieval")}
# the debiasing losses (tasks/debiasing.py) on the answer-classifier tasks and VQA's region supervision
# (tasks/region_supervision.py, a loss term over the grounded questions only): (task, overrides)
DEBIAS = {"vqa + rubi": ("vqa", ["data.debias=rubi"]), "vqa-cp + lmh": ("vqa-cp", ["data.debias=lmh"]),
          "gqa + lmh": ("gqa", ["data.debias=lmh"]), "genome-qa + rubi": ("genome-qa", ["data.debias=rubi"]),
          "vqa + grounding": ("vqa", ["data.grounding_weight=1.0"]),
          "vqa-cp + rubi + grounding": ("vqa-cp", ["data.debias=rubi", "data.grounding_weight=0.5"]),
          # pretraining on grounded captions (tasks/pretraining.py: box-centre regression, relation words masked,
          # false captions as negatives); GROUNDED stands for the zoo's grounded caption file
          "pretrain + geometry": ("pretrain", ["data.train_captions=GROUNDED", "data.geometry_weight=1.0",
                                               "data.mask_relations=true", "data.hard_negatives=0.5"])}


def _debias(zoo, case):
    name, overrides = DEBIAS[case]
    if any("GROUNDED" in o for o in overrides):
        captions = next(o.split("=", 1)[1] for o in zoo[name] if o.startswith("data.train_captions="))
        grounded = str(Path(captions).with_name("grounded_train.jsonl"))
        overrides = [o.replace("GROUNDED", grounded) for o in overrides]
    return name, [*zoo[name], *overrides]


@pytest.fixture(scope="module")
def ranks(zoo, tmp_path_factory):
    """Both ranks' results: {case: (loss, gradients) or the error}, and the directory of their pretraining fit."""
    out = tmp_path_factory.mktemp("ranks")
    cases = {name: (name, overrides) for name, overrides in zoo.items()}
    cases.update({case: (name, [*zoo[name], "data.contrastive_weight=0.5"]) for case, name in CONTRASTIVE.items()})
    cases.update({case: _debias(zoo, case) for case in DEBIAS})
    frozen = [*zoo["pretrain"], *FROZEN]
    mp.start_processes(rank_worker, args=(2, free_port(), cases, frozen, str(out)), nprocs=2, join=True,
                       start_method="spawn")
    return torch.load(out / "ranks.pt", weights_only=True), out / "fit"


def _assert_same(reference, other, what):
    loss, grads = reference
    other_loss, other_grads = other
    assert torch.isfinite(loss), f"{what}: loss {loss}"
    torch.testing.assert_close(other_loss, loss, rtol=1e-5, atol=0, msg=f"{what}: loss")
    assert sorted(other_grads) == sorted(grads), f"{what}: different parameters have gradients"
    flat = torch.cat([g.flatten() for g in grads.values()])
    other_flat = torch.cat([other_grads[n].flatten() for n in grads])
    assert flat.norm() > 0
    assert (other_flat - flat).norm() <= 1e-5 * flat.norm(), f"{what}: gradients differ"
    scale = flat.abs().max()
    for name, grad in grads.items():
        assert (other_grads[name] - grad).abs().max() <= 1e-5 * scale, f"{what}: gradient of {name}"


@pytest.mark.parametrize("name", ZOO_TASKS)
def test_one_process_two_ranks_and_accumulation_give_the_same_step(name, zoo, ranks, tmp_path):
    results, _ = ranks
    assert not isinstance(results[name], str), f"two ranks failed: {results[name]}"
    single = step_loss_and_grads(name, zoo[name], 1, 0, 1, str(tmp_path))
    accumulated = step_loss_and_grads(name, zoo[name], 2, 0, 1, str(tmp_path))
    _assert_same(single, results[name], f"{name}, 2 ranks")
    _assert_same(single, accumulated, f"{name}, 2 accumulation steps")


@pytest.mark.parametrize("case", list(CONTRASTIVE))
def test_two_ranks_give_the_single_process_step_with_the_contrastive_loss(case, zoo, ranks, tmp_path):
    results, _ = ranks
    assert not isinstance(results[case], str), f"two ranks failed: {results[case]}"
    name = CONTRASTIVE[case]
    single = step_loss_and_grads(name, [*zoo[name], "data.contrastive_weight=0.5"], 1, 0, 1, str(tmp_path))
    _assert_same(single, results[case], f"{case}, 2 ranks")


@pytest.mark.parametrize("case", list(DEBIAS))
def test_two_ranks_and_accumulation_give_the_single_process_step_with_a_debiasing_loss(case, zoo, ranks, tmp_path):
    results, _ = ranks
    assert not isinstance(results[case], str), f"two ranks failed: {results[case]}"
    name, overrides = _debias(zoo, case)
    single = step_loss_and_grads(name, overrides, 1, 0, 1, str(tmp_path))
    _assert_same(single, results[case], f"{case}, 2 ranks")
    _assert_same(single, step_loss_and_grads(name, overrides, 2, 0, 1, str(tmp_path)), f"{case}, 2 accumulation steps")


def test_frozen_layers_train_under_two_ranks_with_the_single_process_losses(zoo, ranks, tmp_path):
    _, fit_dir = ranks
    fit_losses([*zoo["pretrain"], *FROZEN], str(tmp_path / "single"), 1)

    def logged(run_dir):
        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"], r["grad_norm"]) for r in lines if r["kind"] == "train"]

    two, one = logged(fit_dir), logged(tmp_path / "single")
    assert [s for s, _, _ in two] == [1, 2, 3]  # only rank 0 logs: one line per step
    assert [p.name for p in list_checkpoints(fit_dir)] == ["step-00000002", "step-00000003"]  # and saves
    for (_, loss2, norm2), (_, loss1, norm1) in zip(two, one, strict=True):
        assert loss2 == pytest.approx(loss1, rel=1e-5) and norm2 == pytest.approx(norm1, rel=1e-5)


# ------------------------------------------------------------------------------------------- kill and resume


def _fit(name, overrides, run_dir, crash_at_call=None, resume=None):
    """Two optimizer steps (accumulation 2, dropout on) with a checkpoint after the first; the task's
    `training_step` raises at call `crash_at_call`, as a killed process stops there."""
    task = build_task(name, overrides, dropout=True)
    if crash_at_call is not None:
        step, calls = task.training_step, []

        def crashing(model, batch):
            calls.append(1)
            if len(calls) == crash_at_call:
                raise KeyboardInterrupt
            return step(model, batch)

        task.training_step = crashing
    config = TrainConfig(output_dir=str(run_dir), epochs=2, global_batch_size=2, grad_accumulation=2, max_steps=2,
                         num_workers=0, log_every=1, save_every=1, eval_every=1000, eval_at_end=False, device="cpu",
                         group_by_length=True)  # length-grouped batches resume exactly too
    return Trainer(task, config, OptimConfig(lr=1e-3, warmup=0.5)).fit(resume=resume)


@pytest.mark.parametrize("name", [*ZOO_TASKS, "vqa + rubi", "gqa + lmh", "vqa + grounding"])
def test_killed_and_resumed_training_ends_with_the_uninterrupted_weights(name, zoo, tmp_path):
    name, overrides = _debias(zoo, name) if name in DEBIAS else (name, zoo[name])
    full = _fit(name, overrides, tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):  # in step 2's second micro-step: only step 1's checkpoint survives
        _fit(name, overrides, tmp_path / "killed", crash_at_call=4)
    resumed = _fit(name, overrides, tmp_path / "killed", resume=tmp_path / "killed")
    assert full.last_checkpoint.name == resumed.last_checkpoint.name == "step-00000002"
    expected = load_file(full.last_checkpoint / "model.safetensors")
    got = load_file(resumed.last_checkpoint / "model.safetensors")
    assert sorted(got) == sorted(expected)
    changed = 0
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key  # bitwise: data order, per-sample draws, dropout, optimizer
        changed += 1
    assert changed and full.state.step == resumed.state.step == 2


def test_a_run_directory_rank_0_cannot_claim_stops_every_rank(ranks):
    _, fit_dir = ranks
    outcomes = [(fit_dir.parent / f"claim-{rank}.txt").read_text() for rank in (0, 1)]
    assert outcomes[0].startswith("OutputLockedError: run directory") and "in use by another process" in outcomes[0]
    assert outcomes[1] == (f"ConfigError: train.output_dir {fit_dir.parent / 'locked'}: rank 0 could not claim it "
                           "(its message says why)")
