"""Co-attention figures: which regions each word attends to, and which words each region attends to.

One image and one text (a batch of one) through the base model with `output_attentions=True`, then:
- word -> region: the text-over-vision probabilities of the last co-attention layer (averaged over heads, or one
  head), painted on the image: a pixel's heat is the sum of the weights of the boxes that cover it. The IMG row
  (the whole image) covers every pixel, so its weight is printed in the panel title instead of painted.
- region -> word: the vision-over-text probabilities of the same layer, as a matrix (rows: IMG, then boxes 1..).
- rollout (optional): head-averaged attention propagated through every layer in execution order, each layer adding
  its attention times what its input already carried (a residual, so R <- R + A R; for co-attention the cross
  terms), the rules of Chefer et al. (ICCV 2021) without their gradient weighting. Rows are renormalised to 1.

Word pieces are grouped into words ("##" continuations); a word's row is the mean of its pieces' rows.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from features.atomic import write_text_atomic
from tasks.data.regions import region_boxes
from tasks.errors import ConfigError
from tasks.figures.matplotlib_files import pyplot, save_png

TASK_TOKEN = "[TASK]"  # the 12-in-1 task token the model inserts after [CLS]
SPECIAL = ("[CLS]", "[SEP]", "[PAD]", TASK_TOKEN)


@dataclass
class Word:
    text: str
    positions: list[int]  # token positions of its pieces


@dataclass
class CoAttentionView:
    """What the figure plots: word -> region and region -> word weights over the real tokens and regions."""

    tokens: list[str]  # [L] the text positions the model saw (task token included), padding dropped
    row_boxes: np.ndarray  # [R, 4] x1 y1 x2 y2 pixels, row 0 = IMG (the whole image)
    word_to_region: np.ndarray  # [L, R], rows sum to 1
    region_to_word: np.ndarray  # [R, L], rows sum to 1
    source: str  # e.g. "co-attention layer 2/2, mean of 8 heads"

    def words(self) -> list[Word]:
        """Tokens grouped into words, special tokens left out."""
        words: list[Word] = []
        for position, token in enumerate(self.tokens):
            if token in SPECIAL:
                continue
            if token.startswith("##") and words and words[-1].positions[-1] == position - 1:
                words[-1].text += token[2:]
                words[-1].positions.append(position)
            else:
                words.append(Word(token, [position]))
        return words

    def word_heat(self, word: Word) -> np.ndarray:
        """[R] the word's weights over the regions (the mean of its pieces' rows)."""
        return self.word_to_region[word.positions].mean(axis=0)


# ---------------------------------------------------------------------------------------------------------- maps


@torch.no_grad()
def attention_maps(model: nn.Module, text: dict[str, torch.Tensor], visual: dict[str, torch.Tensor],
                   task_ids: torch.Tensor | None = None) -> Any:
    """The base model's output with every attention map, for a batch of one."""
    base = getattr(model, "vilbert", model)
    return base(**text, **visual, task_ids=task_ids, output_attentions=True)


def text_tokens(tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor, has_task_token: bool) -> list[str]:
    """The tokens of row 0 as the model saw them: the real positions, with the task token after [CLS]."""
    ids = input_ids[0][attention_mask[0].bool()].tolist()
    tokens = tokenizer.backend.convert_ids_to_tokens(ids)
    return tokens[:1] + [TASK_TOKEN] + tokens[1:] if has_task_token else tokens


def coattention_view(outputs: Any, tokens: list[str], row_boxes: np.ndarray, head: int | None = None,
                     layer: int = -1) -> CoAttentionView:
    """The word <-> region maps of one co-attention layer (default: the last), head-averaged or one `head`."""
    text_to_vision, vision_to_text = outputs.text_to_vision_attentions, outputs.vision_to_text_attentions
    if not text_to_vision:
        raise ConfigError("the model has no co-attention layers; there is no word-region attention to show")
    if len(vision_to_text) != len(text_to_vision):
        raise ConfigError("the model's cross-attention is one-way (words over regions only); the figure needs both "
                          "directions: use --attention-json for the maps it has")
    heads = text_to_vision[layer].shape[1]
    if head is not None and not 0 <= head < heads:
        raise ConfigError(f"--head {head}: the co-attention layers have {heads} heads (0..{heads - 1})")
    length, regions = len(tokens), len(row_boxes)

    def pick(probs: torch.Tensor) -> np.ndarray:  # [1, h, Lq, Lk] -> [Lq, Lk]
        chosen = probs[0].mean(0) if head is None else probs[0, head]
        return chosen.float().cpu().numpy()

    number = len(text_to_vision) + layer + 1 if layer < 0 else layer + 1
    which = f"mean of {heads} heads" if head is None else f"head {head} of {heads}"
    return CoAttentionView(
        tokens=tokens,
        row_boxes=np.asarray(row_boxes, dtype=np.float32),
        word_to_region=pick(text_to_vision[layer])[:length, :regions],
        region_to_word=pick(vision_to_text[layer])[:regions, :length],
        source=f"co-attention layer {number}/{len(text_to_vision)}, {which}",
    )


def rollout_view(outputs: Any, schedule: list[tuple[str, int]], tokens: list[str],
                 row_boxes: np.ndarray) -> CoAttentionView:
    """Head-averaged attention propagated through the layers in `schedule` order (see the module docstring)."""
    if not any(kind == "C" for kind, _ in schedule) or any(kind not in ("T", "V", "C") for kind, _ in schedule):
        raise ConfigError("--rollout: needs the two-stream layers (text, vision, co-attention); this model's "
                          f"layers are {''.join(sorted({kind for kind, _ in schedule}))}")
    length, regions = len(tokens), len(row_boxes)

    def mean(probs: torch.Tensor, rows: int, cols: int) -> torch.Tensor:  # [1, h, Lq, Lk] -> [rows, cols] float64
        return probs[0].mean(0)[:rows, :cols].double().cpu()

    tt, vv = torch.eye(length, dtype=torch.float64), torch.eye(regions, dtype=torch.float64)
    tv = torch.zeros(length, regions, dtype=torch.float64)
    vt = torch.zeros(regions, length, dtype=torch.float64)
    for kind, index in schedule:
        if kind == "T":
            a = mean(outputs.text_attentions[index], length, length)
            tt, tv = tt + a @ tt, tv + a @ tv
        elif kind == "V":
            a = mean(outputs.vision_attentions[index], regions, regions)
            vv, vt = vv + a @ vv, vt + a @ vt
        else:
            a_tv = mean(outputs.text_to_vision_attentions[index], length, regions)  # words over regions
            a_vt = mean(outputs.vision_to_text_attentions[index], regions, length)  # regions over words
            tt, tv, vv, vt = tt + a_tv @ vt, tv + a_tv @ vv, vv + a_vt @ tv, vt + a_vt @ tt
    return CoAttentionView(
        tokens=tokens,
        row_boxes=np.asarray(row_boxes, dtype=np.float32),
        word_to_region=(tv / tv.sum(-1, keepdim=True)).float().numpy(),
        region_to_word=(vt / vt.sum(-1, keepdim=True)).float().numpy(),
        source=f"rollout over {len(schedule)} layers, heads averaged",
    )


def choose_words(view: CoAttentionView, wanted: list[str] | None) -> list[Word]:
    """The words to draw: `wanted` (case-insensitive, in that order), else every word of the text."""
    words = view.words()
    if not wanted:
        return words
    by_text = {w.text.lower(): w for w in reversed(words)}  # the first occurrence wins
    missing = [w for w in wanted if w.lower() not in by_text]
    if missing:
        raise ConfigError(f"--words: {', '.join(repr(w) for w in missing)} not in the text; its words are "
                          f"{', '.join(w.text for w in words)}")
    return [by_text[w.lower()] for w in wanted]


def maps_json(outputs: Any, tokens: list[str], row_boxes: np.ndarray) -> dict:
    """Every map of row 0 (all layers, all heads), cropped to the real tokens and regions, as nested lists."""
    length, regions = len(tokens), len(row_boxes)
    sizes = {"text_attentions": (length, length), "vision_attentions": (regions, regions),
             "text_to_vision_attentions": (length, regions), "vision_to_text_attentions": (regions, length)}
    maps = {name: [probs[0, :, :rows, :cols].float().cpu().tolist() for probs in getattr(outputs, name)]
            for name, (rows, cols) in sizes.items()}
    return {"tokens": tokens, "region_boxes": np.asarray(row_boxes).round(2).tolist(),
            "layout": "name -> [layer][head][query][key]; regions: row 0 = IMG (whole image), then the boxes",
            **maps}


# -------------------------------------------------------------------------------------------------------- figure


def box_heat(image_hw: tuple[int, int], boxes: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """[H, W] float32: each pixel the sum of the weights of the boxes (x1 y1 x2 y2 pixels) covering it."""
    height, width = image_hw
    heat = np.zeros((height, width), dtype=np.float32)
    for box, weight in zip(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), weights, strict=True):
        x1, y1 = max(0, int(np.floor(box[0]))), max(0, int(np.floor(box[1])))
        x2, y2 = min(width, int(np.ceil(box[2]))), min(height, int(np.ceil(box[3])))
        heat[y1:y2, x1:x2] += weight
    return heat


def draw_figure(pixels: np.ndarray, original_hw: tuple[int, int], view: CoAttentionView, words: list[Word],
                title: str = "", columns: int = 4):
    """The matplotlib figure: the image with numbered boxes and one heat panel per word, then the region -> word
    matrix below them, each with its colour bar.

    `pixels` [h, w, 3] may be a downscaled decode of an `original_hw` image; boxes are in original pixels.
    """
    from matplotlib.patches import Rectangle

    plt = pyplot()

    if not words:
        raise ConfigError("the text has no words to show (only special tokens)")
    height, width = original_hw
    scale_y, scale_x = pixels.shape[0] / height, pixels.shape[1] / width
    boxes = view.row_boxes[1:]  # the IMG row is the whole image
    scaled = boxes * np.array([scale_x, scale_y, scale_x, scale_y], dtype=np.float32)
    heats = [box_heat(pixels.shape[:2], scaled, view.word_heat(w)[1:]) for w in words]
    top = max(float(h.max()) for h in heats) or 1.0

    # the regions and one heat panel per word in a grid, the region -> word matrix in a row of its own; constrained
    # layout gives each colour bar its own room, so nothing overlaps whatever the number of words and tokens
    panels = len(words) + 1
    cols = min(columns, panels)
    rows = -(-panels // cols)
    fig = plt.figure(figsize=(3.2 * cols + 0.8, 3.2 * rows + 3.6), layout="constrained")
    grid, below = fig.subfigures(2, 1, height_ratios=[3.2 * rows, 3.6])
    axes = grid.subplots(rows, cols, squeeze=False)
    extent = (0, width, height, 0)
    for ax in axes.flat:
        ax.axis("off")

    ax = axes.flat[0]
    ax.imshow(pixels, extent=extent)
    for number, box in enumerate(boxes, start=1):
        ax.add_patch(Rectangle(box[:2], box[2] - box[0], box[3] - box[1], fill=False, color="cyan", lw=0.8))
        ax.text(box[0] + 2, box[1] + 2, str(number), color="yellow", fontsize=7, va="top",
                bbox={"facecolor": "black", "alpha": 0.6, "pad": 1, "lw": 0})
    ax.set_title("regions", fontsize=9)

    for ax, word, heat in zip(axes.flat[1:], words, heats, strict=False):
        ax.imshow(pixels, extent=extent, alpha=0.45)
        image = ax.imshow(heat, extent=extent, cmap="inferno", vmin=0.0, vmax=top, alpha=0.6)
        ax.set_title(f"{word.text!r}  (IMG {view.word_heat(word)[0]:.2f})", fontsize=9)
    grid.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="word -> region")

    ax = below.subplots()
    matrix = ax.imshow(view.region_to_word, cmap="viridis", vmin=0.0, aspect="auto")
    ax.set_xticks(range(len(view.tokens)), view.tokens, rotation=90, fontsize=7)
    ax.set_yticks(range(len(view.row_boxes)), ["IMG", *map(str, range(1, len(view.row_boxes)))], fontsize=7)
    ax.set_title("region -> word", fontsize=9)
    below.colorbar(matrix, ax=ax, label="region -> word")
    fig.suptitle(f"{title}\n{view.source}" if title else view.source, fontsize=10)
    return fig


def save_figure(fig, out: str | os.PathLike, dpi: int = 110) -> Path:
    """Write the figure as a PNG atomically and close it."""
    return save_png(fig, out, dpi)


# ---------------------------------------------------------------------------------------------------- prediction


def explain_prediction(model: nn.Module, tokenizer, image, text: str, max_text_length: int,
                       task_ids: torch.Tensor | None, words: list[str] | None = None, head: int | None = None,
                       rollout: bool = False, out: str | os.PathLike | None = None,
                       json_out: str | os.PathLike | None = None) -> dict:
    """Run `text` on one image (a `tasks.engine.task.ExampleImage`) with maps; write the figure and/or the JSON.

    Returns {"attention": figure path, "attention_json": JSON path} for what was written.
    """
    device = image.visual["region_features"].device
    encoded = tokenizer.encode([text], max_text_length).tensors(device)
    outputs = attention_maps(model, encoded, image.visual, task_ids)
    row_boxes = region_boxes(image.boxes, image.image.original_hw).numpy()  # IMG row = the whole image
    base = getattr(model, "vilbert", model)
    tokens = text_tokens(tokenizer, encoded["input_ids"], encoded["attention_mask"],
                         base.embeddings.task_embeddings is not None)
    if rollout:
        view = rollout_view(outputs, base.encoder.schedule, tokens, row_boxes)
    else:
        view = coattention_view(outputs, tokens, row_boxes, head)
    chosen = choose_words(view, words)  # fails on an unknown word before anything is written
    written = {}
    if json_out:
        write_text_atomic(json_out, json.dumps({"text": text, **maps_json(outputs, tokens, row_boxes)}))
        written["attention_json"] = str(json_out)
    if out:
        figure = draw_figure(image.image.pixels, image.image.original_hw, view, chosen, title=text)
        written["attention"] = str(save_figure(figure, out))
    return written
