"""Zero-shot classification: an image against label prompts, by the dual encoder or by co-attention.

CLIP's recipe: each label is written into prompt templates ("a photo of a {}."), and the image goes to the label
whose text scores best. Prompt ensembling: with the dual encoder, a label's text embedding is the mean of its
templates' unit embeddings, renormalised, and the image's scores are `logit_scale` × cosine, a softmax over the
labels giving probabilities. The co-attention alternative ("alignment") scores every (image, prompt) pair through
the co-attention stack (`tasks.retrieval.pair_scores`: P(aligned) of the alignment head for a pretraining
checkpoint, the pair logit for a fine-tuned retrieval one) and averages a label's templates.

`shapes_zero_shot` measures it on the shapes world: every shape of a store's images alone (the IMG token and its
box) against the world's colours and kinds, the ground truth from the store's class ids (`objects_id`, the
world's `gt_classes.json` written by `tasks.shapes.targets.add_class_targets`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tasks.data.regions import VisualInput, build_visual_input
from tasks.dual.search import CoattentionScorer, embed_texts
from tasks.errors import ConfigError, DataError

SCORERS = ("dual", "alignment")
# The default prompt ensemble: plain descriptions of a whole picture (no dataset-specific wording).
DEFAULT_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a {}.")
# On the shapes world, in the words of its captions ("two red shapes", "one circle and two squares").
SHAPES_TEMPLATES = {"colour": ("a {} shape.", "one {} shape."), "shape": ("a {}.", "one {}.")}


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
def label_embeddings(model: nn.Module, tokenizer, labels: Sequence[str], templates: Sequence[str], max_length: int,
                     task: str = "retrieval-flickr30k") -> torch.Tensor:
    """The ensembled label embeddings [L, E]: each label's template embeddings averaged, then unit length."""
    texts = embed_texts(model, tokenizer, prompts(labels, templates), max_length, task=task)  # [L × T, E]
    return F.normalize(texts.view(len(labels), len(templates), -1).mean(1), dim=-1)


@torch.no_grad()
def zero_shot_scores(model: nn.Module, tokenizer, visuals: Sequence[VisualInput], labels: Sequence[str],
                     templates: Sequence[str], max_length: int, scorer: str = "dual",
                     task: str = "retrieval-flickr30k", batch_size: int = 256) -> torch.Tensor:
    """Scores [N, L] of N images against L labels (higher is better), on the CPU.

    dual: `logit_scale` × cosine of the image embedding and the ensembled label embedding (softmax: probabilities).
    alignment: the co-attention pair score of the image and each prompt, averaged over the templates.
    """
    from tasks.dual.search import embed_images

    if scorer not in SCORERS:
        raise ConfigError(f"scorer must be one of {', '.join(SCORERS)}, got {scorer!r}")
    labels, templates = list(labels), list(templates)
    if scorer == "dual":
        images = embed_images(model, visuals, batch_size)  # [N, E]
        text = label_embeddings(model, tokenizer, labels, templates, max_length, task)  # [L, E]
        scale = model.vilbert.dual_head().scale()
        return (scale * images @ text.T).float().cpu()
    texts = prompts(labels, templates)
    coattention = CoattentionScorer(model, tokenizer, texts, visuals, max_length, task, batch_size)
    everything = list(range(len(texts)))
    rows = [coattention.image_to_captions(i, everything).view(len(labels), len(templates)).mean(1)
            for i in range(len(visuals))]
    return torch.stack(rows) if rows else torch.empty(0, len(labels))


# ------------------------------------------------------------------------------------------------- shapes world


def _name(store) -> str:
    return ", ".join(store.paths)


def shape_regions(store, image_ids: Sequence[str]) -> tuple[list[VisualInput], list[str], list[str]]:
    """Every shape of the images alone as a visual input (IMG token = that shape), with its colour and kind."""
    from tasks.shapes.world import CLASS_NAMES

    visuals, colours, kinds = [], [], []
    for image_id in image_ids:
        regions = store.read(image_id)
        if regions.objects_id is None:
            raise DataError(f"{_name(store)}: image {image_id!r} has no class ids (objects_id); add the shapes world's "
                            "ground truth with `vilbert shapes-world --add-cls-prob STORE`")
        for j, class_id in enumerate(regions.objects_id.tolist()):
            if not 1 <= class_id < len(CLASS_NAMES):
                raise DataError(f"{_name(store)}: image {image_id!r} box {j} has class id {class_id}, not a "
                                "shapes-world colour x shape class (1..18)")
            colour, kind = CLASS_NAMES[class_id].split(" ")
            visuals.append(build_visual_input(regions.features[j : j + 1], regions.boxes[j : j + 1],
                                              regions.image_hw, 2))
            colours.append(colour)
            kinds.append(kind)
    return visuals, colours, kinds


def shapes_zero_shot(model: nn.Module, tokenizer, store, image_ids: Sequence[str], max_length: int,
                     scorer: str = "dual", templates: dict[str, Sequence[str]] | None = None,
                     batch_size: int = 256) -> dict[str, float]:
    """Zero-shot colour and shape accuracy (percent) over every shape of `image_ids` in `store` (a FeatureStore
    with the world's class ids), beside chance: the share of the most frequent true label (always guessing it).
    Returns colour_accuracy, colour_chance, shape_accuracy, shape_chance and shapes (how many were classified)."""
    from tasks.shapes.world import COLOURS, KINDS

    templates = templates or SHAPES_TEMPLATES
    visuals, colours, kinds = shape_regions(store, image_ids)
    if not visuals:
        raise DataError(f"{_name(store)}: no shapes in the {len(image_ids)} image(s) given")
    result: dict[str, float] = {"shapes": float(len(visuals))}
    for name, labels, truth in (("colour", list(COLOURS), colours), ("shape", list(KINDS), kinds)):
        scores = zero_shot_scores(model, tokenizer, visuals, labels, templates[name], max_length, scorer,
                                  batch_size=batch_size)
        predicted = [labels[i] for i in scores.argmax(1).tolist()]
        result[f"{name}_accuracy"] = 100 * sum(p == t for p, t in zip(predicted, truth, strict=True)) / len(truth)
        result[f"{name}_chance"] = 100 * Counter(truth).most_common(1)[0][1] / len(truth)
    return result

