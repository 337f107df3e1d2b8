"""Reading annotation files and joining them with the feature store: JSON with errors that name the file,
required keys, image ids matched to store ids, items without features counted and reported.
"""

from __future__ import annotations

import json
import logging
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


def image_key_resolver(store_ids: Iterable[str]) -> Callable[[Any], str | None]:
    """Map an annotation's image id (int or str) to a feature-store id.

    Exact matches win; otherwise the store id's trailing number is used, so COCO ids like 9 find
    "COCO_val2014_000000000009" or "000000000009", and Flickr30k "1000092795" finds "1000092795".
    Returns a function id -> store id or None.
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
        match = re.search(r"(\d+)$", key)
        return by_number.get(int(match.group(1))) if match else None

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
