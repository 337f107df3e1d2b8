"""Zero-shot colour and shape classification on the shapes world (`tasks.ranking.zero_shot` on its shapes).

Every shape of a store's images alone (the IMG token and its box) is classified against the world's colours and
kinds; the ground truth comes from the store's class ids (`objects_id`, the world's `gt_classes.json` written by
`tasks.shapes.targets.add_class_targets`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from torch import nn

from features.store import FeatureStore
from tasks.data.regions import VisualInput, build_visual_input
from tasks.data.tokenization import Tokenizer
from tasks.errors import DataError
from tasks.ranking.zero_shot import zero_shot_scores
from tasks.shapes.world import CLASS_NAMES, COLOURS, KINDS

# In the words of the world's captions ("two red shapes", "one circle and two squares").
SHAPES_TEMPLATES = {"colour": ("a {} shape.", "one {} shape."), "shape": ("a {}.", "one {}.")}


def _name(store: FeatureStore) -> str:
    return ", ".join(store.paths)


def shape_regions(store: FeatureStore, image_ids: Sequence[str]) -> tuple[list[VisualInput], list[str], list[str]]:
    """Every shape of the images alone as a visual input (IMG token = that shape), with its colour and kind."""
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


def shapes_zero_shot(model: nn.Module, tokenizer: Tokenizer, store: FeatureStore, image_ids: Sequence[str],
                     max_length: int, scorer: str = "dual", templates: dict[str, Sequence[str]] | None = None,
                     batch_size: int = 256) -> dict[str, float]:
    """Zero-shot colour and shape accuracy (percent) over every shape of `image_ids` in `store` (a FeatureStore
    with the world's class ids), beside chance: the share of the most frequent true label (always guessing it).
    Returns colour_accuracy, colour_chance, shape_accuracy, shape_chance and shapes (how many were classified)."""
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
