"""Tiny files in the official formats of the other 12-in-1 datasets, written by the tests (no downloads).

Every writer puts its annotation files under `root` and returns the image ids the feature store needs (and,
for the pointing and grounding tasks, the boxes each image's stores should hold).
"""

from __future__ import annotations

import json
from pathlib import Path

from tiny_task_data import write_json

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
