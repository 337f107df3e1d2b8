"""Where a grounded caption's words point: the token targets of the geometry objective of pretraining.

A grounded caption (tasks.data.captions: `phrases` with boxes, `relations` between them) gives two kinds of token:
- a phrase's head word (its last word piece: "circle" of "a small red circle"), whose target is its box centre;
- a relation word ("left"), whose target is its subject phrase's box centre minus its object phrase's.
Centres are in [-1, 1] of the image's width and height, so a relation word's target has the sign the word states.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tasks.data.captions import Caption
from tasks.data.tokenization import Tokenizer


@dataclass(frozen=True)
class GeometryTokens:
    """A grounded caption's phrase head words with their box centres in pixels (x, y), and its relation words with
    their (subject, object) rows of those; phrases that truncation dropped are left out, with their relations."""

    phrase_tokens: np.ndarray  # [P] token positions
    centres: np.ndarray  # [P, 2] box centres in pixels
    relation_tokens: np.ndarray  # [R] token positions
    pairs: np.ndarray  # [R, 2] (subject, object) rows of phrase_tokens

    @property
    def empty(self) -> bool:
        return len(self.phrase_tokens) == 0


NO_GEOMETRY = GeometryTokens(np.zeros(0, np.int64), np.zeros((0, 2), np.float32), np.zeros(0, np.int64),
                             np.zeros((0, 2), np.int64))


def geometry_tokens(caption: Caption, tokenizer: Tokenizer, max_length: int) -> GeometryTokens:
    """The token positions of `caption`'s phrases and relations in `tokenizer.encode(caption.text, max_length)`."""
    if not caption.phrases:
        return NO_GEOMETRY
    spans = [(p.start, p.end) for p in caption.phrases] + [(r.start, r.end) for r in caption.relations]
    found = tokenizer.last_tokens(caption.text, spans, max_length)
    heads, relation_heads = found[: len(caption.phrases)], found[len(caption.phrases):]
    kept = [i for i, token in enumerate(heads) if token is not None]
    row = {phrase: k for k, phrase in enumerate(kept)}
    centres = [((caption.phrases[i].box[0] + caption.phrases[i].box[2]) / 2,
                (caption.phrases[i].box[1] + caption.phrases[i].box[3]) / 2) for i in kept]
    relations = [(token, row[r.subject], row[r.object]) for r, token in zip(caption.relations, relation_heads,
                                                                             strict=True)
                 if token is not None and r.subject in row and r.object in row]
    return GeometryTokens(
        np.asarray([heads[i] for i in kept], dtype=np.int64),
        np.asarray(centres, dtype=np.float32).reshape(-1, 2),
        np.asarray([r[0] for r in relations], dtype=np.int64),
        np.asarray([r[1:] for r in relations], dtype=np.int64).reshape(-1, 2),
    )


def geometry_targets(tokens: GeometryTokens, image_hw: tuple[int, int], length: int) -> tuple[np.ndarray, np.ndarray]:
    """([length, 2] phrase centres, [length, 2] relation offsets), NaN at tokens without a target."""
    phrases = np.full((length, 2), np.nan, dtype=np.float32)
    relations = np.full((length, 2), np.nan, dtype=np.float32)
    if tokens.empty:
        return phrases, relations
    height, width = image_hw
    centres = tokens.centres / np.asarray([width, height], dtype=np.float32) * 2 - 1
    phrases[tokens.phrase_tokens] = centres
    relations[tokens.relation_tokens] = centres[tokens.pairs[:, 0]] - centres[tokens.pairs[:, 1]]
    return phrases, relations
