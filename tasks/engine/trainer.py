"""The training loop every task shares: AdamW, warmup + linear decay, accumulation, mixed precision, DDP, exact
resume, checkpoints, logs.

`Trainer.fit` is a short loop over named steps: take one optimizer step's micro-batches, train on them (forward under
autocast, backward, clip, step, schedule), then log, maybe evaluate, maybe checkpoint. Everything task-specific
comes from the `Task` (tasks/engine/task.py). Under `torchrun` it trains with DistributedDataParallel (NCCL on GPUs,
gloo on CPU); `train.global_batch_size` is the batch of one optimizer step whatever the world size: each rank sees
`global / (world × accumulation)` samples per micro-step.

A task may order its own micro-batches (`Task.train_batches`, a multi-task run's task schedule); the loader then
takes that schedule as its batch sampler, and the task's own state (`Task.state_dict`) travels in checkpoints.

Every loss term is a sum over its labelled items divided by the *global* count of those items (over ranks and
accumulation micro-steps), so one process, N ranks and M accumulation steps train the same model. Data order
and per-sample randomness are functions of (seed, epoch, sample index) only, and checkpoints carry the optimizer,
scheduler, scaler, every rank's RNG states and the data position, so a resumed run produces the same loss
sequence as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from features.atomic import write_text_atomic
from tasks.engine.checkpoints import (
    TrainerState,
    check_resumed_config,
    checkpoint_path,
    list_checkpoints,
    load_model_weights,
    prune_checkpoints,
    read_trainer_state,
    resolve_checkpoint,
    rng_state,
    seed_everything,
    set_rng_state,
    write_checkpoint,
)
from tasks.engine.config import OptimConfig, TrainConfig, save_config
from tasks.engine.distributed import autocast_dtype, move_to_device, setup_distributed, unwrap
from tasks.engine.optimization import build_optimizer, build_scheduler, warmup_steps_for
from tasks.engine.padding import MultipleCollate
from tasks.engine.run_directory import claim_run_directory
from tasks.engine.run_record import write_run_record
from tasks.engine.sampler import EpochKeyedDataset, ResumableDistributedSampler, length_keys
from tasks.engine.task import BatchSchedule, Task
from tasks.errors import ConfigError, DataError, TrainingDiverged

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What `fit` returns: the final state, last logged values, last evaluation, where things were written."""

    state: TrainerState
    last_log: dict[str, float]
    last_eval: dict[str, float]
    run_dir: Path
    last_checkpoint: Path | None
    best_checkpoint: Path | None
    seconds: float



@dataclass
class LogWindow:
    """Sums since the last log line, kept on the device (no host sync between log lines)."""

    device: torch.device
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)  # how many times each key was added
    steps: int = 0
    started: float = field(default_factory=time.perf_counter)

    def add(self, key: str, value: torch.Tensor) -> None:
        value = value.detach().float()
        self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.counts[key] = self.counts.get(key, 0) + 1


@dataclass
class Run:
    """What `fit` carries from one optimizer step to the next."""

    model: nn.Module  # the plain model
    forward_model: nn.Module  # what training_step calls: DDP and/or torch.compile around `model`
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    sampler: ResumableDistributedSampler | BatchSchedule
    loader: DataLoader
    state: TrainerState
    total_steps: int
    window: LogWindow
    first_bad: torch.Tensor  # the first step whose loss was not finite, -1 while none (on device)
    last_log: dict[str, float] = field(default_factory=dict)
    last_eval: dict[str, float] = field(default_factory=dict)
    last_saved: Path | None = None

    @property
    def finished(self) -> bool:
        return self.state.step >= self.total_steps

    @property
    def epoch_done(self) -> bool:
        return self.state.step_in_epoch == self.sampler.steps_per_epoch


class Trainer:
    """Trains a task's model with the task's run config: its `train` and `optim` sections (or the ones given), and
    the whole config (`run_config`, default the task's) saved beside every checkpoint."""

    def __init__(self, task: Task, train: TrainConfig | None = None, optim: OptimConfig | None = None,
                 run_config: Any = None):
        if train is None:  # the task's own run config: `Trainer(task)`
            train, optim = task.config.train, optim or task.config.optim
            run_config = task.config if run_config is None else run_config
        self.task, self.train, self.optim = task, train, optim
        self.run_config = run_config
        self.run_dir = Path(train.output_dir)
        self.dist = setup_distributed(train.device)
        self.device = self.dist.device
        self.amp_dtype = autocast_dtype(train.precision, self.device)
        divisor = self.dist.world_size * train.grad_accumulation
        if train.global_batch_size % divisor:
            raise ConfigError(
                f"train.global_batch_size ({train.global_batch_size}) must be divisible by world size × "
                f"grad_accumulation ({self.dist.world_size} × {train.grad_accumulation})"
            )
        self.micro_batch_size = train.global_batch_size // divisor
        self.run_record: dict[str, Any] | None = None  # the task's run.json, read once the data is open
        self._tensorboard = None

    # -------------------------------------------------------------------------------------------------- fit

    def fit(self, resume: str | os.PathLike | None = None, overwrite: bool = False) -> TrainResult:
        """Train to the end of the schedule (resuming from a checkpoint or run directory when given).

        The run directory is claimed first (tasks/engine/run_directory.py): a new run refuses a directory holding
        another run unless `overwrite`, and a second process on the same directory refuses.
        """
        with claim_run_directory(self.run_dir, resume is not None, overwrite, writer=self.dist.is_main):
            try:
                return self._fit(resume)
            finally:  # before a failed run's files are removed: its writer thread must not write into them
                if self._tensorboard is not None:
                    self._tensorboard.close()
                    self._tensorboard = None

    def _fit(self, resume: str | os.PathLike | None) -> TrainResult:
        started = time.perf_counter()
        run = self._prepare(resume)
        progress = tqdm(total=run.total_steps, initial=run.state.step, disable=not self.dist.is_main, unit="step",
                        dynamic_ncols=True)
        for micro_batches in self._step_batches(run):
            self._optimizer_step(run, micro_batches)
            progress.update(1)
            if run.state.step % self.train.log_every == 0 or run.finished:
                self._log_window(run)
                progress.set_postfix(loss=f"{run.last_log['loss']:.4f}",
                                     samples_s=f"{run.last_log['samples_per_s']:.1f}")
            self._end_of_step(run)
        progress.close()
        self._check_finite(run)
        best = None if run.state.best_step is None else checkpoint_path(self.run_dir, run.state.best_step)
        return TrainResult(
            state=run.state, last_log=run.last_log, last_eval=run.last_eval, run_dir=self.run_dir,
            last_checkpoint=run.last_saved, best_checkpoint=best, seconds=time.perf_counter() - started,
        )

    # ---------------------------------------------------------------------------------------------- set-up

    def _prepare(self, resume: str | os.PathLike | None) -> Run:
        """Model, data, optimizer and schedule; the saved state when resuming."""
        train = self.train
        seed_everything(train.seed)  # identical initial weights on every rank
        model = self.task.build_model().to(self.device)
        model.train()
        seed_everything(train.seed + self.dist.rank)  # per-rank dropout

        dataset = self.task.dataset("train")
        lengths = None
        if train.group_by_length:
            lengths = length_keys(dataset)
            if lengths is None:
                raise ConfigError(f"train.group_by_length: the {self.task.name} training set has neither "
                                  "region_counts nor text_lengths")
        schedule = self.task.train_batches(dataset, self.micro_batch_size, train.grad_accumulation, self.dist.rank,
                                           self.dist.world_size, train.seed)
        sampler = schedule or ResumableDistributedSampler(
            len(dataset), train.global_batch_size, self.dist.rank, self.dist.world_size, train.seed, lengths=lengths
        )
        if sampler.steps_per_epoch == 0:
            raise DataError(
                f"training set has {len(dataset)} samples, fewer than one global batch ({train.global_batch_size})"
            )
        self.run_record = self.task.run_record()
        resume_from = None if resume is None else resolve_checkpoint(resume)
        if resume_from is not None:
            check_resumed_config(resume_from, self.run_config, self.run_record)
        total_steps = train.epochs * sampler.steps_per_epoch
        if train.max_steps is not None:
            total_steps = min(total_steps, train.max_steps)

        optimizer = build_optimizer(self.task.parameter_groups(model, self.optim), self.optim, fused=self.device.type == "cuda")
        scheduler = build_scheduler(optimizer, warmup_steps_for(self.optim, total_steps), total_steps)
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        state = TrainerState()
        if resume_from is not None:
            state = self._load_checkpoint(resume_from, model, optimizer, scheduler, scaler)
        if self.dist.is_main:  # the run's files appear once the model, the data and a resumed state are ready
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if resume_from is not None:
                self._truncate_metrics_log(state.step)
            if self.run_config is not None:
                save_config(self.run_config, self.run_dir / "config.yaml")
            write_run_record(self.run_dir, self.run_record)

        wrapped = model
        if self.dist.enabled:
            wrapped = nn.parallel.DistributedDataParallel(
                model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.task.find_unused_parameters,
            )
        logger.info(
            "training %s: %d steps (%d per epoch), global batch %d = %d ranks × %d accumulation × %d, %s on %s",
            self.task.name, total_steps, sampler.steps_per_epoch, train.global_batch_size, self.dist.world_size,
            train.grad_accumulation, self.micro_batch_size, self.amp_dtype or torch.float32, self.device,
        )
        return Run(
            model=model, forward_model=torch.compile(wrapped, backend=train.compile_backend) if train.compile else wrapped,
            optimizer=optimizer, scheduler=scheduler, scaler=scaler, sampler=sampler,
            loader=self._loader(dataset, sampler, batched=schedule is not None), state=state, total_steps=total_steps,
            window=LogWindow(self.device), first_bad=torch.full((), -1, dtype=torch.int64, device=self.device),
        )

    def _loader(self, dataset, sampler: ResumableDistributedSampler | BatchSchedule, batched: bool) -> DataLoader:
        """Micro-batches from the engine's sampler, or (`batched`) as the task's own schedule lists them."""
        workers = self.train.num_workers
        order = {"batch_sampler": sampler} if batched else {
            "batch_size": self.micro_batch_size, "sampler": sampler, "drop_last": True}
        return DataLoader(
            EpochKeyedDataset(dataset),
            **order,
            collate_fn=self.task.collate if self.train.pad_to_multiple == 1 else
            MultipleCollate(self.task.collate, self.task.padded_keys, self.train.pad_to_multiple),
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
            generator=torch.Generator().manual_seed(self.train.seed),  # keeps the global RNG untouched
        )

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # ------------------------------------------------------------------------------------------- one step

    def _step_batches(self, run: Run) -> Iterator[list[Mapping[str, Any]]]:
        """The micro-batches of each optimizer step, epoch after epoch, from the run's data position."""
        accumulation = self.train.grad_accumulation
        while not run.finished:
            run.sampler.set_position(run.state.epoch, run.state.step_in_epoch)
            group: list[Mapping[str, Any]] = []
            for batch in run.loader:
                group.append(batch)
                if len(group) < accumulation:
                    continue
                yield group
                group = []
                if run.finished or run.state.step_in_epoch == 0:  # the consumer closed an epoch
                    break

    def global_counts(self, micro_batches: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Labelled items per loss term over this step's micro-batches on every rank (one small all-reduce)."""
        per_batch = [self.task.label_counts(batch) for batch in micro_batches]
        keys = sorted(per_batch[0])
        counts = torch.tensor([[c[k] for k in keys] for c in per_batch], dtype=torch.float64).sum(0)
        counts = counts.to(self.device)
        if self.dist.enabled:
            dist.all_reduce(counts)
        return dict(zip(keys, counts.clamp(min=1).float(), strict=True))

    def _optimizer_step(self, run: Run, micro_batches: list[Mapping[str, Any]]) -> None:
        """Forward and backward over the micro-batches, then clip, step and schedule."""
        counts = self.global_counts(micro_batches)
        step_loss = torch.zeros((), device=self.device)
        for index, batch in enumerate(micro_batches):
            batch = move_to_device(batch, self.device)
            last = index == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or not self.dist.enabled else run.forward_model.no_sync()
            with sync:
                with self._autocast():
                    output = self.task.training_step(run.forward_model, batch)
                if output.loss_sums.keys() != counts.keys():
                    raise ValueError(f"task {self.task.name}: training_step gave loss terms "
                                     f"{sorted(output.loss_sums)}, label_counts {sorted(counts)}")
                # this micro-batch's share of the global mean; DDP averages gradients over ranks, hence × world
                loss = sum(output.loss_sums[key].float() / counts[key] for key in counts)
                run.scaler.scale(loss * self.dist.world_size).backward()
            step_loss = step_loss + loss.detach()
            for key, value in output.metrics.items():
                run.window.add(key, value)

        if self.optim.max_grad_norm is not None:
            run.scaler.unscale_(run.optimizer)
            grad_norm = nn.utils.clip_grad_norm_(run.model.parameters(), self.optim.max_grad_norm)
            run.window.add("grad_norm", grad_norm)
        scale = run.scaler.get_scale() if run.scaler.is_enabled() else None
        run.scaler.step(run.optimizer)
        run.scaler.update()
        if scale is None or run.scaler.get_scale() >= scale:  # fp16: a step with inf/NaN gradients is skipped
            run.scheduler.step()  # and lowers the scale; the schedule then waits for a real update
        run.optimizer.zero_grad(set_to_none=True)

        run.state.step += 1
        run.state.step_in_epoch += 1
        run.window.add("loss", step_loss)
        run.window.steps += 1
        bad = ~torch.isfinite(step_loss) & (run.first_bad < 0)
        run.first_bad = torch.where(bad, torch.full_like(run.first_bad, run.state.step), run.first_bad)

    # ------------------------------------------------------------------------------------ log, eval, save

    def _log_window(self, run: Run) -> None:
        """One log line: the step loss summed over ranks, metrics averaged over micro-steps and ranks."""
        window = run.window
        keys = sorted(window.sums)
        # loss and grad_norm come once per step, metrics once per micro-step of the tasks that report them
        values = torch.stack([window.sums[k] / window.counts[k] for k in keys])
        if self.dist.enabled:
            dist.all_reduce(values)
            # the loss shares add up over ranks; every other value is a per-rank mean
            values = values / torch.tensor([1.0 if k == "loss" else self.dist.world_size for k in keys],
                                           device=values.device)
        self._check_finite(run)
        elapsed = time.perf_counter() - window.started
        run.last_log = dict(zip(keys, values.tolist(), strict=True))
        run.last_log.update(lr=run.scheduler.get_last_lr()[0],
                            samples_per_s=window.steps * self.train.global_batch_size / max(elapsed, 1e-9))
        self._log({"kind": "train", "step": run.state.step, "epoch": run.state.epoch, **run.last_log})
        run.window = LogWindow(self.device)

    def _end_of_step(self, run: Run) -> None:
        """Close the epoch, evaluate and checkpoint when due."""
        train, state = self.train, run.state
        epoch_done = run.epoch_done
        if epoch_done:
            state.epoch += 1
            state.step_in_epoch = 0
        due_eval = (train.eval_every is not None and state.step % train.eval_every == 0) or (
            train.eval_every is None and epoch_done) or (run.finished and train.eval_at_end)
        due_save = (train.save_every is not None and state.step % train.save_every == 0) or (
            train.save_every is None and epoch_done) or run.finished
        paused = time.perf_counter()  # evaluation and saving do not count against throughput
        if due_eval:
            run.last_eval = self.evaluate(run.model, state)
            value = run.last_eval.get(self.task.main_metric)
            if value is not None and math.isfinite(value) and self._is_better(value, state.best_value):
                state.best_value, state.best_step = float(value), state.step
                due_save = True
        if due_save:
            self._check_finite(run)
            run.last_saved = self.save_checkpoint(run)
        run.window.started += time.perf_counter() - paused

    def _check_finite(self, run: Run) -> None:
        bad = run.first_bad.clone()
        if self.dist.enabled:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if int(bad) >= 0:
            kept = run.last_saved or (list_checkpoints(self.run_dir) or [None])[-1]
            raise TrainingDiverged(
                f"the loss became NaN or infinite at step {int(bad)}; training stopped"
                + (f", the last good checkpoint is {kept}" if kept else " (no checkpoint was written yet)")
            )

    def _log(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._tensorboard is None:
            from torch.utils.tensorboard import SummaryWriter  # tensorboard is slow to import

            self._tensorboard = SummaryWriter(str(self.run_dir / "tensorboard"))
        prefix = "val/" if record.get("kind") == "eval" else "train/"
        for key, value in record.items():
            if key not in ("step", "epoch", "kind") and isinstance(value, (int, float)):
                self._tensorboard.add_scalar(prefix + key, value, record["step"])

    def _truncate_metrics_log(self, step: int) -> None:
        """On resume, drop log lines written after the checkpoint (they will be written again)."""
        path = self.run_dir / "metrics.jsonl"
        if not self.dist.is_main or not path.is_file():
            return
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        write_text_atomic(path, "".join(line + "\n" for line in kept))

    # ---------------------------------------------------------------------------------------------- evaluation

    def evaluate(self, model: nn.Module, state: TrainerState) -> dict[str, float]:
        """The task's validation metrics (rank 0; RNG untouched so evaluation never changes training)."""
        metrics: dict[str, float] = {}
        if self.dist.is_main:
            raw = unwrap(model)
            raw.eval()
            devices = [self.device.index] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices), torch.no_grad(), self._autocast():
                metrics = self.task.evaluate(raw, "val") or {}
            raw.train()
            if metrics:
                self._log({"kind": "eval", "step": state.step, "epoch": state.epoch, **metrics})
                logger.info("step %d eval: %s", state.step, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        if self.dist.enabled:
            box = [metrics]
            dist.broadcast_object_list(box, src=0)
            metrics = box[0]
        self.task.on_evaluation(metrics)
        return metrics

    def _is_better(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        return value > best if self.task.higher_is_better else value < best

    # ------------------------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self, run: Run) -> Path:
        """`checkpoints/step-N` (written atomically by rank 0), then prune to the last K and the best."""
        rng = rng_state()
        every_rank: list[Any] = [rng]
        if self.dist.enabled:
            every_rank = [None] * self.dist.world_size
            dist.all_gather_object(every_rank, rng)
        final = checkpoint_path(self.run_dir, run.state.step)
        if self.dist.is_main:
            trainer_state = {
                "optimizer": run.optimizer.state_dict(),
                "scheduler": run.scheduler.state_dict(),
                "scaler": run.scaler.state_dict(),
                "rng": every_rank,
                "world_size": self.dist.world_size,
                "task": self.task.state_dict(),
            }
            final = write_checkpoint(self.run_dir, run.state, run.model, trainer_state, self.run_config,
                                     self.run_record)
            prune_checkpoints(self.run_dir, self.train.keep_last, run.state.best_step)
            logger.info("saved checkpoint %s", final)
        if self.dist.enabled:
            dist.barrier()
        return final

    def _load_checkpoint(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                         scheduler: torch.optim.lr_scheduler.LRScheduler,
                         scaler: torch.amp.GradScaler) -> TrainerState:
        """Restore weights, optimizer, scheduler, scaler, this rank's RNG and the data position."""
        saved = read_trainer_state(path)
        load_model_weights(model, path)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        self.task.load_state_dict(saved.get("task", {}))
        if saved["world_size"] == self.dist.world_size:
            set_rng_state(saved["rng"][self.dist.rank])
        else:
            logger.warning("checkpoint was written by %d ranks, resuming on %d: dropout RNG is reseeded",
                           saved["world_size"], self.dist.world_size)
            seed_everything(self.train.seed + 7919 * saved["state"]["step"] + self.dist.rank)
        logger.info("resumed from %s at step %d", path, saved["state"]["step"])
        return TrainerState(**saved["state"])


def summary_lines(result: TrainResult, task: Task) -> list[str]:
    """A one-screen summary of a finished run, for the command line."""
    state = result.state
    lines = [
        f"run directory       {result.run_dir}",
        f"steps               {state.step} ({state.epoch} full epochs) in {result.seconds / 60:.1f} min",
    ]
    if result.last_log:
        lines.append(f"last loss           {result.last_log['loss']:.4f}  (lr {result.last_log['lr']:.3g}, "
                     f"{result.last_log['samples_per_s']:.1f} samples/s)")
    for key, value in result.last_eval.items():
        lines.append(f"val {key:<20} {value:.4f}")
    if state.best_step is not None:
        lines.append(f"best {task.main_metric} {state.best_value:.4f} at step {state.best_step}: {result.best_checkpoint}")
    if result.last_checkpoint is not None:
        lines.append(f"last checkpoint     {result.last_checkpoint}")
    lines.append(f"metrics log         {result.run_dir / 'metrics.jsonl'}")
    return lines

