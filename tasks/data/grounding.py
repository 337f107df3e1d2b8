"""Grounding files: the box a question names, and the visual rows that box is (region supervision).

A grounding file sits beside a split's annotation file (VQA v2: `v2_mscoco_<subtype>_grounding.json`, VQA-CP v2:
`vqacp_v2_<split>_grounding.json`). It is a JSON list of `{"question_id": int, "box": [x1, y1, x2, y2]}`, the
box in the image's original pixels, one entry per question that names one object. A question without an entry,
and a split without the file, are unsupervised. A box becomes target rows of the model's visual input by IoU
against the feature store's boxes, so ground-truth and detected boxes both work: every kept box (row 1 + k) with
IoU >= `GROUNDING_IOU` is a target; the IMG token (row 0) never is.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from pathlib import Path

import numpy as np

from tasks.data.annotations import int_field, load_json, require
from tasks.data.regions import iou_matrix
from tasks.errors import AnnotationError

GROUNDING_IOU = 0.5  # a stored box this close to the named box is the named object

Box = tuple[float, float, float, float]


def _box(value: object, path: Path, where: str) -> Box:
    numbers = isinstance(value, list) and len(value) == 4 and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in value)
    if not numbers or not (value[0] < value[2] and value[1] < value[3]):
        raise AnnotationError(f"{path}: {where}: box must be [x1, y1, x2, y2] in pixels with x1 < x2 and y1 < y2, "
                              f"got {str(value)[:60]}")
    return (float(value[0]), float(value[1]), float(value[2]), float(value[3]))


def read_grounding(path: str | Path, question_ids: Collection[int]) -> dict[int, Box]:
    """{question_id: box} of a grounding file ({} when there is none). A file of the wrong shape, a box that is
    not [x1, y1, x2, y2], a repeated question, or a question_id that `question_ids` (the split's questions) lacks
    is an AnnotationError naming the file and the entry."""
    path = Path(path)
    if not path.is_file():
        return {}
    data = load_json(path)
    if not isinstance(data, list):
        raise AnnotationError(f"{path}: expected a JSON list of {{\"question_id\", \"box\"}} entries, got a "
                              f"{type(data).__name__}")
    boxes: dict[int, Box] = {}
    for i, entry in enumerate(data):
        where = f"entry {i}"
        require(entry, ["question_id", "box"], str(path), where)
        question_id = int_field(entry, "question_id", str(path), where)
        if question_id not in question_ids:
            raise AnnotationError(f"{path}: {where} is for question_id {question_id}, which the questions file "
                                  "does not have")
        if question_id in boxes:
            raise AnnotationError(f"{path}: {where} repeats question_id {question_id}")
        boxes[question_id] = _box(entry["box"], path, where)
    return boxes


def target_rows(box: Box | None, kept_boxes: np.ndarray) -> np.ndarray:
    """[1 + K] bool: the visual rows (IMG token first, then the K kept boxes) that are the named object."""
    rows = np.zeros(1 + len(kept_boxes), dtype=bool)
    if box is not None and len(kept_boxes):
        rows[1:] = iou_matrix(np.array([box]), kept_boxes)[0] >= GROUNDING_IOU
    return rows
