"""What the fine-tuning tasks share: their data config, the task model, task tokens, image-id joins, JSON reading.

A fine-tuning run builds `ViLBertForVLTasks` from a preset, or loads it from a checkpoint directory: a task
checkpoint, or a pretraining (`ViLBertForPreTraining`) one, whose shared weights load and whose task heads start
fresh. Models converted from the released 12-in-1 weights carry `task_specific_tokens`; the tasks then pass their
12-in-1 task id (VQA 1, COCO retrieval 7, Flickr30k retrieval 8, RefCOCO 9, RefCOCO+ 10, RefCOCOg 11).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tasks.config import ModelConfig
from tasks.errors import AnnotationError, ConfigError, DataError
from tasks.task import Task

if TYPE_CHECKING:
    from features.store import FeatureStore
    from tasks.tokenization import Tokenizer

logger = logging.getLogger(__name__)

# 12-in-1 task tokens (reference §7.4: the yml task number).
TASK_TOKEN_IDS = {"vqa": 1, "retrieval-coco": 7, "retrieval-flickr30k": 8, "refcoco": 9, "refcoco+": 10, "refcocog": 11}


def soft_bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits against soft targets, averaged over every entry, times the number of labels per example.

    The reference's loss for VQA (soft answer scores, x answers) and referring expressions (soft IoU targets,
    x regions): in effect a per-example sum.
    """
    return torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), target) * target.shape[1]


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


def resolve_split(data: FinetuneDataConfig, split: str) -> str:
    """The trainer asks for the roles "train" and "val": they mean `data.train_split` / `data.val_split`."""
    return {"train": data.train_split, "val": data.val_split}.get(split, split)


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Write JSON to a temporary file beside `path`, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)
    return path


def load_json(path: str | Path) -> Any:
    """Read a JSON file, turning unreadable or invalid files into an AnnotationError naming the file."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as error:
        raise AnnotationError(f"{path}: cannot read ({error.strerror or error})") from error
    except json.JSONDecodeError as error:
        raise AnnotationError(f"{path}: not valid JSON ({error})") from error


def require(entry: Any, keys: Iterable[str], source: str, where: str) -> None:
    """Raise AnnotationError naming the file, the entry and the first missing key."""
    if not isinstance(entry, Mapping):
        raise AnnotationError(f"{source}: {where} is a {type(entry).__name__}, expected an object")
    for key in keys:
        if key not in entry:
            raise AnnotationError(f"{source}: {where} has no {key!r}")


def image_key_resolver(store_ids: Iterable[str]) -> Callable[[Any], str | None]:
    """Map an annotation's image id (int or str) to a feature-store id.

    Exact matches win; otherwise the store id's trailing number is used, so COCO ids like 9 find
    "COCO_val2014_000000000009" or "000000000009", and Flickr30k "1000092795" finds "1000092795".
    Returns a function id -> store id or None.
    """
    exact = set(store_ids)
    by_number: dict[int, str] = {}
    for sid in exact:
        match = re.search(r"(\d+)$", sid)
        if match:
            by_number.setdefault(int(match.group(1)), sid)

    def resolve(image_id: Any) -> str | None:
        key = str(image_id)
        if key in exact:
            return key
        match = re.search(r"(\d+)$", key)
        return by_number.get(int(match.group(1))) if match else None

    return resolve


def keep_known_images(items: list, image_of: Callable[[Any], Any], resolve: Callable[[Any], str | None], source: str,
                      what: str) -> list[tuple[Any, str]]:
    """Drop items whose image has no features, with one counted warning (never an error mid-epoch)."""
    kept, missing = [], set()
    for item in items:
        sid = resolve(image_of(item))
        if sid is None:
            missing.add(str(image_of(item)))
            continue
        kept.append((item, sid))
    if missing:
        example = ", ".join(sorted(missing)[:3])
        logger.warning("%s: %d %s skipped: %d image id(s) not in the feature store (e.g. %s)",
                       source, len(items) - len(kept), what, len(missing), example)
    if items and not kept:
        raise DataError(f"{source}: none of the {len(items)} {what} has an image in the feature store")
    return kept


def tokenizer_directory(data: FinetuneDataConfig, model_config: ModelConfig) -> str:
    """`data.tokenizer`, else `model.text_init`, else `model.init` when it holds vocab.txt; none is a ConfigError."""
    directory = data.tokenizer or getattr(model_config, "text_init", None)
    init = getattr(model_config, "init", None)
    if not directory and init and (Path(init) / "vocab.txt").is_file():  # a converted dir with its tokenizer
        directory = init
    if not directory:
        raise ConfigError("data.tokenizer: set a local BERT tokenizer directory (or model.text_init)")
    return directory


def build_task_model(model_config: ModelConfig, **config_overrides: Any) -> nn.Module:
    """A `ViLBertForVLTasks` from `model_config.init` (a checkpoint directory) or from the preset.

    `config_overrides` (e.g. num_labels for the VQA vocabulary) are applied either way; a checkpoint whose head
    shapes differ (a pretraining checkpoint, another vocabulary) keeps every matching weight and starts the
    mismatched heads fresh, with a log line naming them.
    """
    from vilbert import ViLBertConfig, ViLBertForVLTasks

    labels = {key: config_overrides[key] for key in ("id2label", "label2id") if key in config_overrides}
    settings = {key: value for key, value in config_overrides.items() if key not in labels}
    if "id2label" in labels:
        settings["num_labels"] = len(labels["id2label"])
    if model_config.init:
        directory = Path(model_config.init)
        if not (directory / "config.json").is_file():
            raise ConfigError(f"model.init: {directory} has no config.json (a save_pretrained directory)")
        config = ViLBertConfig.from_pretrained(str(directory))
        for key, value in {**model_config.overrides, **settings}.items():
            setattr(config, key, value)
        config.update(labels)
        model, info = ViLBertForVLTasks.from_pretrained(
            str(directory), config=config, ignore_mismatched_sizes=True, output_loading_info=True
        )
        fresh = sorted({key.split(".")[0] for key in info.get("missing_keys", [])}
                       | {str(m[0]).split(".")[0] for m in info.get("mismatched_keys", [])})
        if fresh:
            logger.info("initialised from %s; fresh: %s", directory, ", ".join(fresh))
        return model
    config = ViLBertConfig.from_preset(model_config.preset, **{**model_config.overrides, **settings})
    config.update(labels)
    model = ViLBertForVLTasks(config)
    if getattr(model_config, "text_init", None):
        from vilbert.convert import init_text_stream_from_bert

        init_text_stream_from_bert(model, model_config.text_init)
    return model


def task_ids_for(model: nn.Module, task: str, batch_size: int, device: torch.device) -> torch.Tensor | None:
    """[B, 1] 12-in-1 task ids when the model has task tokens, else None."""
    config = getattr(model, "config", None)
    if config is None or not getattr(config, "task_specific_tokens", False):
        return None
    return torch.full((batch_size, 1), TASK_TOKEN_IDS[task], dtype=torch.long, device=device)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's (first) parameters."""
    return next(model.parameters()).device


MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "region_features", "region_locations", "region_mask")


def model_inputs(batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    return {key: batch[key] for key in MODEL_INPUTS}


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode for the block, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def eval_batches(model: nn.Module, dataset: Dataset, collate: Callable, batch_size: int,
                 progress: Callable | None = None) -> Iterator[dict[str, Any]]:
    """A split's batches in order, on the model's device, with the model in eval mode while they are read."""
    from tasks.trainer import move_to_device

    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    device = model_device(model)
    with eval_mode(model):
        for batch in progress(loader) if progress else loader:
            yield move_to_device(batch, device)


def open_feature_store(paths: list[str], key: str = "data.features") -> FeatureStore:
    """The feature store over `paths` (joined by image id); an empty list is a ConfigError naming `key`."""
    from features.store import FeatureStore

    if not paths:
        raise ConfigError(f"{key}: name the feature store file(s)")
    return FeatureStore(paths)


class FinetuneTask(Task):
    """What the fine-tuning tasks share: their config, the tokenizer (loaded once) and the task model."""

    config_class: type

    def __init__(self, config: Any):
        self.config = config
        self.data = config.data
        self._tokenizer = None

    def tokenizer(self) -> Tokenizer:
        """The BERT tokenizer of `data.tokenizer` (default `model.text_init`), loaded on first use."""
        if self._tokenizer is None:
            from tasks.tokenization import load_tokenizer

            self._tokenizer = load_tokenizer(tokenizer_directory(self.data, self.config.model))
        return self._tokenizer

    def build_model(self) -> nn.Module:
        return build_task_model(self.config.model)
