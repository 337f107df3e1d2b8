"""The contract between the engine and a task (pretraining, VQA, retrieval, referring expressions, ...).

The engine and the runners know nothing task-specific: every hook they call is declared here, with its default.
Adding a task is one module subclassing `Task` plus one line in `tasks.registry.TASKS`.

How `tasks.engine.trainer.Trainer` calls a task:
- `build_model()` once, after seeding every rank identically; the trainer moves it to the device (and wraps it
  in DDP / torch.compile). Parameters with `requires_grad=False` are frozen: no gradient, no optimizer state.
- `dataset("train")`, read by index in DataLoader workers through `TaskDataset.sample(index, epoch)`: per-sample
  randomness (masking, negatives) is seeded from (seed, epoch, index), so runs are reproducible and resumable
  and DataLoader workers draw independently. `text_lengths` (optional) lets the sampler group by length.
- `collate(samples)` in the workers; the trainer moves the result to the device. A collate pads text and regions
  to the batch's longest item (`tasks.engine.padding.cut_to_longest`), and `padded_keys` declares which batch keys
  run along the text and region axes and what fills their padding, so the engine can pad batches to fixed or
  bucketed lengths (compiled steps) without knowing the task.
- `label_counts(batch)` on the host, before the forward: how many labelled items each loss term of the batch
  has. The trainer sums them over ranks and accumulation micro-steps, and `training_step` returns per-term *sums*,
  so the loss of one optimizer step is the same mean however the global batch is split.
- `training_step(model, batch)` under autocast: per-term loss sums and metric tensors, all kept on the device.

How evaluation (trainer, `vilbert evaluate`, reports) calls a task: `predict(model, split)` once, in eval mode under
`torch.no_grad()`, then `score(predictions, split)`; `evaluate` is exactly that composition. `main_metric` picks
the best checkpoint in the direction `higher_is_better`.

What a run records (`tasks.engine.run_record`): the trainer writes `run_record()` as `run.json` in the run directory
and in every checkpoint: the task's name, its 12-in-1 task token, the `extractor` attributes of its feature stores
and the architecture it trains. Prediction and evaluation read it instead of guessing from config keys.

How a single example is predicted (`vilbert predict`, `vilbert predict-task`, `vilbert serve`: one path,
tasks.runners.predict). `example_inputs` says what one example of the task needs from its user (a text, candidate
texts, one or two images); the command line and the demo page ask for exactly that, and a request that does not
fit is refused in one line (`ExampleInputs.problem`). The task is built from the checkpoint's run config (a member's
config for a multi-task run), with `data.tokenizer` set and `model.init` the checkpoint, so that answer lists come
from it. The runner then
- refuses the checkpoint unless its weights hold every module of `head_modules` (a pretraining checkpoint is
  accepted only by tasks with `pretraining_zero_shot`) and `prediction_problem(config.json)` is None, and loads
  the model in eval mode;
- detects each image's regions with the run's detector (or pools on given boxes) and builds `max_regions` visual
  rows per image (IMG token first): the `PredictExample`;
- calls `predict_one(model, example)` under `torch.no_grad()`: a JSON-serialisable result whose `headline(result)`
  is one line and `summary_lines(result)` the terminal's text; `draw(example, result)` is the picture and
  `explained_text(example, result)` the text whose co-attention is drawn.
`vilbert predict` keeps its request flags (`predict_modes`: `question` and `expression` fill `text`, `captions`
fills `candidates`); `vilbert evaluate` applies the same head check before it predicts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from tasks.engine.config import OptimConfig
from tasks.engine.optimization import parameter_groups
from tasks.engine.padding import MODEL_PADDED_KEYS, PaddedKeys
from tasks.errors import ConfigError


@dataclass
class StepOutput:
    """One micro-batch's loss terms, each summed over its labelled items, and metric tensors (all on device)."""

    loss_sums: dict[str, torch.Tensor]
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class TaskDataset(Dataset):
    """A training set. `sample(index, epoch)` is what the trainer reads; its default ignores the epoch.

    A dataset with per-sample randomness overrides `sample` and seeds its generator from (seed, epoch, index),
    never from state kept between calls.
    """

    text_lengths: np.ndarray | None = None  # one text length per sample, for `train.group_by_length`
    region_counts: np.ndarray | None = None  # visual rows (IMG token included) per sample, for length grouping
    image_ids: list[tuple[str, ...]] | None = None  # the feature-store keys each item reads (multi-task cleaning)

    def sample(self, index: int, epoch: int) -> Any:
        return self[index]


class BatchSchedule(Protocol):
    """This rank's training micro-batches, for a task that orders its own data (`Task.train_batches`).

    Iterating yields lists of dataset keys `(epoch, index)`: one list per micro-batch, `grad_accumulation` lists
    per optimizer step, from the position last set. `steps_per_epoch` is the current epoch's number of optimizer
    steps; `set_position(epoch, step)` is called before each pass, on every rank, with the trainer's position.
    """

    steps_per_epoch: int

    def set_position(self, epoch: int, start_step: int) -> None: ...

    def __iter__(self): ...

    def __len__(self) -> int: ...


@dataclass(frozen=True)
class ExampleInputs:
    """What one example of a task needs from its user; `vilbert predict-task` and the demo page ask for this.

    `text` names the free text ("question", "expression", ...; None: the task reads none), `candidates` the texts
    it chooses among or ranks ("captions", "answers"; None: none) and `num_candidates` how many (None: one or
    more); `images` names each image it reads, in order.
    """

    text: str | None
    candidates: str | None = None
    num_candidates: int | None = None
    images: tuple[str, ...] = ("image",)
    example_text: str = ""  # a sample text (the page's placeholder)

    def problem(self, task: str, text: str | None, candidates: Sequence[str], images: int) -> str | None:
        """What a request lacks or has too much of, as one line naming it; None when it fits."""
        if images != len(self.images):
            names = ", ".join(self.images)
            return f"{task} reads {len(self.images)} image(s) ({names}), got {images}"
        if self.text is not None and not (text or "").strip():
            return f"{task} needs a {self.text}; the text is empty"
        if self.text is None and (text or "").strip():
            return f"{task} reads no free text, only {self.candidates}"
        if self.candidates is None:
            if candidates:
                return f"{task} takes no candidate texts; got {len(candidates)}"
            return None
        if not candidates:
            return f"{task} needs {self.candidates} to choose from; none given"
        if self.num_candidates is not None and len(candidates) != self.num_candidates:
            return f"{task} chooses among exactly {self.num_candidates} {self.candidates}, got {len(candidates)}"
        return None


@dataclass
class ExampleImage:
    """One image of an example: the picture, the boxes the model sees and its visual input built from them."""

    image: Any  # features.images.LoadedImage: the picture, for drawing
    regions: Any  # features.store.Regions: every region found (boxes in original pixels), for tasks that re-pick
    boxes: np.ndarray  # [K, 4] the boxes the model sees, in original pixels (the IMG token excluded)
    visual: Mapping[str, torch.Tensor]  # region_features [1, R, D], region_locations [1, R, 5], region_mask [1, R]


@dataclass
class PredictExample:
    """One example as the runner hands it to a task: its images' regions as model input, and the user's request.

    `image`, `boxes` and `visual` are the first image's (every task but NLVR2 reads one image).
    """

    images: Sequence[ExampleImage]
    text: str | None = None  # a question, an expression, a hypothesis, a statement
    candidates: Sequence[str] = ()  # the texts the task ranks or chooses among (captions, answers)
    options: Mapping[str, Any] = field(default_factory=dict)  # task-specific settings (e.g. top_k, answers)
    task_token: str | None = None  # the 12-in-1 token for models with task tokens; None: the task's own

    @property
    def image(self) -> Any:
        return self.images[0].image

    @property
    def boxes(self) -> np.ndarray:
        return self.images[0].boxes

    @property
    def visual(self) -> Mapping[str, torch.Tensor]:
        return self.images[0].visual


class Task:
    """Base class. `name` keys the task registry; `main_metric` picks the best checkpoint."""

    name: str = ""
    main_metric: str = "loss"
    higher_is_better: bool = False  # for main_metric; accuracy-like metrics set True
    find_unused_parameters: bool = False  # DDP: some trainable parameters get no gradient in training_step
    predict_modes: tuple[str, ...] = ()  # the `vilbert predict` request kinds this task serves ("question", ...)
    example_inputs: ExampleInputs | None = None  # what one example needs; None: no single-example prediction
    head_modules: tuple[str, ...] = ()  # model modules a checkpoint must hold for this task ("answer_head", ...)
    pretraining_zero_shot: bool = False  # a pretraining checkpoint serves this task as is (alignment head)
    config_class: type  # the run config dataclass (tasks/configs/<name>.yaml is one of these)
    config: Any  # an instance of config_class; its `train` and `optim` sections drive the trainer
    report_metric: str = ""  # the metric a report shows beside its chance level (default: main_metric)
    metric_labels: Mapping[str, str] = {}  # how reports name metrics ("accuracy" -> "VQA accuracy")
    checkpoint_overrides: tuple[str, ...] = ()  # config overrides that read a checkpoint's head as it is
    strict_key: str | None = None  # the config key making items without features an error (`--strict`)
    config_from_checkpoint: bool = False  # `vilbert evaluate` reads the checkpoint's run config by default
    padded_keys: PaddedKeys = MODEL_PADDED_KEYS  # batch keys along the text / region axes, and their padding value

    @classmethod
    def named_split_overrides(cls, split: str) -> list[str]:
        """Config overrides under which `split`, named by a user (`vilbert evaluate --split`, a report), means that
        split and not a training role. Default: none (the task has no roles that shadow split names)."""
        return []

    def run_record(self) -> dict[str, Any]:
        """What `run.json` says about a run of this task (see tasks.engine.run_record). Default: the name only."""
        return {"task": self.name, "task_token": None, "feature_extractor": [], "architecture": "tasks"}

    # ---------------------------------------------------------------------------------------------- training

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def dataset(self, split: str) -> TaskDataset:
        raise NotImplementedError

    def collate(self, samples: list) -> Mapping[str, Any]:
        raise NotImplementedError

    def label_counts(self, batch: Mapping[str, Any]) -> dict[str, int]:
        """Labelled items per loss term of a collated batch (host ints). Default: one term over the samples."""
        return {"loss": batch_size(batch)}

    def training_step(self, model: nn.Module, batch: Mapping[str, Any]) -> StepOutput:
        raise NotImplementedError

    def parameter_groups(self, model: nn.Module, optim: OptimConfig) -> list[dict]:
        """The optimizer's parameter groups (`tasks.engine.optimization.parameter_groups`). Default: decay on
        every weight but biases and LayerNorm, one lr; a task whose model has heads or a text stream with their
        own lr (`optim.head_lr`, `optim.text_lr`) names them."""
        return parameter_groups(model, optim)

    def train_batches(self, dataset: TaskDataset, micro_batch_size: int, grad_accumulation: int, rank: int,
                      world_size: int, seed: int) -> BatchSchedule | None:
        """The order of this rank's training micro-batches. Default None: the engine's shuffled sampler over
        `dataset`, batches of `micro_batch_size` (a multi-task run returns its task schedule instead)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """Training state the task keeps between steps (saved in checkpoints for exact resume). Default: none."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()` when resuming (called after `train_batches`)."""

    def on_evaluation(self, metrics: Mapping[str, float]) -> None:
        """Called on every rank with the validation metrics after each evaluation in training. Default: nothing."""

    # ---------------------------------------------------------------------------------------------- evaluation

    def predict(self, model: nn.Module, split: str, progress: Callable | None = None) -> Any:
        """Predictions for every item of `split` (JSON-serialisable; what `vilbert evaluate` writes)."""
        raise NotImplementedError

    def score(self, predictions: Any, split: str) -> dict[str, float]:
        """The split's metrics from `predict`'s output. An empty dict means "nothing to evaluate"."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, split: str, progress: Callable | None = None) -> dict[str, float]:
        """Predict once, then score."""
        return self.score(self.predict(model, split, progress), split)

    def chance(self, split: str, train: Task | None = None) -> dict[str, float]:
        """Metric values of the best blind guess on `split` (for reports), its priors drawn from the training
        split of `train` (default this task; a report reads test splits through a task built on their folder).
        Empty when not defined."""
        return {}

    def evaluation(self, model: nn.Module, split: str, progress: Callable | None = None, mode: str | None = None,
                   rerank_k: int = 32) -> tuple[Any, dict[str, Any]]:
        """What `vilbert evaluate` writes: (the predictions file's content, the metrics). Default: `predict` once,
        then `score`. `mode` / `rerank_k` are the command line's ranking options (tasks that rank use them)."""
        predictions = self.predict(model, split, progress)
        return predictions, self.score(predictions, split)

    def hard_negative_pool(self, model: nn.Module, split: str, size: int = 100,
                           progress: Callable | None = None) -> dict[str, list[str]]:
        """{item: its `size` nearest other items by the model's scores} (`vilbert evaluate --hard-negatives`)."""
        raise ConfigError(f"--hard-negatives: task {self.name!r} has no hard-negative pool")

    def feature_files(self) -> list[list[str]]:
        """The feature store files each part of the task reads (checked against the checkpoint's extractor)."""
        return []

    def report_lines(self, metrics: Mapping[str, float]) -> list[tuple[str, float, float | None]]:
        """Finer measurements a report prints under the main metric, from `score`'s metrics: (label, value %,
        the value of the model without the image or None). Default: none."""
        return []

    # ---------------------------------------------------------------------------------------------- prediction

    @property
    def max_regions(self) -> int:
        """Visual rows (IMG token included) the task's model sees per image; `vilbert predict` builds as many."""
        raise NotImplementedError(f"task {self.name!r} does not say how many regions it reads")

    def prediction_problem(self, model_config: Mapping[str, Any]) -> str | None:
        """What a checkpoint's config.json lacks for this task's predictions (e.g. an answer list), as one line;
        None when nothing is missing. Default: nothing is needed beyond the heads."""
        return None

    def predict_one(self, model: nn.Module, example: PredictExample) -> dict[str, Any]:
        """The answer for one example, JSON-serialisable (what `vilbert predict --json` prints)."""
        raise NotImplementedError(f"task {self.name!r} has no single-example prediction")

    def headline(self, result: Mapping[str, Any]) -> str:
        """`predict_one`'s result in one line (the page's title, the drawing's caption)."""
        raise NotImplementedError(f"task {self.name!r} has no single-example prediction")

    def draw(self, example: PredictExample, result: Mapping[str, Any]) -> Any:
        """A PIL image showing `result` on the example's picture(s) (tasks.figures.drawing)."""
        raise NotImplementedError(f"task {self.name!r} has no drawing")

    def summary_lines(self, result: Mapping[str, Any]) -> list[str]:
        """`predict_one`'s result as text for the terminal. Default: one `key: value` line per entry."""
        return [f"{key}: {value}" for key, value in result.items()]

    def explained_text(self, example: PredictExample, result: Mapping[str, Any]) -> str:
        """The text whose co-attention with the image(s) is drawn: the example's text by default."""
        return example.text or ""


def batch_size(batch: Mapping[str, Any]) -> int:
    """The number of samples in a collated batch: the first dimension of its first tensor."""
    for value in batch.values():
        if isinstance(value, torch.Tensor):
            return int(value.shape[0])
    raise ValueError("the batch holds no tensor")
