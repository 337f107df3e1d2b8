"""Retrieval with the dual encoder: batched embedding, exact top-K by one matrix product, co-attention re-ranking.

The dual encoder scores a caption against a gallery with one dot product per image, against ViLBERT's one
co-attention forward per pair. "dual+rerank" takes the dual encoder's top K and orders them by the co-attention
pair score (`tasks.retrieval.pair_scores`: pair_logit, or P(aligned) for a pretraining checkpoint); the rest keep
their dual order below them. With K = the whole gallery, the ranking is the co-attention ranking.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from tasks.data.regions import VisualInput, collate_visual
from tasks.engine.evaluation import model_device
from tasks.engine.run_record import PRETRAINING, architecture
from tasks.finetuning import task_ids_for
from tasks.retrieval import pair_scores

MODES = ("coattention", "dual", "dual+rerank")


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
def embed_texts(model: nn.Module, tokenizer, texts: Sequence[str], max_length: int, batch_size: int = 256,
                task: str = "retrieval-flickr30k") -> torch.Tensor:
    """Unit-length text embeddings [N, E] (float32, on the model's device)."""
    device = model_device(model)
    parts = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer.encode(list(texts[start : start + batch_size]), max_length)
        ids = torch.from_numpy(encoded.input_ids).to(device)
        task_ids = None if architecture(model) == PRETRAINING else task_ids_for(model, task, ids.shape[0], device)
        parts.append(model.encode_text(ids, torch.from_numpy(encoded.attention_mask).to(device),
                                       torch.from_numpy(encoded.token_type_ids).to(device), task_ids))
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


class CoattentionScorer:
    """Co-attention pair scores of caption → images and image → captions, the text prefix computed once per
    caption; inputs prepared once (visual inputs on the device, captions tokenised)."""

    def __init__(self, model: nn.Module, tokenizer, captions: Sequence[str], visuals: Sequence[VisualInput],
                 max_length: int, task: str = "retrieval-flickr30k", batch_size: int = 256):
        self.model, self.task, self.batch_size = model, task, batch_size
        self.device = model_device(model)
        self.text = tokenizer.encode(list(captions), max_length)
        self.visuals = visuals

    def _prefix(self, rows: list[int]):
        ids = torch.from_numpy(self.text.input_ids[rows]).to(self.device)
        task_ids = None if architecture(self.model) == PRETRAINING else task_ids_for(self.model, self.task, len(rows),
                                                                                self.device)
        return self.model.vilbert.encode_text_prefix(
            ids, torch.from_numpy(self.text.attention_mask[rows]).to(self.device),
            torch.from_numpy(self.text.token_type_ids[rows]).to(self.device), task_ids=task_ids)

    @torch.no_grad()
    def caption_to_images(self, caption: int, images: list[int]) -> torch.Tensor:
        """Scores [len(images)] of one caption against the listed images."""
        prefix = self._prefix([caption])
        scores = []
        for start in range(0, len(images), self.batch_size):
            chosen = [self.visuals[i] for i in images[start : start + self.batch_size]]
            visual = {k: v.to(self.device) for k, v in collate_visual(chosen).items()}
            scores.append(pair_scores(self.model, self.task, prefix, visual).cpu())
        return torch.cat(scores)

    @torch.no_grad()
    def image_to_captions(self, image: int, captions: list[int]) -> torch.Tensor:
        """Scores [len(captions)] of one image against the listed captions."""
        visual = {k: v.to(self.device) for k, v in collate_visual([self.visuals[image]]).items()}
        scores = []
        for start in range(0, len(captions), self.batch_size):
            rows = captions[start : start + self.batch_size]
            expanded = {k: v.expand(len(rows), *v.shape[1:]) for k, v in visual.items()}
            scores.append(pair_scores(self.model, self.task, self._prefix(rows), expanded).cpu())
        return torch.cat(scores)


def rank_both_ways(model: nn.Module, tokenizer, captions: Sequence[str], visuals: Sequence[VisualInput],
                   max_length: int, mode: str, rerank_k: int = 32, task: str = "retrieval-flickr30k",
                   batch_size: int = 256, progress: Callable | None = None) -> dict:
    """Caption→image scores [C, I] and image→caption scores [I, C] in `mode`, with the seconds each took.

    Returns {"text_to_image", "image_to_text", "seconds": {"text_to_image", "image_to_text", "gallery"}}: for the
    dual modes "gallery" is embedding the images (an index, built once), the direction times cover the query
    embeddings, the search and the re-ranking (image→caption: the images are the queries, so their embedding
    counts there); co-attention scores both directions from one matrix, whose time both directions report.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    scorer = CoattentionScorer(model, tokenizer, captions, visuals, max_length, task, batch_size)
    rows = range(len(captions))
    if mode == "coattention":
        start = time.perf_counter()
        everything = list(range(len(visuals)))
        matrix = torch.stack([scorer.caption_to_images(c, everything) for c in (progress(rows) if progress else rows)])
        seconds = time.perf_counter() - start
        return {"text_to_image": matrix, "image_to_text": matrix.T,
                "seconds": {"text_to_image": seconds, "image_to_text": seconds, "gallery": 0.0}}

    start = time.perf_counter()
    images = embed_images(model, visuals, batch_size)
    gallery = time.perf_counter() - start
    start = time.perf_counter()
    texts = embed_texts(model, tokenizer, captions, max_length, batch_size, task)
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


def evaluate_retrieval(task, model: nn.Module, split: str, mode: str, rerank_k: int = 32,
                       progress: Callable | None = None) -> tuple[dict[str, float], list, torch.Tensor]:
    """A `tasks.retrieval.RetrievalTask` split in `mode`: the metrics of `RetrievalTask.evaluate` (both directions)
    plus queries per second each way; returns (metrics, images, caption→image scores [C, I])."""
    from tasks.data.annotations import image_key_resolver, keep_known_images
    from tasks.data.regions import visual_input
    from tasks.engine.evaluation import eval_mode
    from tasks.metrics import recall_at_k

    store = task.store()
    resolve = image_key_resolver(store.ids)
    kept = keep_known_images(task.images(split), lambda im: im.image_id, resolve, f"{task.data.root} ({split})",
                             "images")
    images = [im for im, _ in kept]
    captions = [c for im in images for c in im.captions]
    caption_image = [i for i, im in enumerate(images) for _ in im.captions]
    visuals = [visual_input(store.read(key), task.data.max_regions) for _, key in kept]
    with eval_mode(model):
        ranked = rank_both_ways(model, task.tokenizer(), captions, visuals, task.data.max_text_length, mode,
                                rerank_k, task.token_task, max(1, task.data.eval_batch_size), progress)
    text_to_image = recall_at_k(ranked["text_to_image"], caption_image)
    image_captions = [[c for c, i in enumerate(caption_image) if i == image] for image in range(len(images))]
    image_to_text = recall_at_k(ranked["image_to_text"], image_captions)
    seconds = ranked["seconds"]
    metrics = dict(text_to_image)
    metrics.update({f"i2t_{k}": v for k, v in image_to_text.items()})
    metrics = task.over_the_split(metrics, split, len(images), len(captions))
    metrics["t2i_queries_per_s"] = len(captions) / max(seconds["text_to_image"], 1e-9)
    metrics["i2t_queries_per_s"] = len(images) / max(seconds["image_to_text"], 1e-9)
    metrics["gallery_seconds"] = seconds["gallery"]
    return metrics, images, ranked["text_to_image"]


def load_dual_model(checkpoint: str, device: str | torch.device = "cpu"):
    """(model in eval mode, `tasks.runners.checkpoint.CheckpointInfo`) of a checkpoint whose model has a dual encoder."""
    from tasks.errors import ConfigError
    from tasks.runners.checkpoint import read_checkpoint
    from vilbert import ViLBertForPreTraining, ViLBertForVLTasks

    info = read_checkpoint(checkpoint)
    if not info.config.get("dual_embedding_size"):
        raise ConfigError(f"--checkpoint {checkpoint}: its model has no dual encoder (dual_embedding_size is 0); "
                          "pretrain or fine-tune with data.contrastive_weight > 0")
    cls = ViLBertForPreTraining if info.is_pretraining else ViLBertForVLTasks
    return cls.from_pretrained(str(info.directory)).to(device).eval(), info
