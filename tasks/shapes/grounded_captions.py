"""Grounded caption files: the world's captions with their phrases' boxes, as Flickr30k Entities grounds COCO-style
captions, for pretraining that learns where things are (`tasks/shapes/configs/pretrain_grounded.yaml`).

`write_grounded_captions(world)` reads `captions/captions_<split>.jsonl` and `scenes.json` and writes
`captions_grounded/captions_<split>.jsonl`, one line per caption (the `.jsonl` grounding of tasks.data.captions):
- each relation sentence is turned around with odds 1/2 ("a red circle to the left of a blue square." -> "a blue
  square to the right of a red circle.", the same fact): the world writes 92 % of them as "to the left of" or
  "above", so without this the relation word is guessed from the text;
- `phrases`: every "size colour kind" phrase that names exactly one shape of the image, with that shape's box;
- `relations`: in a relation sentence, the relation word ("left", "right", "above", "below") between its two
  phrases;
- `false_caption`: the caption with one attribute changed so that it is false of the image (`false_attribute`),
  where one can be.
The world's own caption files are left as they are (retrieval ranks them). Everything is a pure function of the
captions, the scenes and the world's seed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from tasks.shapes.world import COLOURS, KINDS, NUMBER_WORDS, SIZES, SPLITS, Scene, Shape, _write_bytes

FOLDER = "captions_grounded"
OPPOSITE = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below",
            "below": "above"}
RELATION = re.compile(rf"^a (.+?) ({'|'.join(OPPOSITE)}) a (.+)\.$")
WORD = {"to the left of": "left", "to the right of": "right", "above": "above", "below": "below"}
PHRASE = re.compile(rf"\b({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(KINDS)})\b")
COLOUR_COUNT = re.compile(rf"\b({'|'.join(NUMBER_WORDS[1:])}) ({'|'.join(COLOURS)}) (shapes?)\b")
TURN_STREAM = 21  # random streams of this module, apart from the world's and the tasks'
FALSE_STREAM = 22


def turned_around(text: str, rng: np.random.Generator) -> str:
    """A relation sentence, with odds 1/2 stated from its other shape; any other caption as it is."""
    found = RELATION.match(text)
    if found and rng.random() < 0.5:
        first, relation, second = found.groups()
        return f"a {second} {OPPOSITE[relation]} a {first}."
    return text


def false_attribute(text: str, shapes: list[Shape], rng: np.random.Generator) -> str | None:
    """The caption with one attribute changed so that it is false of the image, else None: a shape phrase's colour or
    kind ("a small red circle" -> "a small blue circle" where the image has no small blue circle), or a colour count's
    colour ("two green shapes" -> "two cyan shapes" where the image has no cyan shape)."""
    present = {(s.size, s.colour, s.kind) for s in shapes}
    colours = {s.colour for s in shapes}
    edits = []
    for found in PHRASE.finditer(text):
        size, colour, kind = found.groups()
        edits += [(found.start(2), found.end(2), c) for c in COLOURS if (size, c, kind) not in present]
        edits += [(found.start(3), found.end(3), k) for k in KINDS if (size, colour, k) not in present]
    for found in COLOUR_COUNT.finditer(text):
        edits += [(found.start(2), found.end(2), c) for c in COLOURS if c not in colours]
    if not edits:
        return None
    start, end, word = edits[int(rng.integers(len(edits)))]
    return text[:start] + word + text[end:]


def grounding(text: str, shapes: list[Shape]) -> dict:
    """The caption's `phrases` (those naming one shape, with its box) and `relations` (see the module docstring)."""
    phrases, starts = [], {}
    for found in PHRASE.finditer(text):
        size, colour, kind = found.groups()
        fits = [s for s in shapes if (s.size, s.colour, s.kind) == (size, colour, kind)]
        if len(fits) == 1:
            starts[found.start()] = len(phrases)
            phrases.append({"start": found.start(), "end": found.end(), "box": list(fits[0].box)})
    relations = []
    if found := RELATION.match(text):
        subject = next((i for start, i in starts.items() if found.start(1) <= start < found.end(1)), None)
        obj = next((i for start, i in starts.items() if found.start(3) <= start < found.end(3)), None)
        if subject is not None and obj is not None:
            word = WORD[found.group(2)]
            start = found.start(2) + found.group(2).index(word)
            relations.append({"start": start, "end": start + len(word), "subject": subject, "object": obj})
    return {"phrases": phrases, "relations": relations}


def write_grounded_captions(world: str | Path, seed: int, scenes: list[Scene]) -> int:
    """`captions_grounded/captions_<split>.jsonl` under `world`; returns the number of captions written."""
    world = Path(world)
    shapes = {str(scene.image_id): list(scene.shapes) for scene in scenes}
    written = 0
    for split in SPLITS:
        lines = []
        source = world / "captions" / f"captions_{split}.jsonl"
        for number, line in enumerate(source.read_text().splitlines()):
            item = json.loads(line)
            image_id = str(item["image_id"])
            text = turned_around(item["caption"], np.random.default_rng([seed, TURN_STREAM, int(image_id), number]))
            grounded = {"image_id": image_id, "caption": text, **grounding(text, shapes[image_id])}
            false = false_attribute(text, shapes[image_id],
                                    np.random.default_rng([seed, FALSE_STREAM, int(image_id), number]))
            if false is not None:
                grounded["false_caption"] = false
            lines.append(json.dumps(grounded))
        _write_bytes(world / FOLDER / f"captions_{split}.jsonl", ("\n".join(lines) + "\n").encode())
        written += len(lines)
    return written
