"""Every text-against-image scorer: co-attention with a cached text prefix, the dual encoder, top-K, re-ranking.

Co-attention (`CoattentionScorer`) scores a (caption, image) pair with one forward of the co-attention stack; the
text stream before the first co-attention is computed once per caption (`encode_text_prefix`) and expanded over
chunks of images. A pair's score is `pair_logit`, or for a pretraining checkpoint P(aligned) =
softmax(alignment_logits)[:, 0] (zero-shot). Retrieval evaluation, pretraining's zero-shot evaluation, caption
ranking for one image, search re-ranking and zero-shot classification all score through it.

The dual encoder scores a caption against a gallery with one dot product per image. "dual+rerank" takes the dual
encoder's top K and orders them by the co-attention pair score; the rest keep their dual order below them. With
K = the whole gallery, the ranking is the co-attention ranking.

Models with 12-in-1 task tokens take `task_id` (the token's number, `tasks.finetuning.task_token_id`); None gives
no task token. A pretraining model never gets one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from PIL import Image
from torch import nn

from tasks.data.regions import VisualInput, collate_visual
from tasks.data.tokenization import TextInput, Tokenizer
from tasks.engine.evaluation import model_device
from tasks.engine.run_record import PRETRAINING, architecture
from tasks.engine.task import PredictExample
from tasks.figures.drawing import draw_boxes
from vilbert.modeling_vilbert import TextPrefix

RANKING_MODES = ("coattention", "dual", "dual+rerank")


def task_id_rows(model: nn.Module, task_id: int | None, rows: int, device: torch.device) -> torch.Tensor | None:
    """[rows, 1] task ids, or None for a pretraining model or no task token."""
    if task_id is None or architecture(model) == PRETRAINING:
        return None
    return torch.full((rows, 1), task_id, dtype=torch.long, device=device)


def pair_scores(model: nn.Module, text_prefix: TextPrefix, visual: Mapping[str, torch.Tensor],
                task_id: int | None = None) -> torch.Tensor:
    """Scores [N] of one caption prefix against N images: pair_logit, or zero-shot P(aligned)."""
    inputs = {key: visual[key] for key in ("region_features", "region_locations", "region_mask")}
    if architecture(model) == PRETRAINING:
        return torch.softmax(model.alignment_logits(**inputs, text_prefix=text_prefix).float(), dim=1)[:, 0]
    ids = task_id_rows(model, task_id, inputs["region_features"].shape[0], inputs["region_features"].device)
    return model(**inputs, task_ids=ids, text_prefix=text_prefix, heads=["pair_logit"]).pair_logit.float()


class CoattentionScorer:
    """Co-attention pair scores of caption → images and image → captions, the text prefix computed once per
    caption. `visuals` are the images' visual inputs (collated `batch_size` at a time, padded to `pad_to` rows
    when given), or one collated batch of images as the model takes it."""

    def __init__(self, model: nn.Module, text: TextInput, visuals: Sequence[VisualInput] | Mapping[str, torch.Tensor],
                 task_id: int | None = None, batch_size: int = 256, pad_to: int | None = None):
        self.model, self.text, self.task_id = model, text, task_id
        self.batch_size, self.pad_to = max(1, batch_size), pad_to
        self.device = model_device(model)
        self.visuals = visuals
        self._chunks: list[dict[str, torch.Tensor]] | None = None

    @property
    def num_images(self) -> int:
        if isinstance(self.visuals, Mapping):
            return int(self.visuals["region_features"].shape[0])
        return len(self.visuals)

    def _collate(self, images: list[int]) -> dict[str, torch.Tensor]:
        if isinstance(self.visuals, Mapping):
            return {k: v[images].to(self.device) for k, v in self.visuals.items()}
        return {k: v.to(self.device) for k, v in collate_visual([self.visuals[i] for i in images], self.pad_to).items()}

    def _gallery(self) -> list[dict[str, torch.Tensor]]:
        """Every image, in chunks of `batch_size`, on the device (prepared once)."""
        if self._chunks is None:
            if isinstance(self.visuals, Mapping):
                self._chunks = [{k: v.to(self.device) for k, v in self.visuals.items()}]
            else:
                self._chunks = [self._collate(list(range(s, min(s + self.batch_size, self.num_images))))
                                for s in range(0, self.num_images, self.batch_size)]
        return self._chunks

    def prefix(self, rows: list[int]) -> TextPrefix:
        """The text stream before the first co-attention for the captions `rows`, cut to their longest caption
        (the rest is padding, which the mask hides)."""
        width = max(int(self.text.attention_mask[rows].sum(1).max()), 1)
        ids = torch.from_numpy(self.text.input_ids[rows, :width]).to(self.device)
        return self.model.vilbert.encode_text_prefix(
            ids, torch.from_numpy(self.text.attention_mask[rows, :width]).to(self.device),
            torch.from_numpy(self.text.token_type_ids[rows, :width]).to(self.device),
            task_ids=task_id_rows(self.model, self.task_id, len(rows), self.device))

    @torch.no_grad()
    def caption_to_images(self, caption: int, images: list[int] | None = None) -> torch.Tensor:
        """Scores [len(images)] of one caption against the listed images (None: every image), on the CPU."""
        prefix = self.prefix([caption])
        if images is None:
            chunks = self._gallery()
        else:
            chunks = (self._collate(images[s : s + self.batch_size]) for s in range(0, len(images), self.batch_size))
        return torch.cat([pair_scores(self.model, prefix, chunk, self.task_id).cpu() for chunk in chunks])

    @torch.no_grad()
    def image_to_captions(self, image: int, captions: list[int]) -> torch.Tensor:
        """Scores [len(captions)] of one image against the listed captions, on the CPU."""
        visual = self._collate([image])
        scores = []
        for start in range(0, len(captions), self.batch_size):
            rows = captions[start : start + self.batch_size]
            expanded = {k: v.expand(len(rows), *v.shape[1:]) for k, v in visual.items()}
            scores.append(pair_scores(self.model, self.prefix(rows), expanded, self.task_id).cpu())
        return torch.cat(scores)

    def matrix(self, captions: Sequence[int] | None = None, progress: Callable | None = None) -> torch.Tensor:
        """Scores [C, I] of the captions (None: every one) against every image, on the CPU."""
        rows = range(len(self.text.input_ids)) if captions is None else captions
        scores = [self.caption_to_images(c) for c in (progress(rows) if progress else rows)]
        return torch.stack(scores) if scores else torch.empty(0, self.num_images)


@torch.no_grad()
def embed_images(model: nn.Module, visuals: Sequence[VisualInput], batch_size: int = 256) -> torch.Tensor:
    """Unit-length image embeddings [N, E] (float32, on the model's device), `batch_size` images per forward."""
    device = model_device(model)
    parts = []
    for start in range(0, len(visuals), batch_size):
        batch = {k: v.to(device) for k, v in collate_visual(visuals[start : start + batch_size]).items()}
        parts.append(model.encode_image(**batch))
    return torch.cat(parts) if parts else torch.empty(0, model.config.dual_embedding_size, device=device)


@torch.no_grad()
def embed_texts(model: nn.Module, tokenizer: Tokenizer, texts: Sequence[str], max_length: int,
                batch_size: int = 256, task_id: int | None = None) -> torch.Tensor:
    """Unit-length text embeddings [N, E] (float32, on the model's device)."""
    device = model_device(model)
    parts = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer.encode(list(texts[start : start + batch_size]), max_length)
        ids = torch.from_numpy(encoded.input_ids).to(device)
        parts.append(model.encode_text(ids, torch.from_numpy(encoded.attention_mask).to(device),
                                       torch.from_numpy(encoded.token_type_ids).to(device),
                                       task_id_rows(model, task_id, ids.shape[0], device)))
    return torch.cat(parts) if parts else torch.empty(0, model.config.dual_embedding_size, device=device)


def exact_top_k(queries: torch.Tensor, keys: torch.Tensor, k: int, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best keys [N, E] of each query [Q, E] by dot product: (scores [Q, k], indices [Q, k]), best first.
    Exact (a matrix product per chunk of `chunk` queries); ties keep the lower index first."""
    k = min(k, keys.shape[0])
    scores, indices = [], []
    for start in range(0, queries.shape[0], chunk):
        similarity = queries[start : start + chunk] @ keys.T  # [q, N]
        order = torch.argsort(similarity, dim=1, descending=True, stable=True)[:, :k]
        scores.append(similarity.gather(1, order))
        indices.append(order)
    return torch.cat(scores), torch.cat(indices)


def rerank(dual_scores: torch.Tensor, k: int, pair_score: Callable[[int, list[int]], torch.Tensor]) -> torch.Tensor:
    """Scores [Q, N] that rank, for each query q, its top k by `dual_scores` [Q, N] in the order of
    `pair_score(q, candidates)` [k] (co-attention), above every other candidate, which keeps its dual order."""
    out = dual_scores.detach().float().cpu().clone()
    k = min(k, out.shape[1])
    if k <= 0:
        return out
    top = torch.argsort(out, dim=1, descending=True, stable=True)[:, :k]  # [Q, k], as exact_top_k orders
    for q in range(out.shape[0]):
        candidates = top[q].tolist()
        co = pair_score(q, candidates).detach().float().cpu()  # [k]
        out[q, candidates] = co - co.min() + out[q].max() + 1.0  # every candidate above every non-candidate
    return out


def rank_both_ways(model: nn.Module, tokenizer: Tokenizer, captions: Sequence[str], visuals: Sequence[VisualInput],
                   max_length: int, mode: str, rerank_k: int = 32, task_id: int | None = None,
                   batch_size: int = 256, progress: Callable | None = None) -> dict:
    """Caption→image scores [C, I] and image→caption scores [I, C] in `mode`, with the seconds each took.

    Returns {"text_to_image", "image_to_text", "seconds": {"text_to_image", "image_to_text", "gallery"}}: for the
    dual modes "gallery" is embedding the images (an index, built once), the direction times cover the query
    embeddings, the search and the re-ranking (image→caption: the images are the queries, so their embedding
    counts there); co-attention scores both directions from one matrix, whose time both directions report.
    """
    if mode not in RANKING_MODES:
        raise ValueError(f"mode must be one of {RANKING_MODES}, got {mode!r}")
    scorer = CoattentionScorer(model, tokenizer.encode(list(captions), max_length), visuals, task_id, batch_size)
    if mode == "coattention":
        start = time.perf_counter()
        matrix = scorer.matrix(progress=progress)
        seconds = time.perf_counter() - start
        return {"text_to_image": matrix, "image_to_text": matrix.T,
                "seconds": {"text_to_image": seconds, "image_to_text": seconds, "gallery": 0.0}}

    start = time.perf_counter()
    images = embed_images(model, visuals, batch_size)
    gallery = time.perf_counter() - start
    start = time.perf_counter()
    texts = embed_texts(model, tokenizer, captions, max_length, batch_size, task_id)
    text_seconds = time.perf_counter() - start

    start = time.perf_counter()
    text_to_image = (texts @ images.T).cpu()  # [C, I]
    if mode == "dual+rerank":
        text_to_image = rerank(text_to_image, rerank_k, scorer.caption_to_images)
    t2i_seconds = text_seconds + time.perf_counter() - start
    start = time.perf_counter()
    image_to_text = (images @ texts.T).cpu()  # [I, C]: the images are the queries, the captions the gallery
    if mode == "dual+rerank":
        image_to_text = rerank(image_to_text, rerank_k, scorer.image_to_captions)
    i2t_seconds = time.perf_counter() - start + gallery
    return {"text_to_image": text_to_image, "image_to_text": image_to_text,
            "seconds": {"text_to_image": t2i_seconds, "image_to_text": i2t_seconds, "gallery": gallery}}


# ------------------------------------------------------------------------------------- captions for one image


@torch.no_grad()
def rank_captions(model: nn.Module, tokenizer: Tokenizer, example: PredictExample, max_text_length: int,
                  task_id: int | None = None) -> dict[str, Any]:
    """{"captions": every candidate [{"caption", "index", "score", "probability"}], best first}.

    `score` is pair_logit (for a pretraining model P(aligned), zero-shot); `probability` is the softmax of the
    scores over the given captions (for a pretraining model: the scores renormalised). The text stream runs once
    per caption, as retrieval evaluation computes it.
    """
    captions = list(example.candidates)
    scorer = CoattentionScorer(model, tokenizer.encode(captions, max_text_length), example.visual, task_id)
    scores = scorer.matrix()[:, 0]  # [C]
    zero_shot = architecture(model) == PRETRAINING
    probabilities = scores / scores.sum() if zero_shot else torch.softmax(scores, dim=0)
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    return {"captions": [{"caption": captions[i], "index": i, "score": scores[i].item(),
                          "probability": probabilities[i].item()} for i in order]}


class RankedCaptionsView:
    """How a task whose `predict_one` is `rank_captions` shows its result: the `Task` presentation hooks for a list of
    captions ranked for one image (pretraining zero-shot, caption retrieval)."""

    def headline(self, result: Mapping[str, Any]) -> str:
        """The best caption with its score."""
        best = result["captions"][0]
        return f"{best['caption']} ({best['score']:.2f})"

    def draw(self, example: PredictExample, result: Mapping[str, Any]) -> Image.Image:
        """The regions and the best caption with its score."""
        return draw_boxes(example.image, example.boxes, None, self.headline(result))

    def summary_lines(self, result: Mapping[str, Any]) -> list[str]:
        """The ranking, one caption a line: score, share among the captions, text."""
        return ["captions, best first (score, share among these captions):",
                *(f"  {i + 1}. {c['score']:8.3f} {c['probability']:6.1%}  {c['caption']}"
                  for i, c in enumerate(result["captions"]))]

    def explained_text(self, example: PredictExample, result: Mapping[str, Any]) -> str:
        return result["captions"][0]["caption"]  # the best-ranked caption
