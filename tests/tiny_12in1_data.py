"""Tiny files in the official formats of the other 12-in-1 datasets, written by the tests (no downloads).

Every writer puts its annotation files under `root` and returns the image ids the feature store needs (and,
for the pointing and grounding tasks, the boxes each image's stores should hold).
"""

from __future__ import annotations

import json
from pathlib import Path

from tiny_task_data import write_json  # noqa: F401 (re-exported for the tests)

SENTENCES = ["a man holding a red ball", "two dogs sitting on the left", "a white cat", "a big tree on the right",
             "a small person in a blue shirt", "there are three black cars"]


def write_jsonl(path: Path, entries: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(entry) + "\n" for entry in entries))
    return path


def write_snli_ve(root: Path) -> list[str]:
    """snli_ve_{train,dev,test}.jsonl: 6 hypotheses per split over 3 Flickr30k images each."""
    labels = ("entailment", "neutral", "contradiction")
    ids = []
    for s, split in enumerate(("train", "dev", "test")):
        entries = []
        for k in range(6):
            image = str(1000 + 10 * s + k % 3)
            ids.append(image)
            entries.append({"Flikr30kID": f"{image}.jpg", "sentence1": "a premise", "sentence2": SENTENCES[k],
                            "gold_label": labels[(k + s) % 3], "pairID": f"{image}.jpg#{k}r1{labels[k % 3][0]}",
                            "captionID": f"{image}.jpg#{k}"})
        write_jsonl(root / f"snli_ve_{split}.jsonl", entries)
    return sorted(set(ids))


def write_nlvr2(root: Path) -> list[str]:
    """train.json / dev.json (JSON lines): 2 sentences x 2 image pairs per set; returns the image stems."""
    ids = []
    for split in ("train", "dev", "test1"):
        entries = []
        for set_id in (1, 2):
            for pair in (0, 1):
                ids += [f"{split}-{set_id}-{pair}-img0", f"{split}-{set_id}-{pair}-img1"]
                for sentence in (0, 1):
                    entry = {"identifier": f"{split}-{set_id}-{pair}-{sentence}",
                             "sentence": SENTENCES[(set_id + sentence) % len(SENTENCES)],
                             "left_url": "http://x/l.jpg", "right_url": "http://x/r.jpg", "synset": "n0", "query": "q",
                             "directory": set_id}
                    if split != "test1":
                        entry["label"] = "True" if (pair + sentence) % 2 == 0 else "False"
                    entries.append(entry)
        write_jsonl(root / f"{split}.json", entries)
    return ids


GQA_ANSWERS = ["yes", "no", "red", "left"]


def write_gqa(root: Path) -> list[str]:
    """{train,val,testdev}_balanced_questions.json: 6 questions over 3 images per split."""
    ids = []
    for s, split in enumerate(("train", "val", "testdev")):
        questions = {}
        for k in range(6):
            image = f"n{100 * s + k % 3}"
            ids.append(image)
            questions[f"{s}{k:03d}"] = {"imageId": image, "question": SENTENCES[k], "answer": GQA_ANSWERS[(k + s) % 4],
                                        "fullAnswer": "a sentence.", "isBalanced": True, "groups": {}, "entailed": [],
                                        "equivalent": [], "types": {"structural": "query"}, "annotations": {},
                                        "semantic": [], "semanticStr": ""}
        write_json(root / f"{split}_balanced_questions.json", questions)
    return sorted(set(ids))


def write_visual7w(root: Path) -> dict:
    """dataset_v7w_pointing.json: 2 images per split, 2 "which" questions each over 4 boxes per image.

    Returns {"image_ids", "gt_boxes": {image id: [[x1, y1, x2, y2], ...]}} (the GT store's boxes, box-id order).
    """
    images, boxes, gt_boxes = [], [], {}
    box_id = 0
    qa_id = 0
    for s, split in enumerate(("train", "val", "test")):
        for i in range(2):
            image_id = 100 * (s + 1) + i
            ids = []
            gt_boxes[str(image_id)] = []
            for k in range(4):
                x, y, w, h = 5 + 22 * k, 10 + 3 * i, 18, 30
                boxes.append({"box_id": box_id, "image_id": image_id, "name": "cat", "x": x, "y": y, "width": w,
                              "height": h})
                gt_boxes[str(image_id)].append([x, y, x + w, y + h])
                ids.append(box_id)
                box_id += 1
            qa_pairs = []
            for q in range(2):
                answer = ids[(q + i + s) % 4]
                qa_pairs.append({"qa_id": qa_id, "image_id": image_id, "question": SENTENCES[q + i],
                                 "answer": answer, "multiple_choices": [b for b in ids if b != answer],
                                 "type": "which"})
                qa_id += 1
            images.append({"image_id": image_id, "filename": f"v7w_{image_id}.jpg", "split": split,
                           "qa_pairs": qa_pairs})
    write_json(root / "dataset_v7w_pointing.json", {"images": images, "boxes": boxes})
    return {"image_ids": sorted(gt_boxes), "gt_boxes": gt_boxes}


def write_guesswhat(root: Path) -> dict:
    """guesswhat.{train,valid,test}.jsonl: 3 games per split (one of them failed), 3 objects and 2 turns each."""
    answers = ("Yes", "No", "N/A")
    gt_boxes, qa_id = {}, 0
    for s, split in enumerate(("train", "valid", "test")):
        games = []
        for g in range(3):
            image_id = 300 + 10 * s + g
            objects = [{"id": 10 * image_id + k, "category": "cat", "category_id": 17,
                        "bbox": [5.0 + 30 * k, 10.0, 25.0, 40.0], "area": 1000.0, "segment": []} for k in range(3)]
            gt_boxes[str(image_id)] = [[o["bbox"][0], o["bbox"][1], o["bbox"][0] + o["bbox"][2],
                                        o["bbox"][1] + o["bbox"][3]] for o in objects]
            qas = []
            for t in range(2):
                qas.append({"id": qa_id, "question": SENTENCES[(g + t) % len(SENTENCES)],
                            "answer": answers[(g + t + s) % 3]})
                qa_id += 1
            games.append({"id": 1000 * s + g, "image": {"id": image_id, "file_name": f"COCO_{image_id}.jpg",
                                                       "width": 100, "height": 80},
                          "objects": objects, "object_id": objects[(g + s) % 3]["id"], "qas": qas,
                          "status": "failure" if g == 2 else "success", "questioner_id": 1, "timestamp": "x"})
        write_jsonl(root / f"guesswhat.{split}.jsonl", games)
    return {"image_ids": sorted(gt_boxes), "gt_boxes": gt_boxes}
