"""The dual encoder's training signal: symmetric InfoNCE over in-batch negatives (CLIP, Radford et al. 2021).

Under DistributedDataParallel the negatives are the global batch: every rank gathers every rank's embeddings and
computes the same full [N, N] logit matrix, so the loss value equals the single-process loss of the global batch.
Only this rank's slice of the gathered embeddings carries gradient, scaled by the world size, so that DDP's mean
of the ranks' gradients is the full-batch gradient (each rank contributes the part through its own embeddings;
the logit scale, used whole on every rank, keeps its unscaled gradient).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

MASKED_LOGIT = -1.0e4  # logits of excluded pairs; finite so that excluded rows keep finite (zero-weighted) gradients


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_local_grad(x: torch.Tensor) -> torch.Tensor:
    """[B, ...] on each rank -> [world × B, ...] in rank order; gradient flows into this rank's slice only, scaled
    by the world size (see the module docstring). Every rank must pass the same B (the trainer's micro-batches)."""
    rank, world = _world()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank] = x + (world - 1) * (x - x.detach()) if x.requires_grad else x  # value x, gradient world × d/dx
    return torch.cat(parts)


def contrastive_loss(
    text_embeds: torch.Tensor,
    image_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE: row i of `text_embeds` [B, E] and of `image_embeds` [B, E] are a pair, every other row a
    negative; (mean text→image cross-entropy + mean image→text cross-entropy) / 2 over the valid pairs.

    `valid` [B] bool marks the rows that are true pairs (pretraining batches also hold mismatched ones); other rows
    are neither queries nor negatives. Embeddings are expected unit length; `logit_scale` is exp(log scale).
    """
    if valid is None:
        valid = torch.ones(text_embeds.shape[0], dtype=torch.bool, device=text_embeds.device)
    text = gather_with_local_grad(text_embeds.float())  # [N, E]
    image = gather_with_local_grad(image_embeds.float())  # [N, E]
    keep = gather_with_local_grad(valid.float()) > 0.5  # [N]
    logits = logit_scale.float() * text @ image.T  # [N, N] text rows, image columns
    targets = torch.arange(logits.shape[0], device=logits.device)
    weight = keep.float()
    text_to_image = F.cross_entropy(logits.masked_fill(~keep[None, :], MASKED_LOGIT), targets, reduction="none")
    image_to_text = F.cross_entropy(logits.T.masked_fill(~keep[None, :], MASKED_LOGIT), targets, reduction="none")
    return ((text_to_image + image_to_text) * weight).sum() / (2 * weight.sum().clamp(min=1.0))


DEFAULT_DUAL_EMBEDDING_SIZE = 256  # the shared embedding width a contrastive run gives a model that has none


def dual_overrides(model_config, contrastive_weight: float) -> dict[str, int]:
    """ViLBertConfig overrides a run with the contrastive term needs: a dual encoder when neither the model's
    overrides nor its `init` checkpoint give one (`model_config` is a tasks.engine.config.ModelConfig)."""
    if contrastive_weight <= 0 or model_config.overrides.get("dual_embedding_size"):
        return {}
    if model_config.init:
        config_file = Path(model_config.init) / "config.json"
        if config_file.is_file() and json.loads(config_file.read_text()).get("dual_embedding_size"):
            return {}
    return {"dual_embedding_size": DEFAULT_DUAL_EMBEDDING_SIZE}
