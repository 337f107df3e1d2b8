"""Multi-task training, 12-in-1 style: one `ViLBertForVLTasks` trained on several registered tasks at once.

A `MultiTask` composes member tasks (each a registered fine-tuning task with its own config: data, batch size,
text length, region count, lr). The model is one task model: the shared trunk, every member's head and, with
`model.overrides.task_specific_tokens`, one 12-in-1 task token per member (tasks/finetuning.py TASK_TOKEN_IDS).
The trainer stays the one engine: an optimizer step is one step of one member (forward, backward, optimizer step,
as 12-in-1's train_tasks.py does), and the member of each step comes from the task schedule below, which the
trainer asks for through `Task.train_batches`. Memory is bounded by the largest member's batch, not the sum.

The schedule (`multitask.sampling`):
- `round-robin` (12-in-1): every iteration visits every member once. Iterations per epoch are, as the
  reference defines them, the largest over members of `member epochs × member batches per epoch / epochs`.
  The reference reads the member epochs from a stale loop variable (the last task's `num_epoch`, for every
  task); here each member's own `train.epochs` is used.
- `proportional` / `temperature`: the same number of steps per epoch, given to members in proportion to their
  training-set size n (or n^(1/T)), by largest remainder, in an order shuffled per (seed, epoch).
A member reads its own training set as one endless stream of its own epochs (permutation per (seed, member,
member epoch), cut into global batches, rank r taking every world-th entry as the engine's sampler does), so a
small member loops while a large one is still in its first pass.

Dynamic stop-and-go (`multitask.stop_and_go`, 12-in-1's `MultiTaskStopOnPlateau`): after each evaluation every
member's controller sees its main validation metric; a stopped member trains only every `train_iter_gap`-th
iteration (its every gap-th turn with the weighted samplers) until its score falls more than the continue
threshold below its best. A stop applies from the next epoch on: an epoch's schedule is fixed when it starts, so
prefetching DataLoader workers and resumed runs see the same steps. `train.epochs × full steps per epoch` stays
the run's step budget (and its lr schedule); stopped members make epochs shorter, so more of them run. The
reference instead skips those steps (fewer optimizer steps in all).

Losses: each member's loss sums are scaled by its loss scale (12-in-1: member lr / smallest member lr) and
normalised by the engine's global label counts, keyed `<member>/<term>`, so N ranks train as one process.
Evaluation: every member on its own validation split with its own metric, logged as `<member>/<metric>` (one
log line per member); `score`, the best-checkpoint metric, is the unweighted mean of the members' main metrics,
each a percentage (the reference's score / data size, × 100; a lower-is-better metric enters negated).

`multitask.clean_train_sets` (`vilbert finetune --clean-train-sets`): remove from every member's training set
the items reading an image that appears in any member's validation split or listed `test_splits` (12-in-1's fix
for cross-dataset test leakage), logging how many items each member lost.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from tasks.engine.config import OptimConfig, TrainConfig, to_dict
from tasks.engine.run_record import TASK_ARCHITECTURE
from tasks.engine.task import StepOutput, Task, TaskDataset
from tasks.errors import ConfigError, DataError
from tasks.finetuning import FinetuneTask, ModelConfig, model_parameter_groups
from tasks.registry import build_task, task_class

logger = logging.getLogger(__name__)

SAMPLING = ("round-robin", "proportional", "temperature")

# The model config fields that shape a head module.
HEAD_CONFIG = {"answer_head": ("num_labels", "id2label", "label2id"),
               "gqa_answer_head": ("gqa_num_labels", "gqa_answers")}


# -------------------------------------------------------------------------------------------------- config


@dataclass
class MemberConfig:
    """One member task of a multi-task run."""

    name: str = ""  # a registered task
    label: str | None = None  # its key in logs and metrics (default: name); tells two retrieval members apart
    config: str | None = None  # its YAML (default tasks/configs/<name>.yaml); its model section is replaced
    overrides: list[str] = field(default_factory=list)  # key=value on its config
    loss_scale: float | None = None  # null: its optim.lr / the smallest member optim.lr (12-in-1)
    test_splits: list[str] = field(default_factory=list)  # splits whose images clean_train_sets also removes
    resolved: dict[str, Any] = field(default_factory=dict)  # filled at load: its whole config (self-contained runs)


@dataclass
class MultiTaskSettings:
    sampling: str = "round-robin"  # round-robin | proportional | temperature
    temperature: float = 2.0  # temperature sampling: weights n^(1/T)
    stop_and_go: bool = False  # 12-in-1's dynamic stop-and-go on each member's main validation metric
    train_iter_gap: int = 4  # a stopped member trains every gap-th iteration
    patience: int = 1
    threshold: float = 0.001  # relative improvement that counts as better
    continue_threshold: float = 0.005  # relative drop below the best that restarts a stopped member
    cooldown: int = 1
    clean_train_sets: bool = False  # drop training items whose images are in any member's val/test splits
    member_overrides: list[str] = field(default_factory=list)  # key=value on every member's config, after its own

    def validate(self) -> None:
        if self.sampling not in SAMPLING:
            raise ConfigError(f"multitask.sampling must be one of {', '.join(SAMPLING)}, got {self.sampling!r}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError(f"multitask.temperature must be a positive finite number, got {self.temperature}")
        if self.train_iter_gap < 1:
            raise ConfigError(f"multitask.train_iter_gap must be >= 1, got {self.train_iter_gap}")


@dataclass
class MultiTaskConfig:
    """A multi-task run (tasks/configs/multitask_12in1.yaml). `train.global_batch_size` is unused: each member
    trains at its own batch size; `optim` (with `head_lr` for the reference's vil_* heads) is the run's."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    multitask: MultiTaskSettings = field(default_factory=MultiTaskSettings)
    tasks: list[MemberConfig] = field(default_factory=list)

    def validate(self) -> None:
        if not self.tasks:
            raise ConfigError("tasks: a multi-task run needs at least one member task")
        labels = [member.label or member.name for member in self.tasks]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"tasks: member labels must differ (set `label` on repeated tasks), got {labels}")
        for member in self.tasks:
            if not issubclass(task_class(member.name), FinetuneTask):  # pretraining, another multi-task run
                raise ConfigError(f"tasks: {member.name!r} cannot be a member of a multi-task run")
            if member.loss_scale is not None and not (math.isfinite(member.loss_scale) and member.loss_scale > 0):
                raise ConfigError(f"tasks: {member.name} loss_scale must be a positive finite number, got "
                                  f"{member.loss_scale}")


# ---------------------------------------------------------------------------------------------- stop-and-go


@dataclass
class MultiTaskStopOnPlateau:
    """12-in-1's stop-and-go controller for one task (higher scores are better).

    `step(score)` after each evaluation: a score above best × (1 + threshold) is an improvement; more than
    `patience` evaluations without one stop the task (then `cooldown` evaluations count no bad ones); a stopped
    task restarts when its score falls below best × (1 − continue_threshold).
    """

    patience: int = 1
    threshold: float = 0.001
    continue_threshold: float = 0.005
    cooldown: int = 1
    best: float | None = None
    bad_evaluations: int = 0
    cooldown_counter: int = 0
    in_stop: bool = False

    def step(self, score: float) -> None:
        if self.best is None or score > self.best * (1 + self.threshold):
            self.best, self.bad_evaluations = score, 0
        else:
            self.bad_evaluations += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.bad_evaluations = 0
        if self.bad_evaluations > self.patience:
            self.in_stop, self.cooldown_counter, self.bad_evaluations = True, self.cooldown, 0
        elif self.in_stop and score < self.best * (1 - self.continue_threshold):
            self.in_stop, self.cooldown_counter, self.bad_evaluations = False, self.cooldown, 0

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


# ------------------------------------------------------------------------------------------------- schedule


def slot_counts(weights: list[float], total: int) -> list[int]:
    """`total` slots shared in proportion to `weights` by largest remainder (ties to the earlier member)."""
    shares = np.asarray(weights, dtype=np.float64) / float(np.sum(weights)) * total
    counts = np.floor(shares).astype(int)
    for index in np.argsort(-(shares - counts), kind="stable")[: total - int(counts.sum())]:
        counts[index] += 1
    return counts.tolist()


class MultiTaskSchedule:
    """Which member each optimizer step trains and on which samples: a `BatchSchedule` for the trainer.

    The state (`state_dict`) is the epoch it stands in, how many batches each member had consumed when that epoch
    began and which members were stopped then; with the seed, it fixes every key the schedule yields.
    """

    def __init__(self, sizes: list[int], batch_sizes: list[int], iterations: int, sampling: str, weights: list[float],
                 gap: int, grad_accumulation: int, rank: int, world_size: int, seed: int,
                 stopped: Callable[[], list[bool]]):
        self.sizes, self.batch_sizes, self.iterations = sizes, batch_sizes, iterations
        self.sampling, self.weights, self.gap = sampling, weights, gap
        self.accumulation, self.rank, self.world_size, self.seed = grad_accumulation, rank, world_size, seed
        self.steps = [n // b for n, b in zip(sizes, batch_sizes, strict=True)]  # each member's batches per epoch
        self.stopped = stopped
        self.epoch, self.consumed, self.snapshot = 0, [0] * len(sizes), list(stopped())
        self.start_step = 0
        self._tasks: list[int] | None = None

    def epoch_tasks(self) -> list[int]:
        """The member of every optimizer step of the current epoch."""
        if self._tasks is None:
            count = len(self.sizes)
            if self.sampling == "round-robin":
                first = self.epoch * self.iterations
                self._tasks = [t for i in range(first, first + self.iterations) for t in range(count)
                               if not self.snapshot[t] or i % self.gap == 0]
            else:
                slots = np.repeat(np.arange(count), slot_counts(self.weights, self.iterations * count))
                order = np.random.default_rng([self.seed, self.epoch]).permutation(slots).tolist()
                turns = [0] * count
                self._tasks = []
                for t in order:  # a stopped member keeps every gap-th of its turns
                    if not self.snapshot[t] or turns[t] % self.gap == 0:
                        self._tasks.append(t)
                    turns[t] += 1
        return self._tasks

    @property
    def steps_per_epoch(self) -> int:
        return len(self.epoch_tasks())

    def set_position(self, epoch: int, start_step: int) -> None:
        if epoch < self.epoch:
            raise ValueError(f"the task schedule stands in epoch {self.epoch}, cannot go back to {epoch}")
        while self.epoch < epoch:  # close the epoch: its steps are consumed; stops seen now rule the next one
            done = np.bincount(self.epoch_tasks(), minlength=len(self.sizes))
            self.consumed = [c + int(d) for c, d in zip(self.consumed, done, strict=True)]
            self.epoch, self.snapshot, self._tasks = self.epoch + 1, list(self.stopped()), None
        self.start_step = start_step

    def member_order(self, member: int, member_epoch: int) -> np.ndarray:
        """A member's sample order in one of its own epochs: whole global batches of a seeded permutation."""
        order = np.random.default_rng([self.seed, member, member_epoch]).permutation(self.sizes[member])
        return order[: self.steps[member] * self.batch_sizes[member]]

    def __iter__(self) -> Iterator[list[tuple[int, tuple[int, int]]]]:
        tasks = self.epoch_tasks()
        seen = list(self.consumed)
        for t in tasks[: self.start_step]:
            seen[t] += 1
        orders: dict[int, tuple[int, np.ndarray]] = {}  # member -> (its epoch, its order then)
        for t in tasks[self.start_step:]:
            member_epoch, position = divmod(seen[t], self.steps[t])
            seen[t] += 1
            if t not in orders or orders[t][0] != member_epoch:
                orders[t] = (member_epoch, self.member_order(t, member_epoch))
            size = self.batch_sizes[t]
            mine = orders[t][1][position * size:(position + 1) * size][self.rank::self.world_size]
            micro = len(mine) // self.accumulation
            for a in range(self.accumulation):
                yield [(member_epoch, (t, int(i))) for i in mine[a * micro:(a + 1) * micro]]

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.accumulation

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "consumed": list(self.consumed), "stopped": list(self.snapshot)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.epoch, self.consumed = int(state["epoch"]), [int(c) for c in state["consumed"]]
        self.snapshot, self._tasks = [bool(s) for s in state["stopped"]], None


# -------------------------------------------------------------------------------------------------- data


class MultiTaskDataset(TaskDataset):
    """Every member's training set (the kept items after cleaning); keys are (member, position)."""

    def __init__(self, datasets: list[TaskDataset], kept: list[list[int]]):
        self.datasets, self.kept = datasets, kept

    def __len__(self) -> int:
        return sum(len(k) for k in self.kept)

    def __getitem__(self, index: tuple[int, int]) -> tuple[int, Any]:
        return self.sample(index, 0)

    def sample(self, index: tuple[int, int], epoch: int) -> tuple[int, Any]:
        member, position = index
        return member, self.datasets[member].sample(self.kept[member][position], epoch)


def clean_indices(train_images: list[tuple[str, ...]], held_out: set[str]) -> list[int]:
    """The training items none of whose images is held out."""
    return [i for i, images in enumerate(train_images) if held_out.isdisjoint(images)]


# -------------------------------------------------------------------------------------------------- task


@dataclass
class Member:
    """A member task, its loss scale and its stop-and-go controller."""

    name: str  # its label
    task: FinetuneTask
    loss_scale: float
    controller: MultiTaskStopOnPlateau


def load_member(spec: MemberConfig, model: ModelConfig, seed: int,
                shared: list[str] | tuple[str, ...] = ()) -> FinetuneTask:
    """A member task from its resolved config (saved runs) or its YAML plus its overrides, then the `shared` ones
    (multitask.member_overrides); the model is the run's."""
    if not issubclass(task_class(spec.name), FinetuneTask):
        raise ConfigError(f"tasks: {spec.name} is not a fine-tuning task and cannot be a member")
    if spec.resolved:
        task = build_task(spec.name, spec.resolved, source=f"tasks[{spec.name}].resolved")
    else:
        task = build_task(spec.name, spec.config, [*spec.overrides, *shared])
    task.config.model = model
    task.config.train.seed = seed
    spec.resolved = to_dict(task.config)
    return task


def member_heads(task: FinetuneTask) -> tuple[str, ...]:
    """The model modules a member trains as its own head."""
    if task.head_modules:
        return task.head_modules
    raise ConfigError(f"tasks: {task.name} does not say which head module it trains")


class MultiTask(Task):
    """Several registered tasks trained together on one model (see the module docstring)."""

    name = "multi"
    main_metric = "score"
    higher_is_better = True
    find_unused_parameters = True  # each step trains one member's head
    config_class = MultiTaskConfig
    config_from_checkpoint = True  # a multi-task run evaluates every member its saved config lists

    def __init__(self, config: MultiTaskConfig):
        self.config = config
        settings = config.multitask
        tasks = [load_member(spec, config.model, config.train.seed, settings.member_overrides) for spec in config.tasks]
        base_lr = min(task.config.optim.lr for task in tasks)
        self.members = [
            Member(spec.label or spec.name, task,
                spec.loss_scale if spec.loss_scale is not None else task.config.optim.lr / base_lr,
                   MultiTaskStopOnPlateau(settings.patience, settings.threshold, settings.continue_threshold,
                                          settings.cooldown))
            for spec, task in zip(config.tasks, tasks, strict=True)
        ]
        self.head_modules = tuple(dict.fromkeys(h for m in self.members for h in member_heads(m.task)))
        self.removed: dict[str, int] = {}  # training items each member lost to clean_train_sets
        self.micro_steps = [0] * len(self.members)  # training micro-steps each member has had
        self.schedule: MultiTaskSchedule | None = None
        self._train: MultiTaskDataset | None = None

    @property
    def names(self) -> list[str]:
        return [member.name for member in self.members]

    def run_record(self) -> dict[str, Any]:
        records = [member.task.run_record() for member in self.members]
        extractors: list[dict] = []
        for record in records:
            extractors += [e for e in record["feature_extractor"] if e not in extractors]
        return {"task": self.name, "task_token": None, "tasks": [m.task.name for m in self.members],
                "task_tokens": {m.name: r["task_token"] for m, r in zip(self.members, records, strict=True)},
                "feature_extractor": extractors, "architecture": TASK_ARCHITECTURE}

    # ------------------------------------------------------------------------------------------ model

    def build_model(self) -> nn.Module:
        """The first member's model with every other member's head (and the config fields shaping it) moved in."""
        model = self.members[0].task.build_model()
        owner = {head: self.members[0].name for head in member_heads(self.members[0].task)}
        for member in self.members[1:]:
            built = member.task.build_model()
            for head in member_heads(member.task):
                fields = HEAD_CONFIG.get(head, ())
                if head in owner:  # a shared head (VQA and Genome QA answer through answer_head)
                    differ = [f for f in fields if getattr(model.config, f) != getattr(built.config, f)]
                    if differ:
                        raise ConfigError(f"tasks: {owner[head]} and {member.name} share {head} but their "
                                          f"{', '.join(differ)} differ")
                    continue
                owner[head] = member.name
                setattr(model, head, getattr(built, head))
                for name in fields:
                    setattr(model.config, name, getattr(built.config, name))
            del built
        if not model.config.task_specific_tokens:
            logger.warning("multi-task model without task tokens (model.overrides.task_specific_tokens: false)")
        return model

    # ------------------------------------------------------------------------------------------- data

    def dataset(self, split: str) -> TaskDataset:
        if split != "train":
            raise ConfigError(f"a multi-task run reads its members' splits; no {split!r} training set")
        if self._train is None:
            datasets = [member.task.dataset("train") for member in self.members]
            kept = [list(range(len(d))) for d in datasets]
            if self.config.multitask.clean_train_sets:
                kept = self._cleaned(datasets)
            self._train = MultiTaskDataset(datasets, kept)
        return self._train

    def _cleaned(self, datasets: list[TaskDataset]) -> list[list[int]]:
        held_out: set[str] = set()
        for member, spec in zip(self.members, self.config.tasks, strict=True):
            for split in ("val", *spec.test_splits):
                images = member.task.dataset(split).image_ids
                if images is None:
                    raise ConfigError(f"multitask.clean_train_sets: {member.name} does not list the images of "
                                      f"its {split} split")
                held_out.update(i for row in images for i in row)
        kept = []
        for member, dataset in zip(self.members, datasets, strict=True):
            if dataset.image_ids is None:
                raise ConfigError(f"multitask.clean_train_sets: {member.name}'s training set does not list its "
                                  "images")
            kept.append(clean_indices(dataset.image_ids, held_out))
            self.removed[member.name] = len(dataset) - len(kept[-1])
            logger.info("clean train sets: %s keeps %d of %d training items (%d read held-out images)",
                        member.name, len(kept[-1]), len(dataset), self.removed[member.name])
        return kept

    def train_batches(self, dataset: TaskDataset, micro_batch_size: int, grad_accumulation: int, rank: int,
                      world_size: int, seed: int) -> MultiTaskSchedule:
        """The task schedule; each member's global batch is its own `train.global_batch_size`."""
        if not isinstance(dataset, MultiTaskDataset):
            raise TypeError("a multi-task run trains on its own MultiTaskDataset")
        sizes = [len(kept) for kept in dataset.kept]
        batch_sizes = [member.task.config.train.global_batch_size for member in self.members]
        for member, size, batch in zip(self.members, sizes, batch_sizes, strict=True):
            if batch % (world_size * grad_accumulation):
                raise ConfigError(f"tasks: {member.name} train.global_batch_size ({batch}) must be divisible by "
                                  f"world size × grad_accumulation ({world_size} × {grad_accumulation})")
            if size < batch:
                raise DataError(f"{member.name}: training set has {size} items, fewer than one global batch "
                                f"({batch})")
        member_steps = [m.task.config.train.epochs * (n // b) for m, n, b in zip(self.members, sizes, batch_sizes,
                                                                                    strict=True)]
        iterations = max(1, max(member_steps) // self.config.train.epochs)
        settings = self.config.multitask
        power = {"round-robin": 1.0, "proportional": 1.0, "temperature": 1.0 / settings.temperature}[settings.sampling]
        self.schedule = MultiTaskSchedule(
            sizes, batch_sizes, iterations, settings.sampling, [n ** power for n in sizes], settings.train_iter_gap,
            grad_accumulation, rank, world_size, seed, stopped=self.stopped)
        logger.info("multi-task schedule (%s): %d iterations per epoch, %d steps; members %s", settings.sampling,
                    iterations, self.schedule.steps_per_epoch,
                    ", ".join(f"{m.name} ({n} items, batch {b}, loss ×{m.loss_scale:g})"
                              for m, n, b in zip(self.members, sizes, batch_sizes, strict=True)))
        return self.schedule

    def stopped(self) -> list[bool]:
        """Which members stop-and-go has stopped (never, with it off)."""
        return [self.config.multitask.stop_and_go and m.controller.in_stop for m in self.members]

    def collate(self, samples: list) -> dict[str, Any]:
        member = samples[0][0]
        return {"task": member, "batch": self.members[member].task.collate([sample for _, sample in samples])}

    def label_counts(self, batch: Mapping[str, Any]) -> dict[str, int]:
        member = self.members[batch["task"]]
        return {f"{member.name}/{k}": v for k, v in member.task.label_counts(batch["batch"]).items()}

    def training_step(self, model: nn.Module, batch: Mapping[str, Any]) -> StepOutput:
        member = self.members[batch["task"]]
        self.micro_steps[batch["task"]] += 1
        output = member.task.training_step(model, batch["batch"])
        counts = member.task.label_counts(batch["batch"])
        local_loss = sum(value.detach().float() / max(counts[key], 1) for key, value in output.loss_sums.items())
        return StepOutput(
            {f"{member.name}/{k}": v * member.loss_scale for k, v in output.loss_sums.items()},
            metrics={f"{member.name}/train_loss": local_loss,
                     **{f"{member.name}/{k}": v for k, v in output.metrics.items()}},
        )

    def state_dict(self) -> dict[str, Any]:
        return {"schedule": self.schedule.state_dict() if self.schedule else {},
                "stop_and_go": [m.controller.state_dict() for m in self.members],
                "micro_steps": {m.name: n for m, n in zip(self.members, self.micro_steps, strict=True)}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for member, saved in zip(self.members, state.get("stop_and_go", []), strict=False):
            member.controller.load_state_dict(saved)
        saved_steps = state.get("micro_steps", {})
        self.micro_steps = [int(saved_steps.get(m.name, 0)) for m in self.members]
        if self.schedule is not None and state.get("schedule"):
            self.schedule.load_state_dict(state["schedule"])

    # ------------------------------------------------------------------------------------------ evaluation

    def predict(self, model: nn.Module, split: str, progress: Callable | None = None) -> dict[str, Any]:
        """Every member's predictions on its own `split` (the role "val" is each member's validation split)."""
        return {member.name: member.task.predict(model, split, progress) for member in self.members}

    def score(self, predictions: Mapping[str, Any], split: str) -> dict[str, float]:
        metrics: dict[str, float] = {}
        mains = []
        for member in self.members:
            scored = member.task.score(predictions[member.name], split)
            metrics.update({f"{member.name}/{k}": v for k, v in scored.items()})
            main = scored.get(member.task.main_metric)
            if main is not None:
                mains.append(main if member.task.higher_is_better else -main)
                logger.info("%s %s: %s", split, member.name, ", ".join(f"{k} {v:.4g}" for k, v in scored.items()
                                                                      if isinstance(v, (int, float))))
        if mains:
            metrics["score"] = float(np.mean(mains))
        return metrics

    def on_evaluation(self, metrics: Mapping[str, float]) -> None:
        """Stop-and-go: each member's controller sees its main validation metric."""
        if not self.config.multitask.stop_and_go:
            return
        for member in self.members:
            value = metrics.get(f"{member.name}/{member.task.main_metric}")
            if value is None or not math.isfinite(value):
                continue
            was = member.controller.in_stop
            member.controller.step(value if member.task.higher_is_better else -value)
            if member.controller.in_stop != was:
                logger.info("stop-and-go: %s %s", member.name, "stops" if member.controller.in_stop else "resumes")

    def parameter_groups(self, model: nn.Module, optim: OptimConfig) -> list[dict]:
        return model_parameter_groups(model, optim)

    def chance(self, split: str, train: Task | None = None) -> dict[str, float]:
        return {f"{m.name}/{k}": v for m in self.members for k, v in m.task.chance(split).items()}

    def feature_files(self) -> list[list[str]]:
        return [files for member in self.members for files in member.task.feature_files()]

