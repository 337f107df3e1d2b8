"""Image-text retrieval (Flickr30k, COCO): Karpathy-split or JSON-lines annotations, 4-way training, recall@K.

Annotations: the Karpathy split file (`dataset_flickr30k.json` / `dataset_coco.json`: images[] with split,
filename, imgid or cocoid, sentences[].raw; COCO's "restval" counts as train), or the reference's JSON-lines
files (`all_data_final_*.jsonline`, one image per line with img_path or id, and sentences), one per split.
Image ids: COCO's cocoid / id; otherwise the file stem of filename / img_path.

Training (as vilbert-multi-task): each sample is 4 (image, caption) pairs scored by `pair_logit`, cross-entropy with
target 0: the true pair; the image with a random other image's caption; a random other image with the caption;
the image with a caption of a hard-negative image. Hard negatives are drawn from a pool file (JSON
{image_id: [neighbour image ids, nearest first]}, `data.hard_negatives`), which
`vilbert evaluate --task retrieval --split train --hard-negatives OUT.json` computes from a model's scores;
without a pool the fourth option is a second random caption.

Evaluation: every caption of the split against every image. The text stream before the first co-attention is
computed once per caption (`encode_text_prefix`) and the images are scored in chunks of `eval_batch_size`.
Caption→image and image→caption R@1/5/10, median and mean rank (`tasks.metrics.recall_at_k`, pessimistic ties).
A pretraining checkpoint (`ViLBertForPreTraining`) scores zero-shot with softmax(alignment_logits)[:, 0].
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from features.store import FeatureStore
from tasks.data.annotations import (
    id_field,
    image_key_resolver,
    keep_known_images,
    list_field,
    load_json,
    require,
    str_field,
)
from tasks.data.reference_files import read_hard_negatives
from tasks.data.regions import collate_visual, visual_input, visual_rows
from tasks.engine.evaluation import eval_mode
from tasks.engine.padding import cut_to_longest
from tasks.engine.task import ExampleInputs, PredictExample, StepOutput, TaskDataset
from tasks.errors import AnnotationError, ConfigError
from tasks.finetuning import (
    FinetuneConfig,
    FinetuneDataConfig,
    FinetuneTask,
    build_task_model,
    resolve_split,
    task_token_id,
)
from tasks.metrics import mean_recall, recall_both_ways
from tasks.ranking.contrastive import contrastive_loss, dual_overrides
from tasks.ranking.search import (
    CoattentionScorer,
    RankedCaptionsView,
    rank_both_ways,
    rank_captions,
)

logger = logging.getLogger(__name__)


@dataclass
class RetrievalImage:
    image_id: str
    captions: list[str]


def _image_id(entry: Mapping, source: str, where: str) -> str:
    for key in ("cocoid", "id"):
        if key in entry:
            return str(id_field(entry, key, source, where))
    for key in ("filename", "img_path"):
        if key in entry:
            return Path(str_field(entry, key, source, where)).stem
    raise AnnotationError(f"{source}: {where} has no image id (cocoid, id, filename or img_path)")


def _captions(entry: Mapping, source: str, where: str) -> list[str]:
    require(entry, ["sentences"], source, where)
    captions = []
    sentences = list_field(entry, "sentences", source, where)
    if not sentences:
        raise AnnotationError(f"{source}: {where} has no captions (sentences is empty)")
    for j, sentence in enumerate(sentences):
        text = sentence.get("raw") if isinstance(sentence, Mapping) else sentence
        if not isinstance(text, str) or not text.strip():
            raise AnnotationError(f"{source}: {where}.sentences[{j}] has no caption text")
        captions.append(text)
    return captions


def read_karpathy(path: str | Path, split: str) -> list[RetrievalImage]:
    """Images of `split` (train includes restval) from a Karpathy split JSON file."""
    data = load_json(path)
    require(data, ["images"], str(path), "the file")
    wanted = {"train", "restval"} if split == "train" else {split}
    images = []
    for i, entry in enumerate(list_field(data, "images", str(path), "the file")):
        require(entry, ["split"], str(path), f"images[{i}]")
        if entry["split"] in wanted:
            images.append(RetrievalImage(_image_id(entry, str(path), f"images[{i}]"),
                                         _captions(entry, str(path), f"images[{i}]")))
    return _unique_images(images, path)


def _unique_images(images: list[RetrievalImage], path: str | Path) -> list[RetrievalImage]:
    """`images`, refusing an image listed twice: ranked twice, it would be its own hard negative and the recalls
    would be computed over a gallery that is not the split's."""
    seen = set()
    for image in images:
        if image.image_id in seen:
            raise AnnotationError(f"{path}: image {image.image_id!r} is listed twice in the split")
        seen.add(image.image_id)
    return images


def read_jsonlines(path: str | Path) -> list[RetrievalImage]:
    """Images of the reference's JSON-lines file (one JSON object per line)."""
    images = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise AnnotationError(f"{path}: cannot read ({error.strerror or error})") from error
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise AnnotationError(f"{path}: line {i + 1} is not valid JSON ({error})") from error
        images.append(RetrievalImage(_image_id(entry, str(path), f"line {i + 1}"),
                                     _captions(entry, str(path), f"line {i + 1}")))
    return _unique_images(images, path)


@dataclass
class RetrievalDataConfig(FinetuneDataConfig):
    max_text_length: int = 30
    annotations: str = "dataset_flickr30k.json"  # Karpathy file, relative to root (or absolute)
    split_files: dict[str, str] = field(default_factory=dict)  # JSON-lines per split; overrides `annotations`
    hard_negatives: str | None = None  # JSON {image_id: [neighbour ids]}, or the reference's hard_negative.pkl
    dataset: str = "flickr30k"  # flickr30k | coco: picks the 12-in-1 task token
    val_split: str = "val"
    contrastive_weight: float = 0.0  # > 0: add weight × the dual encoder's InfoNCE over the batch's true pairs


@dataclass
class RetrievalConfig(FinetuneConfig):
    """An image-text retrieval fine-tuning run (tasks/configs/retrieval.yaml)."""

    data: RetrievalDataConfig = field(default_factory=RetrievalDataConfig)


class RetrievalTrainDataset(TaskDataset):
    """4-way samples: (image, caption), (image, random caption), (random image, caption), (image, hard caption).

    The random draws of `sample(index, epoch)` come from a generator seeded by (seed, epoch, index).
    """

    def __init__(self, images, store, tokenizer, max_text_length, max_regions, hard_pool, source, seed):
        kept = keep_known_images(images, lambda im: im.image_id, image_key_resolver(store.ids), source, "images")
        if len(kept) < 2:
            raise ConfigError(f"{source}: retrieval training needs at least 2 images with features")
        self.images = [im for im, _ in kept]
        self.image_keys = [sid for _, sid in kept]
        self.pairs = [(i, c) for i, im in enumerate(self.images) for c in range(len(im.captions))]
        self.image_ids = [(self.image_keys[i],) for i, _ in self.pairs]  # the positive image of each item
        flat = [caption for im in self.images for caption in im.captions]
        self.caption_start = [0]
        for im in self.images:
            self.caption_start.append(self.caption_start[-1] + len(im.captions))
        self.text = tokenizer.encode(flat, max_text_length)
        position = {im.image_id: i for i, im in enumerate(self.images)}
        self.hard = [[position[str(n)] for n in (hard_pool or {}).get(im.image_id, []) if str(n) in position
                      and str(n) != im.image_id] for im in self.images]
        self.store, self.max_regions, self.seed = store, max_regions, seed
        # the positive pair's lengths (the negatives are drawn per epoch): what length grouping sorts by
        self.text_lengths = self.text.attention_mask[[self.caption_start[i] + c for i, c in self.pairs]].sum(1)
        self.region_counts = visual_rows(store, self.image_ids, max_regions)

    def __len__(self) -> int:
        return len(self.pairs)

    def _caption(self, image: int, rng: np.random.Generator) -> int:
        count = self.caption_start[image + 1] - self.caption_start[image]
        return self.caption_start[image] + int(rng.integers(count))

    def _other_image(self, image: int, rng: np.random.Generator) -> int:
        other = int(rng.integers(len(self.images) - 1))
        return other + (other >= image)

    def __getitem__(self, index: int) -> dict:
        return self.sample(index, 0)

    def sample(self, index: int, epoch: int) -> dict:
        rng = np.random.default_rng([self.seed, epoch, index])
        image, which = self.pairs[index]
        caption = self.caption_start[image] + which
        hard = self.hard[image]
        hard_image = hard[int(rng.integers(len(hard)))] if hard else self._other_image(image, rng)
        options = [(image, caption), (image, self._caption(self._other_image(image, rng), rng)),
                   (self._other_image(image, rng), caption), (image, self._caption(hard_image, rng))]
        visual = {}
        for im, _ in options:
            if im not in visual:
                visual[im] = visual_input(self.store.read(self.image_keys[im], float32=False, optional=()), self.max_regions)
        return {
            "input_ids": torch.from_numpy(self.text.input_ids[[c for _, c in options]]),
            "attention_mask": torch.from_numpy(self.text.attention_mask[[c for _, c in options]]),
            "token_type_ids": torch.from_numpy(self.text.token_type_ids[[c for _, c in options]]),
            "visual": [visual[im] for im, _ in options],
        }


def collate_retrieval(samples: list[dict]) -> dict:
    """[B samples × 4 options] flattened to 4B rows, option-major within a sample."""
    batch = {key: torch.cat([s[key] for s in samples]) for key in ("input_ids", "attention_mask", "token_type_ids")}
    batch.update(collate_visual([v for s in samples for v in s["visual"]]))
    batch["num_options"] = torch.tensor(4)
    return batch


class RetrievalTask(RankedCaptionsView, FinetuneTask):
    """Caption-based image retrieval; main metric: the mean of caption→image R@1, R@5, R@10."""

    name = "retrieval"
    main_metric = "r_mean"
    higher_is_better = True
    config_class = RetrievalConfig
    predict_modes = ("captions",)
    example_inputs = ExampleInputs(None, "captions", example_text="a red circle")
    head = "pair_logit"
    report_metric = "r1"
    metric_labels = {"r1": "R@1 caption->image"}
    pretraining_zero_shot = True
    data: RetrievalDataConfig

    def __init__(self, config: RetrievalConfig):
        super().__init__(config)
        self._store = None

    @property
    def task_token(self) -> str:
        if self.data.dataset not in ("flickr30k", "coco"):
            raise ConfigError(f"data.dataset must be flickr30k or coco, got {self.data.dataset!r}")
        return f"retrieval-{self.data.dataset}"

    def images(self, split: str) -> list[RetrievalImage]:
        split = resolve_split(self.data, split)
        root = Path(self.data.root)
        if self.data.split_files:
            if split not in self.data.split_files:
                raise ConfigError(f"data.split_files has no {split!r} (has {sorted(self.data.split_files)})")
            return read_jsonlines(root / self.data.split_files[split])
        images = read_karpathy(root / self.data.annotations, split)
        if not images:
            raise ConfigError(f"{root / self.data.annotations}: no images in split {split!r}")
        return images

    def store(self) -> FeatureStore:
        if self._store is None:
            self._store = self.open_store(self.data.features)
        return self._store

    def dataset(self, split: str) -> Dataset:
        hard = self.data.hard_negatives
        pool = read_hard_negatives(Path(self.data.root) / hard) if hard else None  # JSON or hard_negative.pkl
        return RetrievalTrainDataset(self.images(split), self.store(), self.tokenizer(), self.data.max_text_length,
                                     self.data.max_regions, pool, f"{self.data.root} ({split})",
                                     seed=self.config.train.seed)

    def collate(self, samples: list) -> dict:
        return cut_to_longest(collate_retrieval(samples), self.padded_keys)

    def build_model(self) -> nn.Module:
        return build_task_model(self.config.model, **dual_overrides(self.config.model, self.data.contrastive_weight))

    def training_step(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> StepOutput:
        inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "token_type_ids", "region_features",
                                              "region_locations", "region_mask")}
        rows = inputs["input_ids"].shape[0]
        ids = self.task_ids(model, rows, inputs["input_ids"].device)
        contrastive = self.data.contrastive_weight > 0
        out = model(**inputs, task_ids=ids, heads=["pair_logit"], dual=contrastive)
        logits = out.pair_logit.view(rows // 4, 4)  # [B, 4]
        target = torch.zeros(rows // 4, dtype=torch.long, device=logits.device)
        loss_sums = {"loss": F.cross_entropy(logits.float(), target, reduction="sum")}
        metrics = {"accuracy": (logits.argmax(dim=1) == 0).float().mean().detach()}
        if contrastive:  # option 0 of each sample is its true pair; the batch's other true pairs are negatives
            info_nce = contrastive_loss(out.text_embeds[::4], out.image_embeds[::4], out.logit_scale)
            loss_sums["loss"] = loss_sums["loss"] + self.data.contrastive_weight * info_nce * (rows // 4)
            metrics["contrastive_loss"] = info_nce.detach()
        return StepOutput(loss_sums, metrics)

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def score_matrix(self, model: nn.Module, images: list[RetrievalImage], captions: list[str],
                     progress: Callable | None = None) -> torch.Tensor:
        """Scores [C, I] of every caption against every image (text prefix computed once per caption)."""
        store = self.store()
        resolve = image_key_resolver(store.ids)
        visuals = [visual_input(store.read(resolve(im.image_id)), self.data.max_regions) for im in images]
        text = self.tokenizer().encode(captions, self.data.max_text_length)
        scorer = CoattentionScorer(model, text, visuals, task_token_id(model, self.task_token),
                                   self.data.eval_batch_size)
        with eval_mode(model):
            return scorer.matrix(progress=progress)

    def predict(self, model: nn.Module, split: str, progress: Callable | None = None) -> dict[str, Any]:
        """{"image_ids", "captions", "caption_image" (each caption's image position), "scores" [C][I]}."""
        kept = keep_known_images(self.images(split), lambda im: im.image_id, image_key_resolver(self.store().ids),
                                 f"{self.data.root} ({split})", "images", self.data.strict)
        images = [im for im, _ in kept]
        captions = [c for im in images for c in im.captions]
        return {
            "image_ids": [im.image_id for im in images],
            "captions": captions,
            "caption_image": [i for i, im in enumerate(images) for _ in im.captions],
            "scores": self.score_matrix(model, images, captions, progress).tolist(),
        }

    def score(self, predictions: Mapping[str, Any], split: str) -> dict[str, float]:
        """Recall@1/5/10 caption → image and image → caption (pessimistic ties), and their mean."""
        images, captions = predictions["image_ids"], predictions["captions"]
        caption_image = predictions["caption_image"]
        scores = torch.tensor(predictions["scores"]).view(len(captions), len(images))  # [C, I]
        metrics = recall_both_ways(scores, scores.T, caption_image)
        return self.over_the_split(metrics, split, len(images), len(captions))

    def over_the_split(self, metrics: dict[str, float], split: str, ranked_images: int,
                       ranked_captions: int) -> dict[str, float]:
        """Recalls over every image and caption of `split`: images without features (and their captions) were not
        ranked, so each counts as a miss at every k (the ranks describe the ranked queries only). Every way of
        ranking (co-attention, `--mode dual`, re-ranked) is scored through here."""
        split_images = self.images(split)
        total_images = max(len(split_images), ranked_images)
        total_captions = max(sum(len(im.captions) for im in split_images), ranked_captions)
        for key in [k for k in metrics if k[0] == "r" and k[1:].isdigit()]:
            metrics[key] *= ranked_captions / total_captions
            metrics[f"i2t_{key}"] *= ranked_images / total_images
        metrics["r_mean"] = mean_recall(metrics)
        metrics["num_images"], metrics["num_captions"] = float(total_images), float(total_captions)
        metrics["num_without_features"] = float(total_images - ranked_images)
        return metrics

    def chance(self, split: str, train: RetrievalTask | None = None) -> dict[str, float]:
        """R@1 of a random ranking: 1 / the number of images."""
        return {"r1": 100 / len(self.images(split))}

    def evaluation(self, model: nn.Module, split: str, progress: Callable | None = None, mode: str | None = None,
                   rerank_k: int = 32) -> tuple[Any, dict[str, Any]]:
        """With a ranking `mode` (`tasks.ranking.search.RANKING_MODES`): both directions ranked that way, with
        queries/s; without one, `predict` then `score`."""
        if mode is None:
            return super().evaluation(model, split, progress)
        metrics, images, scores = evaluate_retrieval(self, model, split, mode, rerank_k, progress)
        metrics = {"mode": mode, **({"rerank_k": rerank_k} if mode == "dual+rerank" else {}), **metrics}
        return {"image_ids": [im.image_id for im in images], "captions": [c for im in images for c in im.captions],
                "scores": scores.tolist()}, metrics

    def hard_negative_pool(self, model: nn.Module, split: str, size: int = 100,
                           progress: Callable | None = None) -> dict[str, list[str]]:
        """{image_id: the `size` other images that score highest with its first caption}, nearest first."""
        kept = keep_known_images(self.images(split), lambda im: im.image_id, image_key_resolver(self.store().ids),
                                 f"{self.data.root} ({split})", "images")
        images = [im for im, _ in kept]
        scores = self.score_matrix(model, images, [im.captions[0] for im in images], progress)  # [I, I]
        scores.fill_diagonal_(float("-inf"))
        top = scores.topk(min(size, len(images) - 1), dim=1).indices
        return {im.image_id: [images[j].image_id for j in row] for im, row in zip(images, top.tolist(), strict=True)}

    # ------------------------------------------------------------------ one image

    def predict_one(self, model: nn.Module, example: PredictExample) -> dict[str, Any]:
        return rank_captions(model, self.tokenizer(), example, self.data.max_text_length,
                             task_token_id(model, self.example_token(example)))


def evaluate_retrieval(task: RetrievalTask, model: nn.Module, split: str, mode: str, rerank_k: int = 32,
                       progress: Callable | None = None) -> tuple[dict[str, float], list, torch.Tensor]:
    """A split in `mode` (`tasks.ranking.search.RANKING_MODES`): the metrics of `RetrievalTask.evaluate` (both
    directions) plus queries per second each way; returns (metrics, images, caption→image scores [C, I])."""
    store = task.store()
    kept = keep_known_images(task.images(split), lambda im: im.image_id, image_key_resolver(store.ids),
                             f"{task.data.root} ({split})", "images")
    images = [im for im, _ in kept]
    captions = [c for im in images for c in im.captions]
    caption_image = [i for i, im in enumerate(images) for _ in im.captions]
    visuals = [visual_input(store.read(key), task.data.max_regions) for _, key in kept]
    with eval_mode(model):
        ranked = rank_both_ways(model, task.tokenizer(), captions, visuals, task.data.max_text_length, mode,
                                rerank_k, task_token_id(model, task.task_token), max(1, task.data.eval_batch_size),
                                progress)
    metrics = recall_both_ways(ranked["text_to_image"], ranked["image_to_text"], caption_image)
    metrics = task.over_the_split(metrics, split, len(images), len(captions))  # unranked images count as misses
    seconds = ranked["seconds"]
    metrics["t2i_queries_per_s"] = len(captions) / max(seconds["text_to_image"], 1e-9)
    metrics["i2t_queries_per_s"] = len(images) / max(seconds["image_to_text"], 1e-9)
    metrics["gallery_seconds"] = seconds["gallery"]
    return metrics, images, ranked["text_to_image"]
