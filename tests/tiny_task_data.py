"""Tiny fine-tuning data in each official format, written by the tests themselves (no downloads)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np

from features.store import FeatureStoreWriter

WORDS = (
    "what color is the a cat dog ball red blue green how many are there two three yes no man "
    "on left right small big person holding sitting tree car shirt white black"
).split()


def write_vocab(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (directory / "vocab.txt").write_text("\n".join(tokens) + "\n")
    return directory


def write_store(path: Path, image_ids: list[str], boxes_per_image: int = 4, feature_dim: int = 16,
                seed: int = 0, boxes: dict[str, np.ndarray] | None = None) -> Path:
    """A feature store with random features; 100×80 images; boxes tile the image unless given."""
    rng = np.random.default_rng(seed)
    with FeatureStoreWriter(path, feature_dim=feature_dim) as writer:
        for image_id in image_ids:
            if boxes and image_id in boxes:
                image_boxes = np.asarray(boxes[image_id], dtype=np.float32)
            else:
                x = rng.uniform(0, 50, size=(boxes_per_image, 1))
                y = rng.uniform(0, 40, size=(boxes_per_image, 1))
                image_boxes = np.concatenate([x, y, x + 40, y + 30], axis=1).astype(np.float32)
            features = rng.normal(size=(len(image_boxes), feature_dim)).astype(np.float32)
            writer.add(image_id, (80, 100), features, image_boxes)
    return path


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


# ------------------------------------------------------------------------------------------------------ VQA

VQA_QUESTIONS = ["what color is the cat", "how many dogs are there", "is the man sitting", "what color is the ball"]
VQA_ANSWERS = [["red"] * 6 + ["blue"] * 4, ["two"] * 3 + ["2"] * 5 + ["3"] * 2, ["yes"] * 10, ["blue"] * 7 + ["red"] * 3]
VQA_TYPES = ["other", "number", "yes/no", "other"]


def write_vqa(root: Path, images_per_subset: int = 3) -> dict:
    """train2014/val2014 questions+annotations, test2015 and test-dev2015 questions; image ids 1.. per subset."""
    root.mkdir(parents=True, exist_ok=True)
    qid = 1000
    image_ids = []
    for subset, offset in (("train2014", 0), ("val2014", 100), ("test2015", 200), ("test-dev2015", 200)):
        questions, annotations = [], []
        for image in range(images_per_subset):
            image_id = offset + image + 1
            image_ids.append(image_id)
            for k, text in enumerate(VQA_QUESTIONS):
                qid += 1
                questions.append({"question_id": qid, "image_id": image_id, "question": text})
                answers = VQA_ANSWERS[(k + image) % len(VQA_ANSWERS)]
                annotations.append({
                    "question_id": qid, "image_id": image_id, "question_type": text.split()[0],
                    "answer_type": VQA_TYPES[(k + image) % len(VQA_TYPES)],
                    "multiple_choice_answer": max(set(answers), key=answers.count),
                    "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                                for i, a in enumerate(answers)],
                })
        write_json(root / f"v2_OpenEnded_mscoco_{subset}_questions.json", {"questions": questions})
        if subset in ("train2014", "val2014"):
            write_json(root / f"v2_mscoco_{subset}_annotations.json", {"annotations": annotations})
    return {"image_ids": sorted(set(image_ids))}


# ------------------------------------------------------------------------------------------------- VQA-CP v2

# (question, question type, answer type, train answer, test answer): per type, test's answer is train's rarest
VQA_CP_QUESTIONS = [("what color is the cat", "what color is the", "other", "red", "blue"),
                    ("how many dogs are there", "how many", "number", "2", "3"),
                    ("is the man sitting", "is the", "yes/no", "yes", "no")]
VQA_CP_IMAGES = {"train": [(1, "train2014"), (2, "train2014"), (101, "val2014")],
                 "test": [(3, "train2014"), (102, "val2014")]}


def write_vqa_cp(root: Path) -> dict:
    """`vqacp_v2_{train,test}_{questions,annotations}.json` in the released layout: JSON lists, every entry with
    `coco_split`. Each question type's train answer (10 humans agree) is the test answer of one human in ten."""
    root.mkdir(parents=True, exist_ok=True)
    qid = 5000
    image_ids = []
    for split, images in VQA_CP_IMAGES.items():
        questions, annotations = [], []
        for image_id, coco_split in images:
            image_ids.append(image_id)
            for text, question_type, answer_type, train_answer, test_answer in VQA_CP_QUESTIONS:
                qid += 1
                answers = [train_answer] * 10 if split == "train" else [test_answer] * 9 + [train_answer]
                questions.append({"image_id": image_id, "question": text, "question_id": qid,
                                  "coco_split": coco_split})
                annotations.append({"question_type": question_type, "multiple_choice_answer": answers[0],
                                    "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                                                for i, a in enumerate(answers)],
                                    "image_id": image_id, "answer_type": answer_type, "question_id": qid,
                                    "coco_split": coco_split})
        write_json(root / f"vqacp_v2_{split}_questions.json", questions)
        write_json(root / f"vqacp_v2_{split}_annotations.json", annotations)
    return {"image_ids": sorted(set(image_ids))}


# ------------------------------------------------------------------------------------------------ retrieval

CAPTIONS = ["a man holding a red ball", "a white cat on the left", "two dogs sitting", "a big tree", "a black car",
            "a small person", "a man in a blue shirt", "a green ball on the right"]


def write_karpathy(path: Path, num_images: int = 6, test_images: int = 3, captions_per_image: int = 2) -> list[str]:
    """A `dataset_flickr30k.json`-style file; returns the image ids (file stems)."""
    images, ids = [], []
    for i in range(num_images):
        stem = str(1000 + i)
        ids.append(stem)
        sentences = [{"raw": CAPTIONS[(i + j) % len(CAPTIONS)], "tokens": [], "imgid": i, "sentid": i * 10 + j}
                     for j in range(captions_per_image)]
        split = "test" if i >= num_images - test_images else "train"
        images.append({"filename": f"{stem}.jpg", "imgid": i, "split": split, "sentences": sentences})
    write_json(path, {"images": images, "dataset": "flickr30k"})
    return ids


# --------------------------------------------------------------------------------------------------- refexp


def write_refcoco(root: Path, refs_name: str = "refs(unc).p", splits=("train", "val", "testA", "testB")) -> dict:
    """refs pickle (protocol 2, like the toolkit's) + instances.json; one object per image with a known box."""
    root.mkdir(parents=True, exist_ok=True)
    images, annotations, refs, boxes = [], [], [], {}
    ref_id = 0
    for i in range(8):
        image_id = 500 + i
        split = splits[i % len(splits)]
        images.append({"id": image_id, "file_name": f"COCO_train2014_{image_id:012d}.jpg", "height": 80, "width": 100})
        # the referred object (ann 2i) and a distractor (ann 2i + 1), COCO xywh
        target = [10.0 + i, 10.0, 30.0, 20.0]
        other = [60.0, 40.0, 30.0, 30.0]
        for k, bbox in enumerate((target, other)):
            annotations.append({"id": 2 * i + k, "image_id": image_id, "bbox": bbox, "category_id": 1,
                                "area": bbox[2] * bbox[3], "iscrowd": 0})
        refs.append({"ref_id": ref_id, "ann_id": 2 * i, "image_id": image_id, "split": split, "category_id": 1,
                     "file_name": f"COCO_train2014_{image_id:012d}_{2 * i}.jpg", "sent_ids": [2 * i, 2 * i + 1],
                     "sentences": [{"sent": "man on the left", "raw": "Man on the left", "sent_id": 2 * i,
                                    "tokens": ["man", "on", "the", "left"]},
                                   {"sent": "small person", "raw": "small person", "sent_id": 2 * i + 1,
                                    "tokens": ["small", "person"]}]})
        ref_id += 1
        # detections: one matching the target closely, one the distractor, one junk box
        boxes[str(image_id)] = np.array([[11.0 + i, 11.0, 40.0 + i, 30.0], [60.0, 40.0, 90.0, 70.0],
                                         [0.0, 50.0, 20.0, 79.0]])
    with open(root / refs_name, "wb") as f:
        pickle.dump(refs, f, protocol=2)
    write_json(root / "instances.json", {"images": images, "annotations": annotations,
                                         "categories": [{"id": 1, "name": "person"}]})
    return {"image_ids": [str(500 + i) for i in range(8)], "boxes": boxes, "annotations": annotations}


def write_three_tasks(root: Path) -> Path:
    """Tiny VQA, retrieval and RefCOCO data under `root`: `tok/`, `<task>/` annotation folders and `<task>.h5`
    stores (retrieval's Karpathy JSON at `retrieval/dataset_flickr30k.json`)."""
    write_vocab(root / "tok")
    info = write_vqa(root / "vqa")
    write_store(root / "vqa.h5", [str(i) for i in info["image_ids"]])
    write_store(root / "retrieval.h5", write_karpathy(root / "retrieval" / "dataset_flickr30k.json"))
    refs = write_refcoco(root / "refcoco")
    write_store(root / "refcoco.h5", refs["image_ids"], boxes=refs["boxes"])
    return root
