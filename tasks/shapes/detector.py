"""The shapes world as a detection data set, and the check that a detector was trained on this world's classes.

`features.mobilenet_rcnn` trains on any (image, boxes, class ids) list; this module reads a generated world's
`scenes.json` into that list, and says what the world is (`world_record`: name, version, seed, classes), the record
a detector directory keeps and a feature store of the world carries, so a detector of another world version is
refused by name.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from features.detector_training import DetectionSample
from tasks.errors import DataError
from tasks.shapes.world import CLASS_NAMES, WORLD_VERSION, class_id

WORLD_NAME = "shapes"


def current_world(seed: int | None = None) -> dict:
    """What this code's shapes world is: the record a detector or a feature store of it keeps."""
    record = {"name": WORLD_NAME, "version": WORLD_VERSION, "classes": list(CLASS_NAMES)}
    if seed is not None:
        record["seed"] = seed
    return record


def read_scenes(world: str | Path) -> dict:
    """The world's `scenes.json`, checked to be of this code's version and classes."""
    path = Path(world) / "scenes.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: cannot read the shapes world ({error}); run `vilbert shapes-world` first") from error
    version = data.get("version", 1)  # worlds written before the version field are version 1
    if version != WORLD_VERSION or data.get("classes") != CLASS_NAMES:
        raise DataError(f"{path}: a shapes world of version {version}, this code draws version {WORLD_VERSION}; "
                        f"generate it again with `vilbert shapes-world`")
    return data


def world_record(world: str | Path) -> dict:
    """`current_world` with the seed of the world in `world`."""
    return current_world(int(read_scenes(world)["seed"]))


def detection_samples(world: str | Path, splits: tuple[str, ...]) -> list[DetectionSample]:
    """The images of `splits` with their ground-truth boxes and colour x shape class ids."""
    world = Path(world)
    samples = []
    for image in read_scenes(world)["images"]:
        if image["split"] not in splits:
            continue
        shapes = image["shapes"]
        samples.append(DetectionSample(
            image_id=str(image["image_id"]), path=str(world / "images" / image["file_name"]),
            boxes=np.asarray([s["box"] for s in shapes], np.float32).reshape(-1, 4),
            labels=np.asarray([class_id(s["colour"], s["kind"]) for s in shapes], np.int64)))
    if not samples:
        raise DataError(f"{world / 'scenes.json'}: no images in split(s) {', '.join(splits)}")
    return samples

