"""Caption files, and their join with a feature store.

Three forms are read, chosen by the file name:
- `.tsv` / `.txt`: `image_id<TAB>caption` per line (an `image_id<TAB>caption` header line is skipped);
- `.jsonl` / `.jsonline`: one JSON object per line with `image_id` and `caption` (or a `captions` list);
- `.json`: the reference's `caption_{train,val}.json` dict `{image_id: caption}` (a list of captions per id is
  accepted too), or a list of `{image_id, caption}` objects.
An image may have several captions. Image ids are strings, as in the feature store.

A `.jsonl` line with one `caption` may also ground it, as Flickr30k Entities grounds its captions' phrases:
- `phrases`: `[{"start": s, "end": e, "box": [x1, y1, x2, y2]}]`, the characters [s, e) of a phrase and the box (in
  pixels) of the one region it names;
- `relations`: `[{"start": s, "end": e, "subject": i, "object": j}]`, a relation word ("left") between phrases i and
  j (subject first: "the circle [left of] the square");
- `false_caption`: the caption with one fact changed so that it is false of the image (a hard negative).
Pretraining reads them under `data.geometry_weight`, `data.mask_relations` and `data.hard_negatives`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from tasks.errors import AnnotationError, DataError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Phrase:
    """Characters [start, end) of a caption that name one region, and its box [x1, y1, x2, y2] in pixels."""

    start: int
    end: int
    box: tuple[float, float, float, float]


@dataclass(frozen=True)
class Relation:
    """Characters [start, end) of a relation word between the caption's phrases `subject` and `object`."""

    start: int
    end: int
    subject: int
    object: int


@dataclass(frozen=True)
class Caption:
    image_id: str
    text: str
    phrases: tuple[Phrase, ...] = ()
    relations: tuple[Relation, ...] = ()
    false_caption: str | None = None


def load_captions(path: str | os.PathLike) -> list[Caption]:
    """Every (image id, caption) pair of a caption file, in file order."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise AnnotationError(f"{path}: cannot read caption file ({error.strerror})") from error
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".txt"):
        captions = _read_tsv(path, text)
    elif suffix in (".jsonl", ".jsonline", ".jsonlines"):
        captions = _read_json_lines(path, text)
    elif suffix == ".json":
        captions = _read_json(path, text)
    else:
        raise AnnotationError(f"{path}: unknown caption file type {suffix!r}; use .tsv, .jsonl or .json")
    if not captions:
        raise AnnotationError(f"{path}: no captions")
    return captions


def _caption(path: Path, where: str, image_id, text) -> Caption:
    if image_id is None or isinstance(image_id, (dict, list)) or str(image_id).strip() == "":
        raise AnnotationError(f"{path}: {where}: missing or invalid image id {image_id!r}")
    if not isinstance(text, str) or not text.strip():
        raise AnnotationError(f"{path}: {where}: caption of image {image_id!r} is empty or not a string")
    return Caption(str(image_id).strip(), text.strip())


def _read_tsv(path: Path, text: str) -> list[Caption]:
    captions = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t", 1)
        if len(parts) != 2:
            raise AnnotationError(f"{path}: line {number}: expected 'image_id<TAB>caption', got {line[:60]!r}")
        if number == 1 and parts[0].strip().lower() == "image_id":
            continue
        captions.append(_caption(path, f"line {number}", parts[0], parts[1]))
    return captions


def _entries(path: Path, where: str, item) -> list[Caption]:
    if not isinstance(item, dict) or "image_id" not in item:
        raise AnnotationError(f"{path}: {where}: expected an object with image_id and caption")
    texts = item.get("captions", [item.get("caption")])
    if not isinstance(texts, list):
        raise AnnotationError(f"{path}: {where}: captions must be a list")
    captions = [_caption(path, where, item["image_id"], t) for t in texts]
    if GROUNDING_KEYS & item.keys():
        if "captions" in item:
            raise AnnotationError(f"{path}: {where}: phrases, relations and false_caption need a single caption")
        captions = [_grounded(path, where, captions[0], item)]
    return captions


GROUNDING_KEYS = {"phrases", "relations", "false_caption"}


def _span(path: Path, where: str, entry, text: str, extra: tuple[str, ...]) -> tuple[int, int]:
    if not isinstance(entry, dict) or not {"start", "end", *extra} <= entry.keys():
        raise AnnotationError(f"{path}: {where}: expected objects with start, end, {', '.join(extra)}; got {entry!r}")
    start, end = entry["start"], entry["end"]
    if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= len(text)):
        raise AnnotationError(f"{path}: {where}: span [{start}, {end}) is not within the caption's "
                              f"{len(text)} characters")
    return start, end


def _grounded(path: Path, where: str, caption: Caption, item: dict) -> Caption:
    """`caption` with the line's phrases, relations and false caption, each checked against the caption."""
    if caption.text != item.get("caption"):  # spans index the caption as written
        raise AnnotationError(f"{path}: {where}: a grounded caption must have no leading or trailing spaces")
    phrases, relations = item.get("phrases", []), item.get("relations", [])
    if not isinstance(phrases, list) or not isinstance(relations, list):
        raise AnnotationError(f"{path}: {where}: phrases and relations must be lists")
    grounded = []
    for entry in phrases:
        start, end = _span(path, f"{where}: phrases", entry, caption.text, ("box",))
        box = entry["box"]
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)
                and box[0] < box[2] and box[1] < box[3]):
            raise AnnotationError(f"{path}: {where}: phrases: box must be [x1, y1, x2, y2] with x1 < x2, y1 < y2, "
                                  f"got {box!r}")
        grounded.append(Phrase(start, end, tuple(float(v) for v in box)))
    related = []
    for entry in relations:
        start, end = _span(path, f"{where}: relations", entry, caption.text, ("subject", "object"))
        ends = entry["subject"], entry["object"]
        if not all(isinstance(i, int) and 0 <= i < len(grounded) for i in ends) or ends[0] == ends[1]:
            raise AnnotationError(f"{path}: {where}: relations: subject and object must be two different phrase "
                                  f"indices below {len(grounded)}, got {ends[0]!r} and {ends[1]!r}")
        related.append(Relation(start, end, *ends))
    false = item.get("false_caption")
    if false is not None and (not isinstance(false, str) or not false.strip()):
        raise AnnotationError(f"{path}: {where}: false_caption must be a non-empty string")
    return Caption(caption.image_id, caption.text, tuple(grounded), tuple(related),
                   false.strip() if false is not None else None)


def _read_json_lines(path: Path, text: str) -> list[Caption]:
    captions = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            raise AnnotationError(f"{path}: line {number}: not valid JSON ({error.msg})") from error
        captions.extend(_entries(path, f"line {number}", item))
    return captions


def _read_json(path: Path, text: str) -> list[Caption]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise AnnotationError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from error
    captions = []
    if isinstance(data, dict):  # {image_id: caption or [captions]}
        for image_id, value in data.items():
            for t in value if isinstance(value, list) else [value]:
                captions.append(_caption(path, f"entry {image_id!r}", image_id, t))
    elif isinstance(data, list):
        for i, item in enumerate(data):
            captions.extend(_entries(path, f"item {i}", item))
    else:
        raise AnnotationError(f"{path}: expected a {{image_id: caption}} object or a list of objects")
    return captions


def join_with_store(captions: list[Caption], store, source: str, strict: bool = False) -> list[Caption]:
    """Keep the captions whose image is in `store`. Missing images are logged once with a few examples and
    dropped, or with `strict` raise DataError (before any training starts)."""
    kept = [c for c in captions if c.image_id in store]
    missing = sorted({c.image_id for c in captions} - {c.image_id for c in kept})
    if missing:
        examples = ", ".join(repr(m) for m in missing[:5]) + (", ..." if len(missing) > 5 else "")
        message = (
            f"{source}: {len(captions) - len(kept)} of {len(captions)} captions refer to {len(missing)} images "
            f"missing from the feature store (e.g. {examples})"
        )
        if strict:
            raise DataError(message)
        logger.warning("%s; they are dropped", message)
    if not kept:
        raise DataError(f"{source}: no caption refers to an image of the feature store")
    return kept
