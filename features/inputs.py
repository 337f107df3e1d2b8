"""What to extract: image lists (folder, text file, JSON) with their ids, and given-box files.

Every problem in these inputs is found before any image is decoded, and reported as one FeaturesError naming the
file and the entry.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from features.errors import FeaturesError
from features.images import IMAGE_EXTENSIONS

BOX_FORMATS = ("xyxy", "xywh")


@dataclass(frozen=True)
class ImageInput:
    image_id: str
    path: str


def list_images(source: str | os.PathLike, ids: str | os.PathLike | None = None) -> list[ImageInput]:
    """Images from a folder (recursive, by extension), a JSON list, or a text file of paths (one per line).

    Ids are file stems unless the JSON gives `image_id`s or `ids` names a text file with one id per line, in the
    same order as the images. Relative paths in a list file are relative to that file's folder. Duplicate ids are
    refused.
    """
    source = Path(source)
    if source.is_dir():
        paths = sorted(
            p for p in source.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        )
        images = [ImageInput(p.stem, str(p)) for p in paths]
    elif source.is_file():
        images = _json_list(source) if source.suffix.lower() == ".json" else _text_list(source)
    else:
        raise FeaturesError(f"{source}: no such folder or image list")
    if ids is not None:
        images = _with_ids(images, Path(ids))
    if not images:
        raise FeaturesError(f"{source}: no images found (extensions {', '.join(IMAGE_EXTENSIONS)})")
    _refuse_duplicates(images, source)
    return images


def _resolve(base: Path, entry: str) -> str:
    path = Path(entry).expanduser()
    return str(path if path.is_absolute() else base / path)


def _text_list(path: Path) -> list[ImageInput]:
    lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    entries = [line for line in lines if line and not line.startswith("#")]
    return [ImageInput(Path(entry).stem, _resolve(path.parent, entry)) for entry in entries]


def _json_list(path: Path) -> list[ImageInput]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise FeaturesError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, list):
        raise FeaturesError(f"{path}: expected a JSON list of paths or {{\"image_id\", \"path\"}} objects")
    images = []
    for i, entry in enumerate(data):
        if isinstance(entry, str):
            images.append(ImageInput(Path(entry).stem, _resolve(path.parent, entry)))
        elif isinstance(entry, dict) and isinstance(entry.get("path"), str):
            image_id = entry.get("image_id", Path(entry["path"]).stem)
            images.append(ImageInput(str(image_id), _resolve(path.parent, entry["path"])))
        else:
            raise FeaturesError(f"{path}: entry {i} must be a path or an object with \"path\" (and \"image_id\")")
    return images


def _with_ids(images: list[ImageInput], ids_path: Path) -> list[ImageInput]:
    try:
        ids = [line.strip() for line in ids_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as error:
        raise FeaturesError(f"{ids_path}: cannot read the id list ({error.strerror})") from error
    if len(ids) != len(images):
        raise FeaturesError(f"{ids_path}: {len(ids)} ids for {len(images)} images; give one id per image, in order")
    return [ImageInput(image_id, im.path) for image_id, im in zip(ids, images, strict=True)]


def _refuse_duplicates(images: list[ImageInput], source: Path) -> None:
    seen: dict[str, str] = {}
    clashes = []
    for im in images:
        if im.image_id in seen:
            clashes.append(f"{im.image_id!r} ({seen[im.image_id]} and {im.path})")
        seen.setdefault(im.image_id, im.path)
    if clashes:
        more = f" and {len(clashes) - 3} more" if len(clashes) > 3 else ""
        raise FeaturesError(
            f"{source}: {len(clashes)} duplicate image id(s): {'; '.join(clashes[:3])}{more}; "
            "give unique ids (JSON list with image_id, or --ids)"
        )


def load_boxes(path: str | os.PathLike, box_format: str) -> dict[str, np.ndarray]:
    """Given boxes: JSON {image_id: [[4 numbers], ...]} in `box_format`; returned as float32 [K, 4] x1 y1 x2 y2."""
    if box_format not in BOX_FORMATS:
        raise FeaturesError(f"box format must be one of {', '.join(BOX_FORMATS)}, got {box_format!r}")
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise FeaturesError(f"{path}: cannot read the boxes file ({error.strerror})") from error
    except (ValueError, UnicodeDecodeError) as error:
        raise FeaturesError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise FeaturesError(f"{path}: expected a JSON object {{image_id: [[x1, y1, x2, y2], ...]}}")
    boxes = {}
    for image_id, entries in data.items():
        if not isinstance(entries, list) or not all(_is_box(b) for b in entries):
            raise FeaturesError(f"{path}: image {image_id!r}: expected a list of boxes of 4 finite numbers each")
        array = np.asarray(entries, dtype=np.float64).reshape(-1, 4)
        if box_format == "xywh":
            if (array[:, 2:] < 0).any():
                raise FeaturesError(f"{path}: image {image_id!r}: negative width or height in xywh boxes")
            array = np.concatenate([array[:, :2], array[:, :2] + array[:, 2:]], axis=1)
        boxes[str(image_id)] = array.astype(np.float32)
    return boxes


def _is_box(value) -> bool:
    """4 numbers that are finite as float32 (a 400-digit coordinate is not a box)."""
    if not (isinstance(value, list) and len(value) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        return False
    try:
        return all(math.isfinite(v) and abs(v) < 3e38 for v in value)
    except OverflowError:  # an int too large for a float
        return False


@dataclass
class ClippedBoxes:
    boxes: np.ndarray  # [K, 4] inside the image
    clipped: int  # boxes that reached outside the image
    degenerate: int  # boxes with no area after clipping (still kept, in order)


def clip_boxes(boxes: np.ndarray, image_hw: tuple[int, int]) -> ClippedBoxes:
    """Clip x1 y1 x2 y2 boxes to the image; count what changed. Order and count are preserved."""
    height, width = image_hw
    limits = np.array([width, height, width, height], np.float32)
    clipped = np.clip(boxes, 0, limits)
    changed = int(np.any(clipped != boxes, axis=1).sum())
    degenerate = int(((clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1])).sum())
    return ClippedBoxes(clipped.astype(np.float32), changed, degenerate)
