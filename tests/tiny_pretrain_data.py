"""Tiny, learnable image-caption data for pretraining tests: objects of 6 colours, captions that name them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from features.store import FeatureStoreWriter

COLOURS = ["red", "blue", "green", "yellow", "white", "black"]  # region class c + 1 (0 = background)
WORDS = [*COLOURS, "a", "and", "with", "picture", "of", "thing", "things", "two", "one"]
FEATURE_DIM, NUM_CLASSES = 16, 7  # the "tiny" model preset's v_feature_size / v_target_size


def write_vocab(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return directory


def make_images(count: int, seed: int = 0, boxes_per_image: int = 8) -> dict[str, dict]:
    """Per image: region classes, features (class prototype + noise), boxes, cls_prob peaked at the class."""
    rng = np.random.default_rng(seed)
    prototypes = np.random.default_rng(99).normal(size=(NUM_CLASSES, FEATURE_DIM)).astype(np.float32)
    images = {}
    for i in range(count):
        classes = rng.integers(1, NUM_CLASSES, size=boxes_per_image)
        features = prototypes[classes] + 0.3 * rng.normal(size=(boxes_per_image, FEATURE_DIM)).astype(np.float32)
        x = rng.uniform(0, 60, size=(boxes_per_image, 1))
        y = rng.uniform(0, 40, size=(boxes_per_image, 1))
        boxes = np.concatenate([x, y, x + rng.uniform(5, 40, (boxes_per_image, 1)),
                                y + rng.uniform(5, 40, (boxes_per_image, 1))], axis=1).astype(np.float32)
        cls_prob = np.full((boxes_per_image, NUM_CLASSES), 0.02, np.float32)
        cls_prob[np.arange(boxes_per_image), classes] = 1.0 - 0.02 * (NUM_CLASSES - 1)
        images[f"img{seed}_{i:03d}"] = dict(classes=classes, features=features, boxes=boxes, cls_prob=cls_prob)
    return images


def caption_for(classes: np.ndarray) -> str:
    names = [COLOURS[c - 1] for c in dict.fromkeys(classes.tolist())][:3]
    return "a picture of " + " and ".join(f"a {n} thing" for n in names)


def write_store(path: Path, images: dict[str, dict], cls_prob: bool = True) -> Path:
    with FeatureStoreWriter(path, feature_dim=FEATURE_DIM, cls_prob_dim=NUM_CLASSES if cls_prob else None,
                            extractor={"detector": "synthetic", "file": path.name}) as w:
        for image_id, image in images.items():
            w.add(image_id, (80, 100), image["features"], image["boxes"],
                  cls_prob=image["cls_prob"] if cls_prob else None)
    return path


def write_captions_json(path: Path, images: dict[str, dict], extra_ids: tuple[str, ...] = ()) -> Path:
    """The reference's caption_{train,val}.json form: {image_id: caption}."""
    data = {image_id: caption_for(image["classes"]) for image_id, image in images.items()}
    data.update({image_id: "a picture of a red thing" for image_id in extra_ids})
    path.write_text(json.dumps(data))
    return path


def write_pretraining_data(root: Path, train_images: int = 48, val_images: int = 12) -> dict[str, Path]:
    train, val = make_images(train_images, seed=0), make_images(val_images, seed=1)
    return {
        "vocab": write_vocab(root / "vocab"),
        "train_features": write_store(root / "train.h5", train),
        "train_captions": write_captions_json(root / "caption_train.json", train),
        "val_features": write_store(root / "val.h5", val),
        "val_captions": write_captions_json(root / "caption_val.json", val),
    }
