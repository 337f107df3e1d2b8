"""One optimizer step's loss and gradients for every registered task, as the trainer computes them, in 1 process,
with accumulation, or on one of N gloo ranks; spawned once by tests/test_exactness.py."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from task_zoo import build_task
from torch import nn

from features.locks import OutputLock
from tasks.engine.config import OptimConfig, TrainConfig
from tasks.engine.run_directory import LOCK_FILE, claim_run_directory
from tasks.engine.trainer import Trainer

GLOBAL_BATCH = 4


def global_indices(dataset_size: int) -> list[int]:
    """The samples of the compared step: the first GLOBAL_BATCH (repeated when the tiny set is smaller)."""
    return [i % dataset_size for i in range(GLOBAL_BATCH)]


def step_loss_and_grads(name: str, overrides: list[str], parts: int, rank: int, world: int,
                        output_dir: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The step's loss and gradients: this rank's share of the global batch in `parts` micro-batches, through
    `Trainer.global_counts`, DistributedDataParallel when world > 1, and the trainer's loss scaling. The step
    runs twice (gradients zeroed in between) so that DDP meets its unfinished-reduction check."""
    task = build_task(name, overrides)
    trainer = Trainer(task, TrainConfig(output_dir=output_dir, global_batch_size=GLOBAL_BATCH,
                                        grad_accumulation=parts, num_workers=0, device="cpu"), OptimConfig())
    torch.manual_seed(0)
    model = task.build_model().train()
    for module in model.modules():  # BERT's 0.02 init gives every sample almost the same output: per-sample
        if isinstance(module, nn.Linear):  # gradients of two-way losses then cancel to fp32 rounding noise
            module.reset_parameters()
    forward = model
    if world > 1:
        forward = nn.parallel.DistributedDataParallel(model, find_unused_parameters=task.find_unused_parameters)
    dataset = task.dataset("train")
    mine = global_indices(len(dataset))[rank::world] if world > 1 else global_indices(len(dataset))
    size = len(mine) // parts
    batches = [task.collate([dataset.sample(i, 0) for i in mine[k * size:(k + 1) * size]]) for k in range(parts)]
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        counts = trainer.global_counts(batches)
        total = torch.zeros(())
        for batch in batches:  # what Trainer._optimizer_step does with each micro-batch
            output = task.training_step(forward, batch)
            loss = sum(output.loss_sums[key].float() / counts[key] for key in counts)
            (loss * world).backward()
            total = total + loss.detach()
    if world > 1:
        dist.all_reduce(total)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return total, grads


def fit_losses(overrides: list[str], output_dir: str, world: int) -> None:
    """Three steps of `Trainer.fit` on tiny pretraining, checkpoints at 2 and 3 (its metrics.jsonl is the result)."""
    task = build_task("pretrain", overrides)
    config = TrainConfig(output_dir=output_dir, global_batch_size=GLOBAL_BATCH, grad_accumulation=2 // world,
                         max_steps=3, num_workers=0, log_every=1, save_every=2, eval_every=None,
                         eval_at_end=False, device="cpu", group_by_length=True)  # length-grouped batches
    Trainer(task, config, OptimConfig(lr=1e-3, warmup=0, max_grad_norm=1.0)).fit()


def rank_worker(rank: int, world: int, port: int, cases: dict[str, tuple[str, list[str]]], frozen: list[str],
                out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))  # no endless hang
    results = {}
    for case, (name, overrides) in cases.items():
        try:
            results[case] = step_loss_and_grads(name, overrides, 1, rank, world, f"{out_dir}/scratch")
        except Exception as error:  # noqa: BLE001 (reported by the task's test, the other tasks still run)
            results[case] = f"{type(error).__name__}: {error}"
    fit_losses(frozen, f"{out_dir}/fit", world)
    claim_locked_directory(rank, Path(out_dir))
    if rank == 0:
        torch.save(results, Path(out_dir) / "ranks.pt")
    dist.destroy_process_group()


def claim_locked_directory(rank: int, out_dir: Path) -> None:
    """Rank 0 cannot claim a run directory that another holder has locked: every rank must stop (none waits in a
    collective for rank 0); each rank writes what it got to claim-<rank>.txt."""
    run_dir = out_dir / "locked"
    holder = OutputLock(run_dir / LOCK_FILE, "the test's holder")
    if rank == 0:
        holder.acquire()  # flock: a second open of the same file in this process conflicts too
    dist.barrier()
    try:
        with claim_run_directory(run_dir, resume=False, writer=rank == 0):  # as Trainer.fit calls it
            outcome = "claimed"
    except Exception as error:  # noqa: BLE001 (the test reads what each rank got)
        outcome = f"{type(error).__name__}: {error}"
    (out_dir / f"claim-{rank}.txt").write_text(outcome)
    holder.release()
