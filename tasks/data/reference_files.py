"""Readers for the reference's side files a user of the original repository already has.

- `hard_negative.pkl` (retrieval): {"train_image_list": ids, "train_hard_pool": [N, >= 100] indices into that
  list}; column 0 is skipped, as the reference samples from column 1 onward. Read as this project's
  {image_id: [neighbour ids, nearest first]}.
- `cache/coco_test_ids.npy`, `cache/flickr_test_ids.npy`: image ids held out from training.
- MAttNet detections JSON (RefCOCO detected boxes): a list of {"image_id", "box" [x, y, w, h], "score",
  "category_id", ...}.
- COCO / refer `instances.json`: {"images": [{"id", "file_name"}], "annotations": [{"image_id", "bbox"}]}.

Boxes come out as {image id: [[x1, y1, x2, y2], ...]}, the given-boxes file of `vilbert extract --boxes`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from features.errors import FeaturesError
from features.npy import ArrayFileError, load_array
from features.safe_pickle import safe_load
from tasks.errors import AnnotationError


def _json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise AnnotationError(f"{path}: cannot read ({error.strerror})") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise AnnotationError(f"{path}: not valid JSON ({error})") from None


def read_hard_negatives(path: str | Path) -> dict[str, list[str]]:
    """The retrieval hard-negative pool from the reference's hard_negative.pkl or this project's JSON."""
    path = Path(path)
    if path.suffix != ".pkl":
        pool = _json(path)
        if not isinstance(pool, dict):
            raise AnnotationError(f"{path}: expected {{image_id: [neighbour ids]}}")
        return pool
    try:
        data = safe_load(path)
    except FeaturesError as error:
        raise AnnotationError(str(error)) from None
    if not isinstance(data, dict) or not {"train_image_list", "train_hard_pool"} <= set(data):
        raise AnnotationError(f"{path}: expected a dict with train_image_list and train_hard_pool")
    ids = [str(i) for i in np.asarray(data["train_image_list"]).reshape(-1).tolist()]
    pool = np.asarray(data["train_hard_pool"])
    if pool.ndim != 2 or pool.shape[0] != len(ids) or pool.shape[1] < 2 or pool.dtype.kind not in "iu":
        raise AnnotationError(f"{path}: train_hard_pool must be integer [{len(ids)}, >= 2], "
                              f"got {pool.dtype} {list(pool.shape)}")
    if pool.size and (pool.min() < 0 or pool.max() >= len(ids)):
        raise AnnotationError(f"{path}: train_hard_pool indexes outside train_image_list (0..{len(ids) - 1})")
    return {image_id: [ids[j] for j in row[1:]] for image_id, row in zip(ids, pool.tolist(), strict=True)}


def read_image_ids(path: str | Path) -> set[str]:
    """Image ids from a numpy file (coco_test_ids.npy) or a text file (one id per line), as strings."""
    path = Path(path)
    if path.suffix == ".npy":
        try:
            ids = load_array(path)
        except ArrayFileError as error:
            raise AnnotationError(f"not a numpy array of ids: {error}") from None
        if ids.dtype.kind not in "iuU":
            raise AnnotationError(f"{path}: expected integer or string ids, got {ids.dtype}")
        return {str(i) for i in ids.reshape(-1).tolist()}
    try:
        return {line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()}
    except OSError as error:
        raise AnnotationError(f"{path}: cannot read ({error.strerror})") from None
    except UnicodeDecodeError as error:
        raise AnnotationError(f"{path}: not UTF-8 text (byte {error.start}); expected one image id per line") from None


def _xywh_to_xyxy(box, path: Path, where: str) -> list[float]:
    if not isinstance(box, list) or len(box) != 4 or not all(isinstance(v, (int, float)) for v in box):
        raise AnnotationError(f"{path}: {where}: box must be 4 numbers [x, y, w, h], got {box!r}")
    x, y, w, h = (float(v) for v in box)
    if not np.isfinite([x, y, w, h]).all() or w < 0 or h < 0:
        raise AnnotationError(f"{path}: {where}: box {box} has a negative or non-finite size")
    return [x, y, x + w, y + h]


def coco_image_names(path: str | Path, ids_from: str = "stem") -> dict[int, str]:
    """COCO image id -> the id a feature store uses: the file stem (`stem`) or the number itself (`int`)."""
    path = Path(path)
    data = _json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise AnnotationError(f"{path}: expected a COCO instances file with an images list")
    names: dict[int, str] = {}
    owners: dict[str, int] = {}
    for i, image in enumerate(data["images"]):
        if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
            raise AnnotationError(f"{path}: images[{i}] needs id and file_name")
        number = _coco_id(image["id"], path, f"images[{i}].id")
        if number in names:
            raise AnnotationError(f"{path}: images[{i}] repeats image id {number}")
        name = Path(str(image["file_name"])).stem if ids_from == "stem" else str(number)
        if name in owners:
            raise AnnotationError(f"{path}: images[{i}] (id {number}) and image id {owners[name]} have the same file "
                                  f"stem {name!r}, so their boxes would merge; use --ids-from int")
        names[number], owners[name] = name, number
    return names


def _coco_id(value, path: Path, where: str) -> int:
    """A COCO image id: an integer (a whole-number float or digit string too), never a bool or a fraction."""
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not (math.isfinite(value) and value.is_integer())):
        raise AnnotationError(f"{path}: {where} is {value!r}, not an integer image id")
    return int(value)


def coco_boxes(path: str | Path, ids_from: str = "stem") -> dict[str, list[list[float]]]:
    """Ground-truth boxes of a COCO / refer instances.json, x1 y1 x2 y2, per image in annotation order."""
    path = Path(path)
    names = coco_image_names(path, ids_from)
    annotations = _json(path).get("annotations")
    if not isinstance(annotations, list):
        raise AnnotationError(f"{path}: expected an annotations list")
    boxes: dict[str, list[list[float]]] = {}
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict) or "image_id" not in ann or "bbox" not in ann:
            raise AnnotationError(f"{path}: annotations[{i}] needs image_id and bbox")
        number = _coco_id(ann["image_id"], path, f"annotations[{i}].image_id")
        if number not in names:
            raise AnnotationError(f"{path}: annotations[{i}] refers to image {ann['image_id']}, not in images")
        name = names[number]
        boxes.setdefault(name, []).append(_xywh_to_xyxy(ann["bbox"], path, f"annotations[{i}]"))
    return boxes


def mattnet_boxes(path: str | Path, names: dict[int, str], min_score: float = 0.0) -> dict[str, list[list[float]]]:
    """Detected boxes of a MAttNet detections JSON (list of {image_id, box [x, y, w, h], score}), x1 y1 x2 y2,
    best score first per image; `names` maps COCO image ids to store ids (from `coco_image_names`)."""
    path = Path(path)
    data = _json(path)
    if isinstance(data, dict) and isinstance(data.get("dets"), list):
        data = data["dets"]
    if not isinstance(data, list):
        raise AnnotationError(f"{path}: expected a list of detections {{image_id, box, score}}")
    scored: dict[str, list[tuple[float, list[float]]]] = {}
    for i, det in enumerate(data):
        if not isinstance(det, dict) or "image_id" not in det or "box" not in det:
            raise AnnotationError(f"{path}: detection {i} needs image_id and box")
        number = _coco_id(det["image_id"], path, f"detection {i} image_id")
        if number not in names:
            raise AnnotationError(f"{path}: detection {i} is on image {det['image_id']}, not in the instances file")
        score = det.get("score", 1.0)
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise AnnotationError(f"{path}: detection {i} score is {score!r}, not a finite number")
        if score >= min_score:
            box = _xywh_to_xyxy(det["box"], path, f"detection {i}")
            scored.setdefault(names[number], []).append((float(score), box))
    return {name: [box for _, box in sorted(items, key=lambda item: -item[0])] for name, items in scored.items()}
