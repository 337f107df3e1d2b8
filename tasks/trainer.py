"""The training engine every task shares: AdamW, warmup + linear decay, accumulation, mixed precision, DDP,
exact resume, checkpoints, logs.

The loop (`Trainer.fit`) is get batch → forward under autocast → backward → clip → step → schedule → log →
maybe evaluate → maybe checkpoint; everything task-specific comes from the `Task`. Under `torchrun` it trains
with DistributedDataParallel (NCCL on GPUs, gloo on CPU); `train.global_batch_size` is the batch of one
optimizer step whatever the world size: each rank sees `global / (world × accumulation)` samples per micro-step.

Data order and per-sample randomness are functions of (seed, epoch, sample index) only, and checkpoints carry
the optimizer, scheduler, scaler, every rank's RNG states and the data position, so a resumed run produces the
same loss sequence as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from tasks.config import OptimConfig, TrainConfig, save_config
from tasks.errors import ConfigError, DataError, ResumeError, TrainingDiverged
from tasks.task import Task

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
CHECKPOINT_PREFIX = "step-"


# ------------------------------------------------------------------------------------------------------ devices


@dataclass
class Distributed:
    """This process's place in the run: rank, world size and device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str = "auto") -> Distributed:
    """Read torchrun's environment, join the process group (NCCL on GPUs, gloo on CPU), pick the device."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("train.device is cuda but no CUDA device is available")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    target = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=target if use_cuda else None)
    return Distributed(rank=rank, world_size=world_size, local_rank=local_rank, device=target)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision setting: None means plain fp32."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


# --------------------------------------------------------------------------------------------------------- data


class ResumableDistributedSampler(Sampler):
    """Shuffled, sharded, resumable: yields `(epoch, index)` keys for this rank, starting at a given step.

    The epoch's order is a permutation seeded by (seed, epoch), cut to whole global batches; rank r takes every
    world-th entry, so optimizer step s covers exactly entries [s·G, (s+1)·G) of the permutation on any world
    size. The epoch travels with each index so datasets can seed their randomness per (epoch, index) inside
    DataLoader workers (see `EpochKeyedDataset`).

    With `lengths` (one text length per sample), each window of `group_window` global batches of the permutation
    is sorted by length before it is cut into batches, and the epoch's batches are then shuffled: batches hold
    texts of similar length, so a collate that pads to the batch's longest text pads little.
    """

    def __init__(self, size: int, global_batch_size: int, rank: int, world_size: int, seed: int, shuffle=True,
                 lengths: np.ndarray | None = None, group_window: int = 50):
        if lengths is not None and len(lengths) != size:
            raise ValueError(f"lengths has {len(lengths)} entries for a dataset of {size}")
        self.size, self.global_batch_size = size, global_batch_size
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.lengths, self.group_window = lengths, group_window
        self.steps_per_epoch = size // global_batch_size
        self.epoch, self.start_step = 0, 0

    def set_position(self, epoch: int, start_step: int) -> None:
        self.epoch, self.start_step = epoch, start_step

    def epoch_order(self) -> np.ndarray:
        """This epoch's sample order over all ranks: `steps_per_epoch` global batches, one after another."""
        order = (
            np.random.default_rng([self.seed, self.epoch]).permutation(self.size)
            if self.shuffle
            else np.arange(self.size)
        )
        used = order[: self.steps_per_epoch * self.global_batch_size]
        if self.lengths is None:
            return used
        window = self.group_window * self.global_batch_size
        # stable sort inside each window, longest first; then shuffle whole batches
        grouped = np.concatenate([
            chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            for chunk in np.split(used, range(window, len(used), window))
        ])
        batches = grouped.reshape(self.steps_per_epoch, self.global_batch_size)
        return batches[np.random.default_rng([self.seed, self.epoch, 1]).permutation(len(batches))].reshape(-1)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        mine = self.epoch_order()[self.rank :: self.world_size]
        start = self.start_step * (self.global_batch_size // self.world_size)
        for index in mine[start:]:
            yield (self.epoch, int(index))

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * (self.global_batch_size // self.world_size)


class EpochKeyedDataset(Dataset):
    """Adapts a task dataset to `(epoch, index)` keys: datasets with `sample(index, epoch)` get the epoch."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self.sample = getattr(dataset, "sample", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        return self.sample(index, epoch) if self.sample is not None else self.dataset[index]


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Tensors (nested in dicts/lists) to the device, non-blocking from pinned memory."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch


# ---------------------------------------------------------------------------------------------------- optimizer


def build_optimizer(model: nn.Module, config: OptimConfig, fused: bool = False) -> torch.optim.AdamW:
    """AdamW with weight decay on every weight except biases and LayerNorm parameters.

    Parameters are grouped by (lr, decay). With `config.head_lr` set, the model's pooled-output heads (the top-level
    modules named in its `pooled_heads`, the reference's "vil_" heads, §8.3) train at that lr; with
    `config.text_lr` set, the BERT-initialised text stream (`model.text_stream_parameters()`) trains at that one
    (the reference's intended 0.1x BERT lr, §5.6). Groups come out in a fixed order: base, heads, text.
    """
    no_decay = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    heads = set(getattr(model, "pooled_heads", ())) if config.head_lr is not None else set()
    text = {id(p) for p in model.text_stream_parameters()} if config.text_lr is not None else set()
    lrs = {"base": config.lr, "head": config.head_lr, "text": config.text_lr}
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {(k, d): [] for k in lrs for d in (True, False)}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        kind = "head" if name.split(".", 1)[0] in heads else "text" if id(param) in text else "base"
        buckets[(kind, not (name.endswith("bias") or id(param) in no_decay))].append(param)
    groups = [
        {"params": params, "weight_decay": config.weight_decay if decays else 0.0, "lr": lrs[kind]}
        for (kind, decays), params in buckets.items()
        if kind == "base" or params
    ]
    return torch.optim.AdamW(
        groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps, **({"fused": True} if fused else {})
    )


def warmup_steps_for(config: OptimConfig, total_steps: int) -> int:
    return int(config.warmup) if config.warmup >= 1 else int(round(config.warmup * total_steps))


def build_scheduler(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over `warmup` steps to the base lr, then linear decay to 0 at `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ------------------------------------------------------------------------------------------------------ RNG state


def rng_state() -> dict[str, Any]:
    """Every RNG this process uses, as tensors and numbers (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_gauss": float(np_state[4]),
        "python_version": int(py_version),
        "python_internal": torch.tensor(py_internal, dtype=torch.int64),
        "python_gauss": py_gauss,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(
        ("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], state["numpy_has_gauss"],
         state["numpy_gauss"])
    )
    random.setstate((state["python_version"], tuple(state["python_internal"].tolist()), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------------- checkpoints


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory, or the latest checkpoint of a run directory."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise ResumeError(f"{path}: no checkpoint to resume from (no {STATE_FILE} here or in checkpoints/)")
    return found[-1]


def save_model_weights(model: nn.Module, directory: Path) -> None:
    """`save_pretrained` for Hugging Face models (config.json + model.safetensors), safetensors otherwise."""
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(directory)
    else:
        from safetensors.torch import save_model

        save_model(model, str(directory / "model.safetensors"))


def load_model_weights(model: nn.Module, directory: Path) -> None:
    """Load `model.safetensors` into `model`; keys missing only because their weight is tied are fine."""
    from safetensors.torch import load_file

    file = directory / "model.safetensors"
    if not file.is_file():
        raise ResumeError(f"{directory}: no model.safetensors")
    weights = load_file(str(file), device="cpu")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    loaded = {id(t) for name, t in model.state_dict(keep_vars=True).items() if name in weights}
    params = model.state_dict(keep_vars=True)
    untied = [k for k in missing if id(params[k]) not in loaded]
    if untied or unexpected:
        raise ResumeError(
            f"{file}: weights do not match the model (missing {untied[:5]}, unexpected {list(unexpected)[:5]})"
        )


# ------------------------------------------------------------------------------------------------------ trainer


@dataclass
class TrainerState:
    """Where the run is: optimizer steps done, the data position, the best evaluation so far."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    best_value: float | None = None
    best_step: int | None = None


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


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under torch.compile and DDP wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


class Trainer:
    """Trains a task's model. `run_config` (the whole merged config) is saved beside every checkpoint."""

    def __init__(self, task: Task, train: TrainConfig, optim: OptimConfig, run_config: Any = None):
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
        self._tensorboard = None

    # ---------------------------------------------------------------------------------------------- set-up

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _loader(self, dataset: Dataset, sampler: ResumableDistributedSampler) -> DataLoader:
        workers = self.train.num_workers
        return DataLoader(
            EpochKeyedDataset(dataset),
            batch_size=self.micro_batch_size,
            sampler=sampler,
            collate_fn=self.task.collate,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
            drop_last=True,
            generator=torch.Generator().manual_seed(self.train.seed),  # keeps the global RNG untouched
        )

    def _log(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._tensorboard is None:
            from torch.utils.tensorboard import SummaryWriter

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
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)

    # ------------------------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler,
                        state: TrainerState) -> Path:
        """Write `checkpoints/step-N` atomically (temp dir, then rename) and prune to the last K and the best."""
        rng = rng_state()
        if self.dist.enabled:
            every_rank: list[Any] = [None] * self.dist.world_size
            dist.all_gather_object(every_rank, rng)
        else:
            every_rank = [rng]
        root = self.run_dir / "checkpoints"
        final = root / f"{CHECKPOINT_PREFIX}{state.step:08d}"
        if self.dist.is_main:
            root.mkdir(parents=True, exist_ok=True)
            tmp = root / f".tmp-{final.name}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            save_model_weights(unwrap(model), tmp)
            if self.run_config is not None:
                save_config(self.run_config, tmp / "run_config.yaml")
            torch.save(
                {
                    "state": vars(state).copy(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "rng": every_rank,
                    "world_size": self.dist.world_size,
                },
                tmp / STATE_FILE,
            )
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune(state)
            logger.info("saved checkpoint %s", final)
        if self.dist.enabled:
            dist.barrier()
        return final

    def _prune(self, state: TrainerState) -> None:
        found = list_checkpoints(self.run_dir)
        keep = set(found[-self.train.keep_last :])
        if state.best_step is not None:
            keep |= {p for p in found if int(p.name[len(CHECKPOINT_PREFIX) :]) == state.best_step}
        for path in found:
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True)

    def load_checkpoint(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler) -> TrainerState:
        """Restore weights, optimizer, scheduler, scaler, this rank's RNG and the data position."""
        try:
            saved = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
        except Exception as error:  # a truncated or foreign file
            raise ResumeError(f"{path / STATE_FILE}: cannot read trainer state ({error})") from error
        load_model_weights(unwrap(model), path)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        if saved["world_size"] == self.dist.world_size:
            set_rng_state(saved["rng"][self.dist.rank])
        else:
            logger.warning("checkpoint was written by %d ranks, resuming on %d: dropout RNG is reseeded",
                           saved["world_size"], self.dist.world_size)
            seed_everything(self.train.seed + 7919 * saved["state"]["step"] + self.dist.rank)
        logger.info("resumed from %s at step %d", path, saved["state"]["step"])
        return TrainerState(**saved["state"])

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
        return metrics

    def _is_better(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        return value > best if self.task.higher_is_better else value < best

    # -------------------------------------------------------------------------------------------------- fit

    def fit(self, resume: str | os.PathLike | None = None) -> TrainResult:
        """Train to the end of the schedule (resuming from a checkpoint or run directory when given)."""
        train, started = self.train, time.perf_counter()
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if self.run_config is not None:
                save_config(self.run_config, self.run_dir / "config.yaml")

        seed_everything(train.seed)  # identical initial weights on every rank
        model = self.task.build_model().to(self.device)
        model.train()
        seed_everything(train.seed + self.dist.rank)  # per-rank dropout

        dataset = self.task.dataset("train")
        lengths = None
        if train.group_by_length:
            lengths = getattr(dataset, "text_lengths", None)
            if lengths is None:
                raise ConfigError(f"train.group_by_length: the {self.task.name} training set has no text_lengths")
        sampler = ResumableDistributedSampler(
            len(dataset), train.global_batch_size, self.dist.rank, self.dist.world_size, train.seed, lengths=lengths
        )
        if sampler.steps_per_epoch == 0:
            raise DataError(
                f"training set has {len(dataset)} samples, fewer than one global batch ({train.global_batch_size})"
            )
        total_steps = train.epochs * sampler.steps_per_epoch
        if train.max_steps is not None:
            total_steps = min(total_steps, train.max_steps)

        optimizer = build_optimizer(model, self.optim, fused=self.device.type == "cuda")
        scheduler = build_scheduler(optimizer, warmup_steps_for(self.optim, total_steps), total_steps)
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        state = TrainerState()
        if resume is not None:
            state = self.load_checkpoint(resolve_checkpoint(resume), model, optimizer, scheduler, scaler)
            self._truncate_metrics_log(state.step)

        ddp = (
            nn.parallel.DistributedDataParallel(
                model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.task.find_unused_parameters,
            )
            if self.dist.enabled
            else model
        )
        forward_model = torch.compile(ddp) if train.compile else ddp
        loader = self._loader(dataset, sampler)
        logger.info(
            "training %s: %d steps (%d per epoch), global batch %d = %d ranks × %d accumulation × %d, %s on %s",
            self.task.name, total_steps, sampler.steps_per_epoch, train.global_batch_size, self.dist.world_size,
            train.grad_accumulation, self.micro_batch_size, self.amp_dtype or torch.float32, self.device,
        )

        sums: dict[str, torch.Tensor] = {}
        step_loss = grad_norm_sum = torch.zeros((), device=self.device)
        micro_steps_logged, steps_logged = 0, 0
        first_bad = torch.full((), -1, dtype=torch.int64, device=self.device)
        last_log: dict[str, float] = {}
        last_eval: dict[str, float] = {}
        last_saved: Path | None = None
        window_start = time.perf_counter()
        progress = tqdm(total=total_steps, initial=state.step, disable=not self.dist.is_main, unit="step",
                        dynamic_ncols=True)

        def check_finite() -> None:
            bad = first_bad.clone()
            if self.dist.enabled:
                dist.all_reduce(bad, op=dist.ReduceOp.MAX)
            if int(bad) >= 0:
                kept = last_saved or (list_checkpoints(self.run_dir) or [None])[-1]
                raise TrainingDiverged(
                    f"the loss became NaN or infinite at step {int(bad)}; training stopped"
                    + (f", the last good checkpoint is {kept}" if kept else " (no checkpoint was written yet)")
                )

        while state.step < total_steps:
            sampler.set_position(state.epoch, state.step_in_epoch)
            for micro, batch in enumerate(loader):
                batch = move_to_device(batch, self.device)
                last_micro = (micro + 1) % train.grad_accumulation == 0
                sync = contextlib.nullcontext() if last_micro or not self.dist.enabled else ddp.no_sync()
                with sync:
                    with self._autocast():
                        output = self.task.training_step(forward_model, batch)
                    scaler.scale(output.loss / train.grad_accumulation).backward()
                for key, value in {"loss": output.loss, **output.metrics}.items():
                    value = value.detach().float()
                    sums[key] = sums[key] + value if key in sums else value
                step_loss = step_loss + output.loss.detach().float()
                micro_steps_logged += 1
                if not last_micro:
                    continue

                if self.optim.max_grad_norm is not None:
                    scaler.unscale_(optimizer)
                    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), self.optim.max_grad_norm)
                    grad_norm_sum = grad_norm_sum + grad_norm.detach().float()
                scale = scaler.get_scale() if scaler.is_enabled() else None
                scaler.step(optimizer)
                scaler.update()
                if scale is None or scaler.get_scale() >= scale:  # fp16: a step with inf/NaN gradients is
                    scheduler.step()  # skipped and lowers the scale; the schedule then waits for a real update
                optimizer.zero_grad(set_to_none=True)
                bad_now = ~torch.isfinite(step_loss)
                step_loss = torch.zeros((), device=self.device)
                first_bad = torch.where(bad_now & (first_bad < 0), torch.full_like(first_bad, state.step + 1),
                                        first_bad)
                state.step += 1
                state.step_in_epoch += 1
                steps_logged += 1
                progress.update(1)
                epoch_done = state.step_in_epoch == sampler.steps_per_epoch
                finished = state.step >= total_steps

                if state.step % train.log_every == 0 or finished:
                    keys = sorted(sums)
                    values = torch.stack([sums[k] for k in keys]) / micro_steps_logged
                    if self.optim.max_grad_norm is not None:
                        keys.append("grad_norm")
                        values = torch.cat([values, (grad_norm_sum / steps_logged).view(1)])
                    if self.dist.enabled:
                        dist.all_reduce(values)
                        values /= self.dist.world_size
                    check_finite()
                    elapsed = time.perf_counter() - window_start
                    last_log = dict(zip(keys, values.tolist(), strict=True))
                    last_log.update(lr=scheduler.get_last_lr()[0],
                                    samples_per_s=steps_logged * train.global_batch_size / max(elapsed, 1e-9))
                    self._log({"kind": "train", "step": state.step, "epoch": state.epoch, **last_log})
                    progress.set_postfix(loss=f"{last_log['loss']:.4f}", samples_s=f"{last_log['samples_per_s']:.1f}")
                    sums, micro_steps_logged, steps_logged = {}, 0, 0
                    grad_norm_sum = torch.zeros((), device=self.device)
                    window_start = time.perf_counter()

                if epoch_done:
                    state.epoch += 1
                    state.step_in_epoch = 0
                due_eval = (train.eval_every is not None and state.step % train.eval_every == 0) or (
                    train.eval_every is None and epoch_done) or (finished and train.eval_at_end)
                due_save = (train.save_every is not None and state.step % train.save_every == 0) or (
                    train.save_every is None and epoch_done) or finished
                paused = time.perf_counter()  # evaluation and saving do not count against throughput
                if due_eval:
                    last_eval = self.evaluate(model, state)
                    value = last_eval.get(self.task.main_metric)
                    if value is not None and math.isfinite(value) and self._is_better(value, state.best_value):
                        state.best_value, state.best_step = float(value), state.step
                        due_save = True
                if due_save:
                    check_finite()
                    last_saved = self.save_checkpoint(model, optimizer, scheduler, scaler, state)
                window_start += time.perf_counter() - paused
                if finished or epoch_done:
                    break
        progress.close()
        check_finite()
        if self._tensorboard is not None:
            self._tensorboard.close()
        best = None
        if state.best_step is not None:
            best = self.run_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{state.best_step:08d}"
        return TrainResult(
            state=state, last_log=last_log, last_eval=last_eval, run_dir=self.run_dir,
            last_checkpoint=last_saved, best_checkpoint=best, seconds=time.perf_counter() - started,
        )


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

