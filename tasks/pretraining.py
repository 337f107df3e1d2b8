"""Pretraining on image-caption pairs: masked language modelling, masked region classification, alignment.

Masking follows vilbert-multi-task's pretraining loader and runs in DataLoader workers, seeded per sample from
(seed, epoch, index), so a run is reproducible and a resumed run sees the same masks:
- text: each caption token (not [CLS], [SEP] or padding) is selected with p = 0.15; a selected token becomes
  [MASK] (80 %), a uniformly random id (10 %) or stays (10 %); its label is the original id, others -100;
- regions: each real region (never the IMG token, never padding) is selected with p = 0.15; its feature is
  zeroed (90 %) or kept (10 %); region_labels is 1 at selected regions, else -100; the target is the region's
  detector class distribution (`cls_prob`). The IMG feature is the vilbert-multi-task pretraining mean
  (`tasks.data.regions.masked_image_mean`: masked features included as zeros, denominator = regions clear of masking);
- alignment: with p = 0.5 the caption is swapped for a caption of another image (label 1 = mismatched,
  0 = aligned). The reference draws from all captions without a check; we redraw until the image differs so
  that label 1 is never an aligned pair. `data.negatives: image` swaps the image instead (the same kind of
  mismatched pair); each sample then keeps its own caption, which lets length-grouped batches
  (`train.group_by_length`) stay short.
Objectives (vilbert-multi-task `--objective`): 0 = all losses on all pairs; 1 = mismatched pairs carry no MLM or
region labels; 2 = no negatives and the alignment loss weighted 0.
`data.contrastive_weight` > 0 adds the dual encoder's symmetric InfoNCE (`tasks.ranking.contrastive`) over the batch's
aligned pairs, the other aligned pairs of the global batch as negatives (inputs as masked for the other losses).

Grounded captions (phrases with boxes, relation words; tasks.data.captions) add three options, ours, for models that
must read where things are (the GQA-style relation checks):
- `data.geometry_weight` > 0: in aligned pairs, each phrase's head word regresses its box centre and each relation
  word its subject's centre minus its object's (tasks.data.caption_geometry), from the text stream's output through
  `GeometryHead`, squared error times the weight;
- `data.mask_relations`: the relation words of aligned pairs are always masked (and predicted), besides BERT's 15 %;
- `data.hard_negatives` = p: a mismatched pair is, with odds p, the image with its caption's `false_caption`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from features.store import FeatureStore
from tasks.data.caption_geometry import NO_GEOMETRY, geometry_targets, geometry_tokens
from tasks.data.captions import Caption, join_with_store, load_captions
from tasks.data.regions import (
    VisualInput,
    batch_zeros,
    build_visual_input,
    collate_visual,
    masked_image_mean,
    visual_input,
    visual_rows,
)
from tasks.data.tokenization import TextInput, Tokenizer, load_tokenizer
from tasks.engine.config import OptimConfig, TrainConfig
from tasks.engine.distributed import move_to_device, unwrap
from tasks.engine.evaluation import model_device
from tasks.engine.padding import MODEL_PADDED_KEYS, REGIONS, TEXT
from tasks.engine.run_record import PRETRAINING, store_extractors
from tasks.engine.sampler import length_order
from tasks.engine.task import ExampleInputs, PredictExample, StepOutput, Task, TaskDataset
from tasks.errors import ConfigError, DataError
from tasks.finetuning import ModelConfig, model_parameter_groups
from tasks.metrics import recall_at_k
from tasks.ranking.contrastive import contrastive_loss, dual_overrides
from tasks.ranking.search import (
    CoattentionScorer,
    RankedCaptionsView,
    rank_captions,
)
from vilbert import ViLBertConfig, ViLBertForPreTraining
from vilbert.convert import init_text_stream_from_bert

logger = logging.getLogger(__name__)

TEXT_MASK_PROB = 0.15
REGION_MASK_PROB = 0.15
NEGATIVE_PROB = 0.5
IGNORE = -100


@dataclasses.dataclass
class PretrainingDataConfig:
    train_features: list[str] | str | None = None  # one store or several joined (features.store.FeatureStore)
    train_captions: str | None = None
    val_features: list[str] | str | None = None
    val_captions: str | None = None
    tokenizer: str | None = None  # local BERT directory; defaults to model.text_init
    lowercase: bool = True
    max_text_length: int = 36  # [CLS] + 34 word pieces + [SEP]
    max_regions: int = 37  # IMG token + 36 boxes
    objective: int = 1
    contrastive_weight: float = 0.0  # > 0: add weight × InfoNCE of the dual encoder (ours, not the reference's)
    negatives: str = "caption"  # mismatched pairs swap the caption (reference) or the image
    strict: bool = False  # missing image ids are an error instead of a warning
    eval_batch_size: int = 64
    retrieval_images: int = 100  # images (with their captions) in the zero-shot retrieval evaluation
    retrieval_chunk: int = 500  # images scored per forward against one cached caption
    geometry_weight: float = 0.0  # > 0: phrases regress their box centres, relation words their offsets
    mask_relations: bool = False  # always mask the relation words of aligned grounded captions
    hard_negatives: float = 0.0  # odds that a mismatched pair is the image with its caption's false_caption

    def validate(self) -> None:
        if self.geometry_weight < 0:
            raise ConfigError(f"data.geometry_weight must be >= 0, got {self.geometry_weight}")
        if not 0 <= self.hard_negatives <= 1:
            raise ConfigError(f"data.hard_negatives must be in [0, 1], got {self.hard_negatives}")
        if self.objective not in (0, 1, 2):
            raise ConfigError(f"data.objective must be 0, 1 or 2, got {self.objective}")
        if self.contrastive_weight < 0:
            raise ConfigError(f"data.contrastive_weight must be >= 0, got {self.contrastive_weight}")
        if self.negatives not in ("caption", "image"):
            raise ConfigError(f"data.negatives must be 'caption' or 'image', got {self.negatives!r}")
        if self.max_text_length < 3:
            raise ConfigError(f"data.max_text_length must be >= 3, got {self.max_text_length}")
        if self.max_regions < 2:
            raise ConfigError(f"data.max_regions must be >= 2 (IMG + one box), got {self.max_regions}")


@dataclasses.dataclass
class PretrainConfig:
    """The `vilbert pretrain` run config (tasks/configs/pretrain_*.yaml)."""

    task: str = "pretrain"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: PretrainingDataConfig = dataclasses.field(default_factory=PretrainingDataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)

    def validate(self) -> None:
        if self.task != "pretrain":
            raise ConfigError(f"task must be 'pretrain' for vilbert pretrain, got {self.task!r}")
        if self.data.tokenizer is None and self.model.text_init is None:
            raise ConfigError("data.tokenizer: needed (a local BERT directory) when model.text_init is not set")


# ------------------------------------------------------------------------------------------------------- masking


def mask_text(
    input_ids: np.ndarray, tokenizer: Tokenizer, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """BERT masking of one `[L]` id row → (masked ids, labels with -100 where nothing is predicted)."""
    ids = input_ids.copy()
    labels = np.full_like(ids, IGNORE)
    candidates = (ids != tokenizer.cls_id) & (ids != tokenizer.sep_id) & (ids != tokenizer.pad_id)
    selected = candidates & (rng.random(len(ids)) < TEXT_MASK_PROB)
    labels[selected] = ids[selected]
    action = rng.random(len(ids))
    ids[selected & (action < 0.8)] = tokenizer.mask_id
    randomised = selected & (action >= 0.8) & (action < 0.9)
    ids[randomised] = rng.integers(0, tokenizer.vocab_size, size=int(randomised.sum()))
    return ids, labels


def mask_regions(num_regions: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Region selection for `num_regions` real boxes → (selected [K] bool, zeroed [K] bool ⊆ selected)."""
    selected = rng.random(num_regions) < REGION_MASK_PROB
    zeroed = selected & (rng.random(num_regions) < 0.9)
    return selected, zeroed


# ------------------------------------------------------------------------------------------------------- dataset


def _open_store(paths):
    return FeatureStore(paths)


class PretrainingDataset(TaskDataset):
    """Image-caption pairs joined with a feature store that has `cls_prob`; `sample(index, epoch)` masks."""

    def __init__(
        self,
        captions: list[Caption],
        store,
        tokenizer: Tokenizer,
        max_text_length: int = 36,
        max_regions: int = 37,
        objective: int = 1,
        seed: int = 0,
        negatives: str = "caption",
        geometry: bool = False,
        mask_relations: bool = False,
        hard_negatives: float = 0.0,
    ):
        if "cls_prob" not in store.optional:
            raise DataError(f"{', '.join(store.paths)}: the feature store has no cls_prob (masked-region targets)")
        self.captions, self.store, self.tokenizer = captions, store, tokenizer
        self.max_text_length, self.max_regions = max_text_length, max_regions
        self.objective, self.seed, self.negatives = objective, seed, negatives
        self.text = tokenizer.encode([c.text for c in captions], max_text_length).input_ids.astype(np.int32)
        self.text_lengths = (self.text != tokenizer.pad_id).sum(1)  # [N] tokens per caption, for length grouping
        image_ids = [c.image_id for c in captions]
        self.image_index = np.unique(image_ids, return_inverse=True)[1]  # [N] image number per caption
        self.region_counts = visual_rows(store, [(i,) for i in image_ids], max_regions)  # [N] the own image's rows
        self.geometry, self.mask_relations, self.hard_negatives = geometry, mask_relations, hard_negatives
        grounded = geometry or mask_relations
        self.geometry_tokens = [geometry_tokens(c, tokenizer, max_text_length) if grounded else NO_GEOMETRY
                                for c in captions]
        false = [i for i, c in enumerate(captions) if c.false_caption is not None] if hard_negatives > 0 else []
        false_text = tokenizer.encode([captions[i].false_caption for i in false], max_text_length).input_ids if false \
            else []
        self.false_text = {i: ids.astype(np.int32) for i, ids in zip(false, false_text, strict=True)}

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self.sample(index, 0)

    def _negative(self, index: int, rng: np.random.Generator) -> int:
        if self.image_index.max() == 0:
            return index  # a single image: no mismatched caption exists
        while True:
            other = int(rng.integers(len(self.captions)))
            if self.image_index[other] != self.image_index[index]:
                return other

    def sample(self, index: int, epoch: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch, index])
        caption_index = image_index = index
        ids = None
        if self.objective != 2 and rng.random() < NEGATIVE_PROB:
            if index in self.false_text and np.random.default_rng([self.seed, epoch, index, 1]).random() < \
                    self.hard_negatives:
                ids = self.false_text[index].astype(np.int64)  # the own image, its caption made false
            else:
                other = self._negative(index, rng)
                if self.negatives == "caption":
                    caption_index = other
                else:
                    image_index = other
        mismatched = int(ids is not None or caption_index != image_index)
        if ids is None:
            ids = self.text[caption_index].astype(np.int64)
        masked_ids, mlm_labels = mask_text(ids, self.tokenizer, rng)
        geometry = self.geometry_tokens[index] if not mismatched else NO_GEOMETRY
        if self.mask_relations:
            masked_ids[geometry.relation_tokens] = self.tokenizer.mask_id
            mlm_labels[geometry.relation_tokens] = ids[geometry.relation_tokens]

        regions = self.store.read(self.captions[image_index].image_id, float32=False, optional=("cls_prob",))
        if regions.cls_prob is None:
            raise DataError(f"image {regions.image_id!r}: the feature store has no cls_prob (masked-region targets)")
        keep = min(len(regions), self.max_regions - 1)
        features, boxes = regions.features[:keep].copy(), regions.boxes[:keep]
        selected, zeroed = mask_regions(keep, rng)
        features[zeroed] = 0.0
        visual = build_visual_input(
            features, boxes, regions.image_hw, self.max_regions,
            image_feature=masked_image_mean(features, boxes, selected),
        )
        region_labels = np.full(keep + 1, IGNORE, dtype=np.int64)
        region_labels[1:][selected] = 1
        region_targets = np.zeros((keep + 1, regions.cls_prob.shape[1]), dtype=regions.cls_prob.dtype)
        region_targets[1:] = regions.cls_prob[:keep]

        if self.objective == 1 and mismatched:
            mlm_labels[:] = IGNORE
            region_labels[:] = IGNORE
        sample = {
            "input_ids": masked_ids,
            "attention_mask": (ids != self.tokenizer.pad_id).astype(np.int64),
            "token_type_ids": np.zeros_like(ids),
            "mlm_labels": mlm_labels,
            "visual": visual,
            "region_labels": region_labels,
            "region_targets": region_targets,
            "alignment_labels": np.int64(mismatched),
        }
        if self.geometry:
            sample["phrase_centres"], sample["relation_offsets"] = geometry_targets(geometry, regions.image_hw, len(ids))
        return sample


# the batch keys along the text and region axes: labels pad with -100 (ignored), region targets with 0, the geometry
# targets with NaN (no target)
PRETRAINING_PADDED_KEYS = {**MODEL_PADDED_KEYS, "mlm_labels": (TEXT, IGNORE), "region_labels": (REGIONS, IGNORE),
                           "region_targets": (REGIONS, 0), "phrase_centres": (TEXT, float("nan")),
                           "relation_offsets": (TEXT, float("nan"))}
GEOMETRY_KEYS = ("phrase_centres", "relation_offsets")  # the geometry objective's targets, not model inputs


def collate_pretraining(samples: list[dict]) -> dict[str, torch.Tensor | tuple[int, int]]:
    """Stack text and pad the visual side, both to the batch's longest item; region labels pad with -100."""
    width = max(int(s["attention_mask"].sum()) for s in samples)
    batch = {k: torch.from_numpy(np.stack([s[k][:width] for s in samples]))
             for k in ("input_ids", "attention_mask", "token_type_ids", "mlm_labels", *GEOMETRY_KEYS) if k in samples[0]}
    batch.update(collate_visual([s["visual"] for s in samples]))
    regions = batch["region_mask"].shape[1]
    classes = samples[0]["region_targets"].shape[1]
    labels = np.full((len(samples), regions), IGNORE, dtype=np.int64)
    dtype = torch.from_numpy(samples[0]["region_targets"][:0]).dtype  # float16 as stored
    batch["region_targets"] = batch_zeros((len(samples), regions, classes), dtype)
    targets = batch["region_targets"].numpy()
    for i, s in enumerate(samples):
        labels[i, : len(s["region_labels"])] = s["region_labels"]
        targets[i, : len(s["region_targets"])] = s["region_targets"]
    batch["region_labels"] = torch.from_numpy(labels)
    batch["alignment_labels"] = torch.tensor([int(s["alignment_labels"]) for s in samples], dtype=torch.int64)
    # counted here on the host so the model's forward needs no device sync to size its labelled gathers
    batch["labelled_counts"] = (int((batch["mlm_labels"] != IGNORE).sum()), int((labels == 1).sum()))
    return batch


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The batch without the geometry objective's targets (the model takes the rest)."""
    return {key: value for key, value in batch.items() if key not in GEOMETRY_KEYS}


class GeometryHead(nn.Module):
    """Two linear maps of the text stream's output: a phrase head word's box centre, a relation word's centre
    difference (`data.geometry_weight`; pretraining only, fine-tuning drops it)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.phrase = nn.Linear(hidden_size, 2)
        self.relation = nn.Linear(hidden_size, 2)

    def forward(self, text_hidden: torch.Tensor, phrase_centres: torch.Tensor,
                relation_offsets: torch.Tensor) -> tuple[tuple[torch.Tensor, int], tuple[torch.Tensor, int]]:
        """(squared error summed over the labelled tokens, their count) for the phrases, then the relations."""
        out = []
        for layer, targets in ((self.phrase, phrase_centres), (self.relation, relation_offsets)):
            labelled = torch.isfinite(targets[..., 0])
            predicted = layer(text_hidden[labelled])
            out.append((((predicted - targets[labelled]) ** 2).sum(), int(labelled.sum())))
        return out[0], out[1]


# ---------------------------------------------------------------------------------------------------------- task


class PretrainingTask(RankedCaptionsView, Task):
    """Masked multimodal pretraining for the shared trainer."""

    name = "pretrain"
    main_metric = "mlm_accuracy"
    higher_is_better = True
    config_class = PretrainConfig
    predict_modes = ("captions",)  # zero-shot, by the alignment head
    example_inputs = ExampleInputs(None, "captions", example_text="a red circle")
    pretraining_zero_shot = True
    padded_keys = PRETRAINING_PADDED_KEYS

    def __init__(self, config: PretrainConfig):
        self.config = config
        data = config.data
        self.tokenizer = load_tokenizer(data.tokenizer or config.model.text_init, lowercase=data.lowercase)
        self._datasets: dict[str, PretrainingDataset] = {}

    @property
    def max_regions(self) -> int:
        return self.config.data.max_regions

    def _sources(self, split: str) -> tuple[list[str] | str | None, str | None]:
        """(features, captions) of the configured split ("train" or "val"); captions None when not configured."""
        data = self.config.data
        return {"train": (data.train_features, data.train_captions),
                "val": (data.val_features, data.val_captions)}.get(split, (None, None))

    def run_record(self) -> dict[str, Any]:
        """The extractors of the train and val stores; the pretraining architecture."""
        paths = []
        for split in ("train", "val"):
            features, captions = self._sources(split)
            if captions is not None and features is not None:
                paths += [features] if isinstance(features, str) else list(features)
        return {"task": self.name, "task_token": None, "feature_extractor": store_extractors(paths),
                "architecture": PRETRAINING}

    def _build_dataset(self, features, captions_path, split: str) -> PretrainingDataset:
        data = self.config.data
        if features is None:
            raise ConfigError(f"data.{split}_features: needed with data.{split}_captions")
        store = _open_store(features)
        captions = join_with_store(load_captions(captions_path), store, str(captions_path), strict=data.strict)
        seed = self.config.train.seed if split == "train" else self.config.train.seed + 1
        needs = {"data.geometry_weight": data.geometry_weight > 0 and not any(c.phrases for c in captions),
                 "data.mask_relations": data.mask_relations and not any(c.relations for c in captions),
                 "data.hard_negatives": data.hard_negatives > 0 and not any(c.false_caption for c in captions)}
        for key, missing in needs.items():
            if missing and split == "train":  # held-out pairs are scored without the new objectives
                raise ConfigError(f"{key}: {captions_path} has no grounded captions for it (phrases, relations or "
                                  "false_caption; see tasks.data.captions)")
        return PretrainingDataset(captions, store, self.tokenizer, data.max_text_length, data.max_regions,
                                  data.objective, seed=seed, negatives=data.negatives,
                                  geometry=data.geometry_weight > 0, mask_relations=data.mask_relations,
                                  hard_negatives=data.hard_negatives)

    def dataset(self, split: str) -> PretrainingDataset:
        """The split's captions joined with its store, built on first use (and checked then)."""
        if split not in self._datasets:
            features, captions = self._sources(split)
            if captions is None:
                raise ConfigError(f"data.{split}_captions: no {split} data configured")
            self._datasets[split] = self._build_dataset(features, captions, split)
        return self._datasets[split]

    def build_model(self) -> nn.Module:
        model_config = self.config.model
        dual = dual_overrides(model_config, self.config.data.contrastive_weight)
        if model_config.init is not None:
            model = ViLBertForPreTraining.from_pretrained(model_config.init, **dual)
        else:
            model = ViLBertForPreTraining(
                ViLBertConfig.from_preset(model_config.preset, **{**model_config.overrides, **dual}))
            if model_config.text_init is not None:
                init_text_stream_from_bert(model, model_config.text_init)
        if self.config.data.geometry_weight > 0:
            model.geometry_head = GeometryHead(model.config.hidden_size)
        self._check_model(model.config)
        return model

    def _check_model(self, config) -> None:
        if self.tokenizer.vocab_size > config.vocab_size:
            raise ConfigError(
                f"{self.tokenizer.directory}: the tokenizer has {self.tokenizer.vocab_size} ids but the model's "
                f"vocab_size is {config.vocab_size}"
            )
        # the data is joined and checked here, so that missing images or a bad store fail before training starts
        for split in ("train", "val"):
            if self._sources(split)[1] is None:
                continue
            store = self.dataset(split).store
            if store.feature_dim != config.v_feature_size:
                raise ConfigError(f"data.{split}_features: features are {store.feature_dim}-d but the model's "
                                  f"v_feature_size is {config.v_feature_size}")
            if store.optional["cls_prob"] != config.v_target_size:
                raise ConfigError(f"data.{split}_features: cls_prob has {store.optional['cls_prob']} classes but "
                                  f"the model's v_target_size is {config.v_target_size}")

    def parameter_groups(self, model: nn.Module, optim: OptimConfig) -> list[dict]:
        return model_parameter_groups(model, optim)

    def collate(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        return collate_pretraining(samples)

    @property
    def alignment_weight(self) -> float:
        """Objective 2 trains without negatives: its alignment term is weighted 0."""
        return 0.0 if self.config.data.objective == 2 else 1.0

    def label_counts(self, batch: Mapping[str, Any]) -> dict[str, int]:
        """Masked tokens, masked regions and pairs: the items each objective averages over."""
        tokens, regions = batch["labelled_counts"]
        counts = {"mlm": tokens, "region": regions, "alignment": len(batch["alignment_labels"])}
        if self.config.data.geometry_weight > 0:
            counts.update({key: int(torch.isfinite(batch[key][..., 0]).sum()) for key in GEOMETRY_KEYS})
        if self.config.data.contrastive_weight > 0:
            # InfoNCE is already the mean over the aligned pairs of the whole global batch (its embeddings are
            # gathered over ranks): one item per micro-batch, so every rank holds the same share of it, which the
            # gather's world-size gradient scaling assumes (tasks.ranking.contrastive)
            counts["contrastive"] = 1
        return counts

    def training_step(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> StepOutput:
        """L_mlm + L_region + L_alignment as sums (the alignment term weighted 0 under objective 2), plus the dual
        encoder's InfoNCE over the aligned pairs when `data.contrastive_weight` > 0."""
        weight = self.config.data.contrastive_weight
        out = model(**model_inputs(batch), dual=weight > 0)
        tokens, regions = batch["labelled_counts"]
        loss_sums = {  # the model's means times the micro-batch's counts
            "mlm": out.mlm_loss * tokens,
            "region": out.region_loss * regions,
            "alignment": self.alignment_weight * out.alignment_loss * len(batch["alignment_labels"]),
        }
        metrics = {
            "mlm_loss": out.mlm_loss.detach(),
            "region_loss": out.region_loss.detach(),
            "alignment_loss": out.alignment_loss.detach(),
        }
        if weight > 0:
            aligned = batch["alignment_labels"] == 0
            contrastive = contrastive_loss(out.text_embeds, out.image_embeds, out.logit_scale, aligned)
            loss_sums["contrastive"] = weight * contrastive  # one item (see label_counts)
            metrics["contrastive_loss"] = contrastive.detach()
        if self.config.data.geometry_weight > 0:
            # DDP reduces the head's gradients too (hooks on every parameter of the wrapped module)
            errors = unwrap(model).geometry_head(out.text_hidden, batch["phrase_centres"], batch["relation_offsets"])
            for key, (error_sum, count) in zip(GEOMETRY_KEYS, errors, strict=True):
                loss_sums[key] = self.config.data.geometry_weight * error_sum
                metrics[f"{key}_error"] = (error_sum / max(count, 1)).detach()
        return StepOutput(loss_sums, metrics)

    # ------------------------------------------------------------------------------------------------ evaluation

    def predict(self, model: nn.Module, split: str, progress: Callable | None = None) -> dict[str, Any]:
        """Held-out outcomes: correct and labelled counts per masked objective, the loss sum, and the zero-shot
        retrieval scores (each caption against the held-out images) with each caption's own image."""
        if self._sources(split)[1] is None:
            return {}
        dataset = self.dataset(split)
        outcomes = {**self._masked_counts(model, dataset), **self._zero_shot_scores(model, dataset)}
        if model.vilbert.dual is not None:
            outcomes.update(self._dual_scores(model, dataset))
        return outcomes

    def score(self, predictions: Mapping[str, Any], split: str) -> dict[str, float]:
        """Masked-objective accuracies and the loss on held-out pairs, zero-shot image retrieval R@1/5/10."""
        if not predictions:
            return {}

        correct, counts = predictions["correct"], predictions["counts"]
        pairs = max(counts[2], 1)
        metrics = {  # accuracies in percent, like the retrieval recalls
            "loss": predictions["loss_sum"] / pairs,
            "mlm_accuracy": 100.0 * correct[0] / max(counts[0], 1),
            "region_accuracy": 100.0 * correct[1] / max(counts[1], 1),
            "alignment_accuracy": 100.0 * correct[2] / pairs,
        }
        if predictions.get("retrieval_scores"):
            recall = recall_at_k(torch.tensor(predictions["retrieval_scores"]), predictions["retrieval_positives"])
            metrics.update({f"retrieval_{k}": v for k, v in recall.items() if k in ("r1", "r5", "r10")})
        if predictions.get("dual_scores"):
            recall = recall_at_k(torch.tensor(predictions["dual_scores"]), predictions["retrieval_positives"])
            metrics.update({f"retrieval_dual_{k}": v for k, v in recall.items() if k in ("r1", "r5", "r10")})
        return metrics

    @torch.no_grad()
    def _masked_counts(self, model: nn.Module, dataset: PretrainingDataset) -> dict[str, Any]:
        device = model_device(model)
        size = self.config.data.eval_batch_size
        correct = torch.zeros(3, dtype=torch.float64, device=device)  # MLM, region, alignment
        counts = np.zeros(3, dtype=np.int64)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        order = length_order(dataset)  # similar captions and images together: short batches (sums need no order)
        for start in range(0, len(dataset), size):
            samples = [dataset.sample(int(i), 0) for i in order[start : start + size]]
            batch = move_to_device(self.collate(samples), device)
            out = model(**model_inputs(batch))
            mlm_targets = batch["mlm_labels"][batch["mlm_labels"] != IGNORE]
            region_teacher = batch["region_targets"][batch["region_labels"] == 1].argmax(-1)
            correct += torch.stack([
                (out.mlm_logits.argmax(-1) == mlm_targets).sum(),
                (out.region_logits.argmax(-1) == region_teacher).sum(),
                (out.alignment_logits.argmax(-1) == batch["alignment_labels"]).sum(),
            ]).double()
            counts += [mlm_targets.numel(), region_teacher.numel(), len(samples)]
            mean = out.mlm_loss + out.region_loss + self.alignment_weight * out.alignment_loss
            loss_sum += mean.double() * len(samples)
        return {"correct": correct.tolist(), "counts": counts.tolist(), "loss_sum": loss_sum.item()}

    def _held_out_ranking(self, dataset: PretrainingDataset) -> tuple[list[int], list[int], list[VisualInput]]:
        """The zero-shot retrieval evaluation's queries (caption rows), each one's image position, and the first
        `data.retrieval_images` images of the split; no queries when fewer than 2 images."""
        data = self.config.data
        image_ids = list(dict.fromkeys(c.image_id for c in dataset.captions))[: data.retrieval_images]
        if len(image_ids) < 2:
            return [], [], []
        position = {image_id: i for i, image_id in enumerate(image_ids)}
        queries = [i for i, c in enumerate(dataset.captions) if c.image_id in position]
        positives = [position[dataset.captions[i].image_id] for i in queries]
        return queries, positives, [visual_input(dataset.store.read(i), data.max_regions) for i in image_ids]

    @torch.no_grad()
    def _zero_shot_scores(self, model: nn.Module, dataset: PretrainingDataset) -> dict[str, Any]:
        """Each held-out caption ranks the held-out images by softmax(alignment_logits)[:, 0] (the co-attention
        scorer: the text stream runs once per caption, expanded over chunks of images)."""
        queries, positives, visuals = self._held_out_ranking(dataset)
        if not queries:
            return {}
        ids = dataset.text.astype(np.int64)
        text = TextInput(ids, (ids != self.tokenizer.pad_id).astype(np.int64), np.zeros_like(ids))
        data = self.config.data
        scorer = CoattentionScorer(model, text, visuals, batch_size=data.retrieval_chunk, pad_to=data.max_regions)
        return {"retrieval_scores": scorer.matrix(queries).tolist(), "retrieval_positives": positives}

    @torch.no_grad()
    def _dual_scores(self, model: nn.Module, dataset: PretrainingDataset) -> dict[str, Any]:
        """The same captions against the same images as `_zero_shot_scores`, scored by the dual encoder's cosine."""
        queries, _, visuals = self._held_out_ranking(dataset)
        if not queries:
            return {}
        device = model_device(model)
        visual = collate_visual(visuals, pad_to=self.config.data.max_regions)
        images = model.encode_image(**{k: v.to(device) for k, v in visual.items()})  # [I, E]
        width = int(dataset.text_lengths[queries].max())
        ids = torch.from_numpy(dataset.text[queries, :width].astype(np.int64)).to(device)  # [Q, L]
        texts = model.encode_text(ids, (ids != self.tokenizer.pad_id).long())  # [Q, E]
        return {"dual_scores": (texts @ images.T).cpu().tolist()}

    # ------------------------------------------------------------------------------------------------ one image

    def predict_one(self, model: nn.Module, example: PredictExample) -> dict[str, Any]:
        """The captions ranked zero-shot by P(aligned) from the alignment head (as retrieval would rank them)."""
        return rank_captions(model, self.tokenizer, example, self.config.data.max_text_length)
