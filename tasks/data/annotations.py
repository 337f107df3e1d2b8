"""Reading annotation files and joining them with the feature store: JSON with errors that name the file,
required keys, image ids matched to store ids, items without features counted and reported.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from features.store import FeatureStore
from tasks.errors import AnnotationError, ConfigError, DataError

logger = logging.getLogger(__name__)


def load_json(path: str | Path) -> Any:
    """Read a JSON file, turning unreadable or invalid files into an AnnotationError naming the file."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as error:
        raise AnnotationError(f"{path}: cannot read ({error.strerror or error})") from error
    except json.JSONDecodeError as error:
        raise AnnotationError(f"{path}: not valid JSON ({error})") from error


def require(entry: Any, keys: Iterable[str], source: str, where: str) -> None:
    """Raise AnnotationError naming the file, the entry and the first missing key."""
    if not isinstance(entry, Mapping):
        raise AnnotationError(f"{source}: {where} is a {type(entry).__name__}, expected an object")
    for key in keys:
        if key not in entry:
            raise AnnotationError(f"{source}: {where} has no {key!r}")


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def int_field(entry: Mapping, key: str, source: str, where: str) -> int:
    """`entry[key]` as an int: JSON integers and digit strings; anything else is an AnnotationError."""
    value = entry[key]
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    raise AnnotationError(f"{source}: {where}: {key} must be an integer, got {_short(value)}")


def str_field(entry: Mapping, key: str, source: str, where: str) -> str:
    """`entry[key]` as a non-empty string (a null or a number is an AnnotationError, never the text "None")."""
    value = entry[key]
    if not isinstance(value, str) or not value.strip():
        raise AnnotationError(f"{source}: {where}: {key} must be a non-empty string, got {_short(value)}")
    return value


def id_field(entry: Mapping, key: str, source: str, where: str) -> int | str:
    """`entry[key]` as an image or object id: an integer or a non-empty string."""
    value = entry[key]
    if (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, str) and value.strip()):
        return value
    raise AnnotationError(f"{source}: {where}: {key} must be an integer or a string id, got {_short(value)}")


def box_field(entry: Mapping, key: str, source: str, where: str) -> list[float]:
    """`entry[key]` as a box: exactly 4 finite numbers with non-negative width and height (COCO x y w h)."""
    value = entry[key]
    numbers = value if isinstance(value, list) and len(value) == 4 else None
    if numbers is None or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers):
        raise AnnotationError(f"{source}: {where}: {key} must be a list of 4 numbers, got {_short(value)}")
    try:
        box = [float(v) for v in numbers]
    except OverflowError:
        box = [math.inf]
    if not all(math.isfinite(v) for v in box) or box[2] < 0 or box[3] < 0:
        raise AnnotationError(f"{source}: {where}: {key} must be 4 finite numbers with width, height >= 0, "
                              f"got {_short(value)}")
    return box


def list_field(entry: Mapping, key: str, source: str, where: str) -> list:
    """`entry[key]`, which must be a list."""
    value = entry[key]
    if not isinstance(value, list):
        raise AnnotationError(f"{source}: {where}: {key} must be a list, got {_short(value)}")
    return value


def image_key_resolver(store_ids: Iterable[str]) -> Callable[[Any], str | None]:
    """Map an annotation's image id (int or str) to a feature-store id.

    Exact matches win; otherwise a numeric id (an int or a string of digits) finds the store id ending in that
    number, so COCO ids like 9 find "COCO_val2014_000000000009" or "000000000009", and Flickr30k "1000092795"
    finds "1000092795". A named id that is not in the store ("other_dataset_7") matches nothing: its number is
    not taken for another image's. Returns a function id -> store id or None.
    """
    exact = set(store_ids)
    by_number: dict[int, str] = {}
    for sid in exact:
        match = re.search(r"(\d+)$", sid)
        if match:
            by_number.setdefault(int(match.group(1)), sid)

    def resolve(image_id: Any) -> str | None:
        key = str(image_id)
        if key in exact:
            return key
        return by_number.get(int(key)) if key.isdigit() else None

    return resolve


def keep_known_images(items: list, image_of: Callable[[Any], Any], resolve: Callable[[Any], str | None], source: str,
                      what: str, strict: bool = False) -> list[tuple[Any, str]]:
    """Drop items whose image has no features, with one counted warning (never an error mid-epoch); with
    `strict` (`data.strict`, `vilbert evaluate --strict`) they are a DataError naming the first few.

    Scores still count the dropped items, as wrong (see each task's `score`)."""
    kept, missing = [], set()
    for item in items:
        sid = resolve(image_of(item))
        if sid is None:
            missing.add(str(image_of(item)))
            continue
        kept.append((item, sid))
    if missing:
        example = ", ".join(sorted(missing)[:3])
        if strict:
            raise DataError(f"{source}: {len(items) - len(kept)} {what} have no features: {len(missing)} image "
                            f"id(s) not in the feature store (e.g. {example})")
        logger.warning("%s: %d %s skipped: %d image id(s) not in the feature store (e.g. %s); scores count them "
                       "as wrong",
                       source, len(items) - len(kept), what, len(missing), example)
    if items and not kept:
        raise DataError(f"{source}: none of the {len(items)} {what} has an image in the feature store")
    return kept


def open_feature_store(paths: list[str], key: str = "data.features") -> FeatureStore:
    """The feature store over `paths` (joined by image id); an empty list is a ConfigError naming `key`."""
    if not paths:
        raise ConfigError(f"{key}: name the feature store file(s)")
    return FeatureStore(paths)
