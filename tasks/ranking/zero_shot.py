"""Zero-shot classification: an image against label prompts, by the dual encoder or by co-attention.

CLIP's recipe: each label is written into prompt templates ("a photo of a {}."), and the image goes to the label
whose text scores best. Prompt ensembling: with the dual encoder, a label's text embedding is the mean of its
templates' unit embeddings, renormalised, and the image's scores are `logit_scale` × cosine, a softmax over the
labels giving probabilities. The co-attention alternative ("alignment") scores every (image, prompt) pair through
the co-attention stack (`tasks.ranking.search.CoattentionScorer`: P(aligned) of the alignment head for a
pretraining checkpoint, the pair logit for a fine-tuned retrieval one) and averages a label's templates.
`tasks.shapes.zero_shot` measures it on the shapes world.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tasks.data.regions import VisualInput
from tasks.data.tokenization import Tokenizer
from tasks.errors import ConfigError
from tasks.ranking.search import CoattentionScorer, embed_images, embed_texts

SCORERS = ("dual", "alignment")
# The default prompt ensemble: plain descriptions of a whole picture (no dataset-specific wording).
DEFAULT_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a {}.")


def check_labels(labels: Sequence[str], source: str = "--labels") -> list[str]:
    """Labels stripped; a ConfigError for none, an empty one, or a repeated one."""
    cleaned = [label.strip() for label in labels]
    if not cleaned or cleaned == [""]:
        raise ConfigError(f"{source}: no labels (give them comma-separated, e.g. cat,dog)")
    if "" in cleaned:
        raise ConfigError(f"{source}: an empty label (label {cleaned.index('') + 1}); remove the extra comma")
    repeated = [label for label, n in Counter(cleaned).items() if n > 1]
    if repeated:
        raise ConfigError(f"{source}: label {repeated[0]!r} is given twice")
    if len(cleaned) < 2:
        raise ConfigError(f"{source}: one label ({cleaned[0]!r}); classification needs at least two")
    return cleaned


def check_templates(templates: Sequence[str], source: str = "--template") -> list[str]:
    """Templates with exactly one `{}` (where the label goes); a ConfigError naming the bad one."""
    if not templates:
        raise ConfigError(f"{source}: no templates")
    for template in templates:
        if template.count("{}") != 1:
            raise ConfigError(f"{source} {template!r}: needs exactly one {{}} where the label goes "
                              f"(it has {template.count('{}')})")
    if len(set(templates)) != len(templates):
        raise ConfigError(f"{source}: a template is given twice")
    return list(templates)


def prompts(labels: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every label in every template, label-major: [L × T] texts."""
    return [template.replace("{}", label) for label in labels for template in templates]


@torch.no_grad()
def label_embeddings(model: nn.Module, tokenizer: Tokenizer, labels: Sequence[str], templates: Sequence[str],
                     max_length: int, task_id: int | None = None) -> torch.Tensor:
    """The ensembled label embeddings [L, E]: each label's template embeddings averaged, then unit length."""
    texts = embed_texts(model, tokenizer, prompts(labels, templates), max_length, task_id=task_id)  # [L × T, E]
    return F.normalize(texts.view(len(labels), len(templates), -1).mean(1), dim=-1)


@torch.no_grad()
def zero_shot_scores(model: nn.Module, tokenizer: Tokenizer, visuals: Sequence[VisualInput], labels: Sequence[str],
                     templates: Sequence[str], max_length: int, scorer: str = "dual", task_id: int | None = None,
                     batch_size: int = 256) -> torch.Tensor:
    """Scores [N, L] of N images against L labels (higher is better), on the CPU.

    dual: `logit_scale` × cosine of the image embedding and the ensembled label embedding (softmax: probabilities).
    alignment: the co-attention pair score of the image and each prompt, averaged over the templates.
    """
    if scorer not in SCORERS:
        raise ConfigError(f"scorer must be one of {', '.join(SCORERS)}, got {scorer!r}")
    labels, templates = list(labels), list(templates)
    if scorer == "dual":
        images = embed_images(model, visuals, batch_size)  # [N, E]
        text = label_embeddings(model, tokenizer, labels, templates, max_length, task_id)  # [L, E]
        scale = model.vilbert.dual_head().scale()
        return (scale * images @ text.T).float().cpu()
    texts = prompts(labels, templates)
    coattention = CoattentionScorer(model, tokenizer.encode(texts, max_length), visuals, task_id, batch_size)
    everything = list(range(len(texts)))
    rows = [coattention.image_to_captions(i, everything).view(len(labels), len(templates)).mean(1)
            for i in range(len(visuals))]
    return torch.stack(rows) if rows else torch.empty(0, len(labels))
