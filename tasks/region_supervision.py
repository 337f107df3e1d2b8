"""Region supervision for question answering: the words' attention over the regions pushed onto the named object.

Why: on the shapes world a fine-tuned VQA model answers compositional questions from the phrase, and its last
co-attention layer's text-to-vision attention on the named shape equals 1 / the number of regions
(docs/results.md, "Why the model ignores the features"). The answer then cannot read that shape's features.

`data.grounding_weight` w > 0 adds the loss term "grounding" to a VQA-style task: for a question whose grounding
file (tasks/data/grounding.py) names a region, the share of attention on the target rows is taken in every
text-to-vision map the model returns (co-attention layers, the sequential variant's one-way blocks, the
single-stream variant's word-over-region blocks), averaged over heads and over the question's real tokens
([CLS] and [SEP] included); the question's term is w times the mean over those maps of -log(share). The engine
averages it over the step's supervised questions (`label_counts`), so ranks and accumulation do not change it.
Unsupervised questions add nothing. An architecture without text-to-vision attention (late fusion) is refused.
"""

from __future__ import annotations

import torch

from tasks.errors import ConfigError
from vilbert.variants import text_to_vision_maps

SHARE_FLOOR = 1e-6  # the share is floored before its log (a padded or masked target would give log 0)


def check_model(config: object, weight: float) -> None:
    """Refuse `data.grounding_weight` > 0 for a model config whose architecture has no text-to-vision attention."""
    if weight > 0 and text_to_vision_maps(config) == 0:
        raise ConfigError(f"data.grounding_weight={weight}: the {config.architecture} architecture (with_coattention="
                          f"{config.with_coattention}) has no text-to-vision attention to supervise; set it to 0")


def grounding_loss(maps: tuple[torch.Tensor, ...], attention_mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Per question [B]: the mean over `maps` ([B, h, L', R] each) of -log(the share of attention on `rows`
    [B, R] (bool), averaged over heads and the tokens of `attention_mask` [B, L]); 0 where no row is a target.

    A model with 12-in-1 task tokens returns maps one token longer (the task token after [CLS]), which counts."""
    if not maps:
        raise ConfigError("data.grounding_weight: the model returned no text-to-vision attention maps")
    tokens = attention_mask.float()
    if maps[0].shape[2] == tokens.shape[1] + 1:  # the task token: real, like the question's tokens
        tokens = torch.cat([tokens.new_ones(tokens.shape[0], 1), tokens], dim=1)
    target = rows.float()
    losses = []
    for probs in maps:
        on_target = (probs.float().mean(dim=1) * target[:, None, :]).sum(dim=-1)  # [B, L']
        share = (on_target * tokens).sum(dim=1) / tokens.sum(dim=1).clamp(min=1)  # [B]
        losses.append(-torch.log(share.clamp(min=SHARE_FLOOR)))
    supervised = rows.any(dim=1).float()
    return torch.stack(losses).mean(dim=0) * supervised
