"""What the fine-tuning tasks share: their data config, the task model, task tokens, image-id joins, JSON reading.

A fine-tuning run builds `ViLBertForVLTasks` from a preset, or loads it from a checkpoint directory: a task
checkpoint, or a pretraining (`ViLBertForPreTraining`) one, whose shared weights load and whose task heads start
fresh. Models converted from the released 12-in-1 weights carry `task_specific_tokens`; the tasks then pass their
12-in-1 task id (VQA 1, Genome QA 2, Visual7W 4, VCR Q→A 5 and QA→R 6, COCO retrieval 7, Flickr30k retrieval 8,
RefCOCO 9, RefCOCO+ 10, RefCOCOg 11, NLVR2 12, SNLI-VE 13, GuessWhat 14, GQA 15, FOIL 16, GuessWhat pointing 17,
Flickr30k grounding 18).
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from features.store import FeatureStore
from tasks.data.annotations import load_json, open_feature_store
from tasks.data.tokenization import Tokenizer, load_tokenizer
from tasks.debiasing import check_mode
from tasks.engine.config import OptimConfig, TrainConfig, type_name
from tasks.engine.distributed import unwrap
from tasks.engine.optimization import parameter_groups
from tasks.engine.run_record import TASK_ARCHITECTURE, store_extractors
from tasks.engine.task import PredictExample, Task
from tasks.errors import ConfigError
from vilbert import ViLBertConfig, ViLBertForVLTasks
from vilbert.convert import init_text_stream_from_bert
from vilbert.errors import CheckpointError
from vilbert.modeling_vilbert import HEAD_MODULES

logger = logging.getLogger(__name__)

# 12-in-1 task tokens: the task numbers of its vilbert_tasks.yml.
TASK_TOKEN_IDS = {
    "vqa": 1, "genome-qa": 2, "visual7w": 4, "vcr-qa": 5, "vcr-qar": 6, "retrieval-coco": 7, "retrieval-flickr30k": 8,
    "refcoco": 9, "refcoco+": 10, "refcocog": 11, "nlvr2": 12, "snli-ve": 13, "guesswhat": 14, "gqa": 15, "foil": 16,
    "guesswhat-pointing": 17, "flickr-grounding": 18,
}  # fmt: skip


@dataclass
class ModelConfig:
    """Which model to build and what to initialise it from."""

    preset: str = "base"  # a `ViLBertConfig.from_preset` name
    overrides: dict[str, Any] = field(default_factory=dict)  # ViLBertConfig fields to change
    text_init: str | None = None  # local Hugging Face BERT directory for the text stream
    init: str | None = None  # a checkpoint directory (save_pretrained) to start from

    def validate(self) -> None:
        defaults = ViLBertConfig().to_dict()
        for key, value in self.overrides.items():
            if key not in defaults:
                close = difflib.get_close_matches(key, defaults, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"model.overrides: {key!r} is not a ViLBertConfig field{hint}")
            default = defaults[key]
            if default is None or value is None:
                continue
            kind = float if isinstance(default, float) else type(default)
            fits = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
            if kind is float:
                fits = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not fits:
                raise ConfigError(f"model.overrides.{key} must be {type_name(kind)} like its default "
                                  f"{default!r}, got {value!r}")
            if isinstance(default, dict):
                unknown = sorted(set(value) - set(default)) if default else []
                if unknown:
                    raise ConfigError(f"model.overrides.{key}: unknown key {unknown[0]!r}; expected one of "
                                      f"{', '.join(sorted(default))}")



def soft_bce_sum(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits against soft targets, summed over every entry of the batch.

    The reference's loss for VQA (soft answer scores) and referring expressions (soft IoU targets) is the mean
    over entries times the number of labels: this sum divided by the batch size, which the engine applies.
    """
    return torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), target, reduction="sum")


@dataclass
class FinetuneDataConfig:
    """Data settings every fine-tuning task has; each task's config adds its own fields."""

    root: str = "data"  # folder holding the annotation files
    features: list[str] = field(default_factory=list)  # feature store file(s), joined by image id
    tokenizer: str | None = None  # local BERT tokenizer directory; defaults to model.text_init
    max_text_length: int = 20
    max_regions: int = 101  # IMG token included
    train_split: str = "train"
    val_split: str = "val"
    eval_batch_size: int = 256
    strict: bool = False  # an item whose image has no features is an error (else skipped and scored as wrong)
    debias: str = "none"  # none | rubi | lmh: the training loss of answer-classifier tasks (tasks/debiasing.py)
    debias_entropy_weight: float = 0.36  # lmh: weight of the entropy penalty (Clark et al.'s VQA-CP value)

    def validate(self) -> None:
        if self.max_regions < 2:
            raise ConfigError(f"data.max_regions must be >= 2 (IMG + one box), got {self.max_regions}")
        for key in ("max_text_length", "eval_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"data.{key} must be >= 1, got {getattr(self, key)}")


@dataclass
class FinetuneConfig:
    """A fine-tuning run: the model, the trainer's and optimizer's settings, the task's data. Each task's config
    subclasses it with its own `data` (tasks/configs/<name>.yaml is one)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)


SPLIT_ROLES = {"train": "train_split", "val": "val_split"}


def resolve_split(data: FinetuneDataConfig, split: str) -> str:
    """The trainer asks for the roles "train" and "val": they mean `data.train_split` / `data.val_split`."""
    return getattr(data, SPLIT_ROLES[split]) if split in SPLIT_ROLES else split


def tokenizer_directory(data: FinetuneDataConfig, model_config: ModelConfig) -> str:
    """`data.tokenizer`, else `model.text_init`, else `model.init` when it holds vocab.txt; none is a ConfigError."""
    directory = data.tokenizer or model_config.text_init
    init = model_config.init
    if not directory and init and (Path(init) / "vocab.txt").is_file():  # a converted dir with its tokenizer
        directory = init
    if not directory:
        raise ConfigError("data.tokenizer: set a local BERT tokenizer directory (or model.text_init)")
    return directory


@contextlib.contextmanager
def _quiet_loading_report() -> Iterator[None]:
    """Silence transformers' per-key loading report (a table of every missing or resized weight) for a while."""
    report = logging.getLogger("transformers.modeling_utils")  # the logger transformers reports loading with
    level = report.level
    report.setLevel(logging.ERROR)
    try:
        yield
    finally:
        report.setLevel(level)


def model_feature_size(model_config: ModelConfig) -> int:
    """The region feature width the model of `model_config` takes: overrides, else model.init's config, else the
    preset's."""
    if "v_feature_size" in model_config.overrides:
        return int(model_config.overrides["v_feature_size"])
    if model_config.init and (Path(model_config.init) / "config.json").is_file():
        size = load_json(Path(model_config.init) / "config.json").get("v_feature_size")
        if isinstance(size, int):
            return size
    return ViLBertConfig.from_preset(model_config.preset).v_feature_size


def build_task_model(model_config: ModelConfig, **config_overrides: Any) -> nn.Module:
    """A `ViLBertForVLTasks` from `model_config.init` (a checkpoint directory) or from the preset.

    `config_overrides` (e.g. num_labels for the VQA vocabulary) are applied either way; a checkpoint whose head
    shapes differ (a pretraining checkpoint, another vocabulary) keeps every matching weight and starts the
    mismatched heads fresh, with a log line naming them.
    """
    labels = {key: config_overrides[key] for key in ("id2label", "label2id") if key in config_overrides}
    settings = {key: value for key, value in config_overrides.items() if key not in labels}
    if "id2label" in labels:
        settings["num_labels"] = len(labels["id2label"])
    if model_config.init:
        directory = Path(model_config.init)
        if not (directory / "config.json").is_file():
            raise ConfigError(f"model.init: {directory} has no config.json (a save_pretrained directory)")
        if not (directory / "model.safetensors").is_file():
            pickled = (directory / "pytorch_model.bin").is_file()
            raise CheckpointError(
                f"model.init: {directory} has no model.safetensors"
                + (" (its pytorch_model.bin is a pickle, which is never loaded; convert it with vilbert convert)"
                   if pickled else " (a config-only directory holds no weights)"))
        try:
            config = ViLBertConfig.from_pretrained(str(directory))
            for key, value in {**model_config.overrides, **settings}.items():
                setattr(config, key, value)
            config.update(labels)
            with _quiet_loading_report():  # its table of fresh heads is the line logged below
                model, info = ViLBertForVLTasks.from_pretrained(
                    str(directory), config=config, ignore_mismatched_sizes=True, output_loading_info=True
                )
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as error:  # transformers' many ways to fail
            first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
            raise CheckpointError(f"model.init: cannot load {directory} ({first})") from error
        fresh = sorted({key.split(".")[0] for key in info.get("missing_keys", [])}
                       | {str(m[0]).split(".")[0] for m in info.get("mismatched_keys", [])})
        if fresh:
            logger.info("initialised from %s; fresh: %s", directory, ", ".join(fresh))
        return model
    config = ViLBertConfig.from_preset(model_config.preset, **{**model_config.overrides, **settings})
    config.update(labels)
    model = ViLBertForVLTasks(config)
    if model_config.text_init:
        init_text_stream_from_bert(model, model_config.text_init)
    return model


def task_token_id(model: nn.Module, token: str | None) -> int | None:
    """The 12-in-1 task id of `token` when the model has task tokens, else None; a ConfigError for a token the
    12-in-1 model has not."""
    config = getattr(unwrap(model), "config", None)  # DDP does not forward the model's attributes
    if config is None or not getattr(config, "task_specific_tokens", False):
        return None
    if token not in TASK_TOKEN_IDS:
        raise ConfigError(f"task token {token!r}: the model has 12-in-1 task tokens and this is none of them "
                          f"({', '.join(TASK_TOKEN_IDS)}); use a model without task tokens")
    return TASK_TOKEN_IDS[token]


def task_ids_for(model: nn.Module, task: str, batch_size: int, device: torch.device) -> torch.Tensor | None:
    """[B, 1] 12-in-1 task ids when the model has task tokens, else None."""
    task_id = task_token_id(model, task)
    if task_id is None:
        return None
    return torch.full((batch_size, 1), task_id, dtype=torch.long, device=device)


def model_parameter_groups(model: nn.Module, optim: OptimConfig) -> list[dict]:
    """ViLBERT's optimizer groups: its pooled-output heads (the reference's "vil_" heads) at `optim.head_lr` and
    its BERT-initialised text stream at `optim.text_lr` (the reference's intended 0.1x BERT lr) when set."""
    return parameter_groups(model, optim, heads=model.pooled_heads, text=model.text_stream_parameters())


MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "region_features", "region_locations", "region_mask")


def model_inputs(batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    return {key: batch[key] for key in MODEL_INPUTS}


class FinetuneTask(Task):
    """What the fine-tuning tasks share: their config, the tokenizer (loaded once), the task model, the run record.

    A subclass names the model output it reads (`head`, one of `vilbert.modeling_vilbert.VL_HEADS`); the module a
    checkpoint must hold for it (`head_modules`) follows from that.
    """

    config_class: type
    head: str = ""  # the ViLBertForVLTasks output this task reads ("answer_logits", "pair_logit", ...)
    find_unused_parameters = True  # the task model carries every 12-in-1 head; a task's loss reaches one of them
    debias_supported = False  # answers from a classifier with a per-question-type prior: `data.debias` applies
    strict_key = "data.strict"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.head:
            if cls.head not in HEAD_MODULES:
                raise TypeError(f"{cls.__name__}.head: {cls.head!r} is not a head output ({', '.join(HEAD_MODULES)})")
            cls.head_modules = (HEAD_MODULES[cls.head],)

    @classmethod
    def named_split_overrides(cls, split: str) -> list[str]:
        """A role's name given as a split ("val" of VQA is the whole val2014 file, while the trainer's "val" role
        is `data.val_split`, minval) pins the role to it, so that it means the named split."""
        return [f"data.{SPLIT_ROLES[split]}={split}"] if split in SPLIT_ROLES else []

    def __init__(self, config: Any):
        self.config = config
        self.data = config.data
        self._tokenizer = None
        check_mode(self.data.debias, self.name, self.debias_supported)

    @property
    def task_token(self) -> str:
        """The 12-in-1 task whose token this task gives models with task tokens (a key of TASK_TOKEN_IDS)."""
        return self.name

    def task_ids(self, model: nn.Module, rows: int, device: torch.device, token: str | None = None
                 ) -> torch.Tensor | None:
        """[rows, 1] ids of this task's token (or `token`, a prediction's choice) for a model with task tokens,
        else None."""
        return task_ids_for(model, token or self.task_token, rows, device)

    @property
    def max_regions(self) -> int:
        return self.data.max_regions

    def run_record(self) -> dict[str, Any]:
        """The task, its 12-in-1 token, the extractors of `data.features`, the task architecture."""
        return {"task": self.name, "task_token": self.task_token if self.task_token in TASK_TOKEN_IDS else None,
                "feature_extractor": store_extractors(self.data.features), "architecture": TASK_ARCHITECTURE}

    def example_token(self, example: PredictExample) -> str:
        """The 12-in-1 token for one prediction: the user's choice, else this task's."""
        return example.task_token or self.task_token

    def tokenizer(self) -> Tokenizer:
        """The BERT tokenizer of `data.tokenizer` (default `model.text_init`), loaded on first use.

        A tokenizer with more tokens than the model's word embeddings (`model.init` of another vocabulary) is a
        ConfigError here, not an index error in the middle of training."""
        if self._tokenizer is None:
            directory = tokenizer_directory(self.data, self.config.model)
            tokenizer = load_tokenizer(directory)
            init = self.config.model.init
            if init and (Path(init) / "config.json").is_file():
                vocab_size = load_json(Path(init) / "config.json").get("vocab_size")
                if isinstance(vocab_size, int) and tokenizer.vocab_size > vocab_size:
                    raise ConfigError(
                        f"model.init: {init} has a vocabulary of {vocab_size} tokens but the tokenizer {directory} "
                        f"has {tokenizer.vocab_size}: the checkpoint was trained with another vocabulary")
            self._tokenizer = tokenizer
        return self._tokenizer

    def parameter_groups(self, model: nn.Module, optim: OptimConfig) -> list[dict]:
        return model_parameter_groups(model, optim)

    def feature_files(self) -> list[list[str]]:
        return [list(self.data.features)]

    def open_store(self, paths: list[str], key: str = "data.features") -> FeatureStore:
        """The feature store over `paths`, refused in one line when its features are not as wide as the model's
        region input (`v_feature_size`), instead of a shape error in the first forward."""
        store = open_feature_store(paths, key)
        expected = model_feature_size(self.config.model)
        if store.feature_dim != expected:
            source = f"model.init {self.config.model.init}" if self.config.model.init else \
                f"model.preset {self.config.model.preset}"
            raise ConfigError(f"{key}: {paths[0]} holds {store.feature_dim}-d region features but the model "
                              f"({source}) takes {expected}-d (v_feature_size); use features of the detector it "
                              "was trained on")
        return store

    def build_model(self) -> nn.Module:
        return build_task_model(self.config.model)
