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


def write_genome_qa(root: Path) -> list[str]:
    """question_answers.json: 4 images with 3 questions each (answers "Two", "red.", "yes")."""
    images = []
    for i in range(4):
        image_id = 2300 + i
        qas = [{"qa_id": 10 * image_id + k, "image_id": image_id, "question": SENTENCES[(i + k) % len(SENTENCES)],
                "answer": ("Two", "red.", "yes")[(i + k) % 3], "a_objects": [], "q_objects": []} for k in range(3)]
        images.append({"id": image_id, "qas": qas})
    write_json(root / "question_answers.json", images)
    return [str(2300 + i) for i in range(4)]


def write_foil(root: Path) -> list[str]:
    """foilv1.0_{train,test}_2017.json: 2 images x (1 right + 1 foil caption) per split."""
    ids = []
    for s, split in enumerate(("train", "test")):
        images, annotations = [], []
        for i in range(2):
            image_id = 40 + 10 * s + i
            ids.append(str(image_id))
            images.append({"id": image_id, "file_name": f"COCO_val2014_{image_id:012d}.jpg"})
            annotations.append({"id": 2 * image_id, "image_id": image_id, "caption": "a white cat", "foil": False,
                                "target_word": "cat", "foil_word": "ORIG"})
            annotations.append({"id": 2 * image_id + 1, "image_id": image_id, "caption": "a white dog", "foil": True,
                                "target_word": "cat", "foil_word": "dog"})
        write_json(root / f"foilv1.0_{split}_2017.json", {"images": images, "annotations": annotations})
    return ids


def write_flickr_entities(root: Path) -> dict:
    """{train,val,test}.txt, Sentences/*.txt, Annotations/*.xml: 2 images per split; entity 2 has two boxes."""
    (root / "Sentences").mkdir(parents=True, exist_ok=True)
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    boxes = {}
    for s, split in enumerate(("train", "val", "test")):
        ids = [str(5000 + 10 * s + i) for i in range(2)]
        (root / f"{split}.txt").write_text("\n".join(ids) + "\n")
        for image_id in ids:
            (root / "Sentences" / f"{image_id}.txt").write_text(
                "[/EN#1/people A man] holds [/EN#2/other two balls] in [/EN#3/scene the park] .\n"
                "[/EN#2/other Balls] near [/EN#1/people a person] .\n")
            (root / "Annotations" / f"{image_id}.xml").write_text(
                "<annotation><filename>x.jpg</filename><size><width>100</width><height>80</height><depth>3</depth>"
                "</size>"
                "<object><name>1</name><bndbox><xmin>5</xmin><ymin>5</ymin><xmax>35</xmax><ymax>70</ymax></bndbox>"
                "</object>"
                "<object><name>2</name><bndbox><xmin>50</xmin><ymin>10</ymin><xmax>60</xmax><ymax>20</ymax></bndbox>"
                "</object>"
                "<object><name>2</name><bndbox><xmin>70</xmin><ymin>10</ymin><xmax>80</xmax><ymax>20</ymax></bndbox>"
                "</object>"
                "<object><name>3</name><nobndbox>1</nobndbox><scene>1</scene></object></annotation>")
            boxes[image_id] = [[6, 5, 35, 70], [50, 10, 80, 20], [0, 0, 20, 20]]  # "detections"
    return {"image_ids": sorted(boxes), "boxes": boxes}


def write_vcr(root: Path) -> list[str]:
    """{train,val,test}.jsonl: 3 items per split with detection tags; test has no labels."""
    ids = []
    for split in ("train", "val", "test"):
        items = []
        for i in range(3):
            image = f"lsmdc_movie/{split}_{i}"
            ids.append(f"{split}_{i}")
            item = {"annot_id": f"{split}-{i}", "objects": ["person", "dog", "person"], "img_fn": f"{image}.jpg",
                    "metadata_fn": f"{image}.json", "question": ["What", "is", [0], "doing", "with", [1], "?"],
                    "answer_choices": [[[0], "is", "walking", "it", "."], [[2], "runs", "."], ["Nothing", "."],
                                       [[0, 2], "are", "talking", "."]],
                    "rationale_choices": [[[1], "has", "a", "leash", "."], ["It", "is", "night", "."],
                                          ["They", "sit", "."], [[0], "is", "outside", "."]]}
            if split != "test":
                item.update(answer_label=i % 4, rationale_label=(i + 1) % 4)
            items.append(item)
        write_jsonl(root / f"{split}.jsonl", items)
    return ids


VCR_WORDS = "casey riley walking it runs nothing talking doing with leash night sit outside has".split()


def write_vocab_with(directory: Path, words: list[str]) -> Path:
    """The tests' tiny vocabulary plus `words` (so that texts are not mostly [UNK])."""
    from tiny_task_data import write_vocab

    write_vocab(directory)
    with open(directory / "vocab.txt", "a") as f:
        f.write("\n".join(words) + "\n")
    return directory
