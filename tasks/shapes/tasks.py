"""The shapes world's files for more 12-in-1 tasks, written in each dataset's own format from `scenes.json`.

`vilbert shapes-world --out WORLD --add-tasks` reads the scenes of a generated world and writes, beside its
existing files (which it leaves untouched):

- `nlvr2/{train,dev,test1}.json`: statements about two scenes of one split ("the left image has more red
  shapes than the right image"), each sentence judged on two image pairs (one true, one false when the
  scenes allow it), so consistency means something. `left_url` / `right_url` name the scenes' PNGs: the
  embedded config reads the image ids from them (`data.images_from_urls`), since the identifiers' "-img0"
  names are not the store's ids.
- `snli_ve/snli_ve_{train,dev,test}.jsonl`: per scene an entailed, a contradicted and a neutral hypothesis
  (neutral ones ascribe what a picture cannot show: material, weight, age).
- `gqa/{train,val,testdev}_balanced_questions.json`: compositional questions (relation checks, relate-then-
  query, attribute comparisons, or-logic), one answer each, balanced per template (`GQA_TEMPLATES`: each question's
  answer drawn first, then each split keeps every answer of a template as often as its rarest), so the question
  alone answers no better than chance.
- `visual7w/dataset_v7w_pointing.json`: "which is the <unique description>?" over the scene's shapes (box ids
  image_id * 10 + shape index; the candidates are all of the scene's 2-5 shapes, so chance varies per question).
- `vqa-cp/vqacp_v2_{train,test}_{questions,annotations}.json`: the changing-priors split, the world's VQA v2
  questions (train, val and test images) regrouped the way VQA-CP v2 regroups VQA v2 (`regroup_changing_priors`):
  per question type, the answers alternate between a train side and a test side, and each (type, answer) group
  sends `CP_MAJORITY` of its questions to its side, so the type's most frequent train answer is rare in test.
- `vqa/**/v2_mscoco_<subtype>_grounding.json` beside each VQA annotation file, and
  `vqa-cp/vqacp_v2_{train,test}_grounding.json`: for each question that names one shape ("what color is the
  triangle?", "what shape is the red object?"), that shape's box (`write_vqa_grounding`; the VQA reader's
  region supervision, `data.grounding_weight`). The targets are not in the VQA files: the questions are drawn
  again from the world's seed, and each must equal the file's.
- `captions_grounded/captions_<split>.jsonl`: the world's captions with their phrases' boxes, relation words and a
  false variant each, relation sentences turned around at odds 1/2 (tasks.shapes.grounded_captions), which the
  grounded pretraining reads (`make pretrain PRETRAIN=grounded`).

Splits: train -> train, val -> dev/val, test -> test/testdev/test1 (the compositional images are not used).
Everything is a pure function of the scenes and the world's seed.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from tasks.errors import DataError
from tasks.shapes.grounded_captions import write_grounded_captions
from tasks.shapes.world import (
    COLOURS,
    COMPOSITIONAL_PAIRS,
    DESCRIPTIONS,
    KINDS,
    NUMBER_WORDS,
    SPLITS,
    VQA_FILES,
    Scene,
    Shape,
    _write_bytes,
    _write_json,
    above,
    left_of,
    replay_vqa_items,
    unique_descriptions,
)

SPLIT_NAMES = {  # shapes-world split -> each dataset's split name
    "nlvr2": {"train": "train", "val": "dev", "test": "test1"},
    "snli_ve": {"train": "train", "val": "dev", "test": "test"},
    "gqa": {"train": "train", "val": "val", "test": "testdev"},
}
VISUAL7W_SPLITS = {"train": "train", "val": "val", "test": "test"}
TASK_STREAM = {"nlvr2": 12, "snli_ve": 13, "gqa": 15, "visual7w": 4, "vqa_cp": 101}  # per-task random streams
CP_MAJORITY = 0.9  # share of a (question type, answer) group's questions on its side (train or test)
# The world's VQA files per split (tasks.shapes.world.VQA_FILES) and the COCO folder VQA-CP names for them.
CP_SOURCES = {"train": ("", "train2014", "train2014"), "val": ("", "val2014", "val2014"),
              "test": ("test", "val2014", "val2014")}

# The shapes world's evaluation splits per task: (label, split name, path under data.root or None).
# The VQA reader knows only COCO's file names, so the generator writes test and compositional as `val2014`
# in folders of their own (tasks.shapes.world.VQA_FILES).
EVAL_SPLITS = {
    "vqa": [("held-out test", "val", "test"), ("compositional", "val", "compositional")],
    "vqa-cp": [("changing priors", "test", None)],
    "retrieval": [("held-out test", "test", None), ("compositional", "compositional", None)],
    "refcoco": [("held-out test", "test", None), ("compositional", "compositional", None)],
    "nlvr2": [("held-out test", "test1", None)],
    "snli-ve": [("held-out test", "test", None)],
    "gqa": [("held-out test", "testdev", None)],
    "visual7w": [("held-out test", "test", None)],
}


def load_scenes(world: str | Path) -> tuple[int, list[Scene]]:
    """(seed, scenes) of a generated world's `scenes.json`."""
    data = json.loads((Path(world) / "scenes.json").read_text())
    scenes = []
    for image in data["images"]:
        shapes = tuple(Shape(s["colour"], s["kind"], s["size"], tuple(s["rgb"]), tuple(s["centre"]), s["radius"],
                             s["rotation"], tuple(s["box"])) for s in image["shapes"])
        scenes.append(Scene(image["image_id"], image["split"], data["size"], (0, 0, 0), shapes))
    return int(data["seed"]), scenes


def _rng(seed: int, task: str, key: int) -> np.random.Generator:
    return np.random.default_rng([seed, TASK_STREAM[task], key])


def _lines(entries: list[dict]) -> bytes:
    return "".join(json.dumps(entry) + "\n" for entry in entries).encode()


# ---------------------------------------------------------------------------------------------------------- NLVR2


def _count(scene: Scene, **attributes: str) -> int:
    return sum(s.matches(**attributes) for s in scene.shapes)


def nlvr2_statement(rng: np.random.Generator):
    """A random statement template: (sentence, truth function of (left scene, right scene))."""
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    kind = KINDS[int(rng.integers(len(KINDS)))]
    choice = int(rng.integers(5))
    if choice == 0:
        return (f"the left image has more {colour} shapes than the right image",
                lambda a, b: _count(a, colour=colour) > _count(b, colour=colour))
    if choice == 1:
        return (f"the right image has more {kind}s than the left image",
                lambda a, b: _count(b, kind=kind) > _count(a, kind=kind))
    if choice == 2:
        return (f"both images contain a {colour} shape",
                lambda a, b: _count(a, colour=colour) > 0 and _count(b, colour=colour) > 0)
    if choice == 3:
        return (f"exactly one image contains a {kind}",
                lambda a, b: (_count(a, kind=kind) > 0) != (_count(b, kind=kind) > 0))
    return ("the two images have the same number of shapes", lambda a, b: len(a.shapes) == len(b.shapes))


def _write_nlvr2(folder: Path, scenes: list[Scene], seed: int) -> None:
    for split, name in SPLIT_NAMES["nlvr2"].items():
        chosen = [s for s in scenes if s.split == split]
        entries = []
        for set_id in range(len(chosen)):
            rng = _rng(seed, "nlvr2", chosen[set_id].image_id)
            sentence, truth = nlvr2_statement(rng)
            pairs = {}
            for _ in range(60):  # a true and a false pair for the sentence, when the scenes allow it
                a, b = (chosen[int(i)] for i in rng.choice(len(chosen), size=2, replace=False))
                pairs.setdefault(bool(truth(a, b)), (a, b))
                if len(pairs) == 2:
                    break
            for pair_id, (label, (a, b)) in enumerate(sorted(pairs.items())):
                entries.append({"identifier": f"{name}-{set_id}-{pair_id}-0", "sentence": sentence,
                                "label": str(label), "left_url": a.file_name, "right_url": b.file_name,
                                "synset": "shapes", "query": "shapes", "directory": 0})
        _write_bytes(folder / f"{name}.json", _lines(entries))


# -------------------------------------------------------------------------------------------------------- SNLI-VE

NEUTRAL = ("is made of wood", "is made of metal", "is heavy", "is brand new", "is very old", "belongs to a child")


def snli_ve_hypotheses(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str]]:
    """[(hypothesis, gold_label)]: one entailed, one contradicted, one neutral."""
    target = scene.shapes[int(rng.integers(len(scene.shapes)))]
    phrase = unique_descriptions(scene.shapes, target, (("kind",), ("size", "kind")))
    absent = [(c, k) for c in COLOURS for k in KINDS if not any(s.matches(colour=c, kind=k) for s in scene.shapes)]
    wrong_count = [n for n in range(2, 6) if n != len(scene.shapes)]
    if phrase and rng.random() < 0.5:
        other = [c for c in COLOURS if c != target.colour]
        entailed = f"the {phrase[0]} is {target.colour}"
        contradicted = f"the {phrase[0]} is {other[int(rng.integers(len(other)))]}"
    elif rng.random() < 0.5:
        colour, kind = absent[int(rng.integers(len(absent)))]
        entailed = f"there is a {target.colour} {target.kind} in the picture"
        contradicted = f"there is a {colour} {kind} in the picture"
    else:
        entailed = f"there are {NUMBER_WORDS[len(scene.shapes)]} shapes in the picture"
        contradicted = f"there are {NUMBER_WORDS[wrong_count[int(rng.integers(len(wrong_count)))]]} shapes in the picture"
    neutral = f"the {target.colour} {target.kind} {NEUTRAL[int(rng.integers(len(NEUTRAL)))]}"
    return [(entailed, "entailment"), (contradicted, "contradiction"), (neutral, "neutral")]


def _write_snli_ve(folder: Path, scenes: list[Scene], seed: int) -> None:
    for split, name in SPLIT_NAMES["snli_ve"].items():
        entries = []
        for scene in (s for s in scenes if s.split == split):
            rng = _rng(seed, "snli_ve", scene.image_id)
            premise = f"a picture of {NUMBER_WORDS[len(scene.shapes)]} shapes"
            for k, (hypothesis, label) in enumerate(snli_ve_hypotheses(scene, rng)):
                entries.append({"Flikr30kID": scene.file_name, "sentence1": premise, "sentence2": hypothesis,
                                "gold_label": label, "pairID": f"{scene.file_name}#0r{k}{label[0]}",
                                "captionID": f"{scene.file_name}#0"})
        _write_bytes(folder / f"snli_ve_{name}.jsonl", _lines(entries))


# ------------------------------------------------------------------------------------------------------------ GQA


# The GQA templates: (structural type, the answers it draws from). Answers are balanced per template, as GQA
# balances its answer distributions per question group (VQA-CP shows what a skewed one hides): each scene's question
# of a template is asked with an answer drawn uniformly from the template's (another the scene allows if it has no
# question with that one), then each split keeps as many questions of every answer of a template as of its rarest
# (`balance_answers`), so the question alone does no better than chance. The noun phrases name attributes only
# ("the large circle"), never a position ("the circle on the left" would tell a relation's answer).
YES_NO = ("yes", "no")
GQA_TEMPLATES = {
    "relVerify": ("verify", YES_NO),
    "sameColor": ("compare", YES_NO),
    "relQueryColor": ("query", tuple(COLOURS)),
    "relQueryShape": ("query", KINDS),
    "existOr": ("logical", YES_NO),
}
KIND_PHRASES = (("kind",), ("size", "kind"))  # no colour: "the circle", "the large circle"
COLOUR_PHRASES = (("colour",), ("size", "colour"))  # no kind: "the red shape", "the large red shape"


def attribute_phrases(shapes: tuple[Shape, ...], target: Shape, attribute_sets=DESCRIPTIONS) -> list[str]:
    """The phrases of `attribute_sets` ("large red circle") that fit the target and no other shape of the scene."""
    return [target.words(*attributes) for attributes in attribute_sets
            if sum(s.matches(**{a: getattr(target, a) for a in attributes}) for s in shapes) == 1]


def _neighbour(shapes: tuple[Shape, ...], shape: Shape, side: str) -> Shape | None:
    """The one shape to the left (side "left") or right of `shape`, None unless exactly one."""
    found = [s for s in shapes if (left_of(s, shape) if side == "left" else left_of(shape, s))]
    return found[0] if len(found) == 1 else None


def _gqa_candidates(template: str, scene: Scene, rng: np.random.Generator,
                    allowed: list[tuple[str, str]]) -> dict[str, list[str]]:
    """{answer: the template's questions about the scene with that answer}."""
    shapes, found = scene.shapes, {}
    if template == "relVerify":
        relation, test = [("to the left of", left_of), ("above", above)][int(rng.integers(2))]
        for a in shapes:
            for b in shapes:
                if a is not b:
                    found.setdefault("yes" if test(a, b) else "no", []).extend(
                        f"is the {p} {relation} the {q}?" for p in attribute_phrases(shapes, a)
                        for q in attribute_phrases(shapes, b))
    elif template == "sameColor":
        for i, a in enumerate(shapes):
            for b in shapes[i + 1:]:
                found.setdefault("yes" if a.colour == b.colour else "no", []).extend(
                    f"are the {p} and the {q} the same color?" for p in attribute_phrases(shapes, a, KIND_PHRASES)
                    for q in attribute_phrases(shapes, b, KIND_PHRASES))
    elif template == "relQueryColor":
        for b in shapes:
            if (left := _neighbour(shapes, b, "left")) is not None:
                found.setdefault(left.colour, []).extend(f"what color is the shape to the left of the {p}?"
                                                         for p in attribute_phrases(shapes, b, KIND_PHRASES))
    elif template == "relQueryShape":
        for b in shapes:
            if (right := _neighbour(shapes, b, "right")) is not None:
                found.setdefault(right.kind, []).extend(f"what shape is the object to the right of the {p} shape?"
                                                        for p in attribute_phrases(shapes, b, COLOUR_PHRASES))
    else:  # existOr: "yes" names a pair of the scene (in either place), "no" two pairs it lacks
        present = sorted({(s.colour, s.kind) for s in shapes})
        absent = [pair for pair in allowed if pair not in present]
        shown = present[int(rng.integers(len(present)))]
        other = allowed[int(rng.integers(len(allowed)))]
        first, second = (shown, other) if rng.random() < 0.5 else (other, shown)
        found["yes"] = [f"is there a {first[0]} {first[1]} or a {second[0]} {second[1]}?"]
        if len(absent) >= 2:
            first, second = (absent[int(i)] for i in rng.choice(len(absent), size=2, replace=False))
            found["no"] = [f"is there a {first[0]} {first[1]} or a {second[0]} {second[1]}?"]
    return {answer: questions for answer, questions in found.items() if questions}


def gqa_questions(scene: Scene, rng: np.random.Generator, allowed_pairs: list[tuple[str, str]] | None = None
                  ) -> list[tuple[str, str, str, str]]:
    """[(question, answer, structural type, detailed type)], at most one per template (`GQA_TEMPLATES`): relation
    verify, same colour, relate-then-query colour and shape, or-logic; the answer drawn uniformly from the template's,
    else from those the scene allows. `allowed_pairs`: the colour-shape pairs or-questions may name (default every
    pair outside `COMPOSITIONAL_PAIRS`, which no train/val/test image holds)."""
    allowed = allowed_pairs or [(c, k) for c in COLOURS for k in KINDS if (c, k) not in COMPOSITIONAL_PAIRS]
    out = []
    for template, (structural, answers) in GQA_TEMPLATES.items():
        want = answers[int(rng.integers(len(answers)))]
        found = _gqa_candidates(template, scene, rng, allowed)
        if not found:
            continue
        if want not in found:
            possible = sorted(found)
            want = possible[int(rng.integers(len(possible)))]
        questions = found[want]
        out.append((questions[int(rng.integers(len(questions)))], want, structural, template))
    return out


def balance_answers(items: list[tuple[str, str]], rng: np.random.Generator) -> list[int]:
    """Indices (in order) of the `(template, answer)` items to keep: per template, as many of each of its answers as
    of its rarest answer, drawn by `rng`."""
    groups: dict[str, dict[str, list[int]]] = {}
    for index, (template, answer) in enumerate(items):
        groups.setdefault(template, {}).setdefault(answer, []).append(index)
    kept = []
    for template in sorted(groups):
        size = min(len(indices) for indices in groups[template].values())
        for answer in sorted(groups[template]):
            indices = groups[template][answer]
            kept += [indices[int(i)] for i in np.sort(rng.choice(len(indices), size=size, replace=False))]
    return sorted(kept)


def _write_gqa(folder: Path, scenes: list[Scene], seed: int) -> None:
    for split_index, (split, name) in enumerate(SPLIT_NAMES["gqa"].items()):
        asked = []  # (question id, image id, question, answer, structural, detailed)
        for scene in (s for s in scenes if s.split == split):
            rng = _rng(seed, "gqa", scene.image_id)
            for k, (question, answer, structural, detailed) in enumerate(gqa_questions(scene, rng)):
                asked.append((f"{scene.image_id}{k:02d}", scene.image_id, question, answer, structural, detailed))
        keep = balance_answers([(a[5], a[3]) for a in asked], np.random.default_rng([seed, TASK_STREAM["gqa"], split_index]))
        questions = {}
        for qid, image_id, question, answer, structural, detailed in (asked[i] for i in keep):
            questions[qid] = {
                "imageId": str(image_id), "question": question, "answer": answer,
                "fullAnswer": f"The answer is {answer}.", "isBalanced": True,
                "types": {"structural": structural, "semantic": "rel", "detailed": detailed},
                "groups": {"global": None, "local": None}, "entailed": [], "equivalent": [],
                "annotations": {"question": {}, "answer": {}, "fullAnswer": {}}, "semantic": [],
                "semanticStr": ""}
        _write_json(folder / f"{name}_balanced_questions.json", questions)


# ------------------------------------------------------------------------------------------------------- Visual7W


def _write_visual7w(folder: Path, scenes: list[Scene], seed: int) -> None:
    images, boxes = [], []
    for scene in (s for s in scenes if s.split in VISUAL7W_SPLITS):
        rng = _rng(seed, "visual7w", scene.image_id)
        ids = [scene.image_id * 10 + index for index in range(len(scene.shapes))]
        for box_id, shape in zip(ids, scene.shapes, strict=True):
            x1, y1, x2, y2 = shape.box
            boxes.append({"box_id": box_id, "image_id": scene.image_id, "name": f"{shape.colour} {shape.kind}",
                          "x": x1, "y": y1, "width": round(x2 - x1, 2), "height": round(y2 - y1, 2)})
        qa_pairs = []
        for index, shape in enumerate(scene.shapes):
            phrases = unique_descriptions(scene.shapes, shape)
            if not phrases:
                continue
            phrase = phrases[int(rng.integers(len(phrases)))]
            qa_pairs.append({"qa_id": ids[index], "image_id": scene.image_id, "question": f"which is the {phrase}?",
                             "answer": ids[index], "multiple_choices": [b for b in ids if b != ids[index]],
                             "type": "which"})
        images.append({"image_id": scene.image_id, "filename": scene.file_name,
                       "split": VISUAL7W_SPLITS[scene.split], "qa_pairs": qa_pairs})
    _write_json(folder / "dataset_v7w_pointing.json", {"images": images, "boxes": boxes})


# --------------------------------------------------------------------------------------- VQA-CP (changing priors)


def regroup_changing_priors(annotations: list[dict], seed: int) -> dict[int, str]:
    """{question_id: "train" | "test"}: per question type, its answers (most frequent first, ties by name) take
    the train side and the test side in turn, and each (type, answer) group sends CP_MAJORITY of its questions
    (drawn by a seeded generator) to its side and the rest to the other, as VQA-CP moves whole groups so that the
    answer distribution per question type differs between train and test."""
    groups: dict[tuple[str, str], list[int]] = {}
    for entry in annotations:
        groups.setdefault((entry["question_type"], entry["multiple_choice_answer"]), []).append(entry["question_id"])
    sizes = Counter({key: len(ids) for key, ids in groups.items()})
    side: dict[int, str] = {}
    for type_index, question_type in enumerate(sorted({t for t, _ in groups})):
        answers = sorted((a for t, a in groups if t == question_type), key=lambda a: (-sizes[question_type, a], a))
        for position, answer in enumerate(answers):
            home, away = ("train", "test") if position % 2 == 0 else ("test", "train")
            ids = sorted(groups[question_type, answer])
            rng = np.random.default_rng([seed, TASK_STREAM["vqa_cp"], type_index, position])
            at_home = rng.random(len(ids)) < CP_MAJORITY
            side.update({qid: home if stays else away for qid, stays in zip(ids, at_home, strict=True)})
    return side


def write_vqa_grounding(world: Path, scenes: list[Scene], seed: int) -> dict[int, list[float]]:
    """`v2_mscoco_<subtype>_grounding.json` beside each VQA annotation file: a JSON list of {"question_id", "box":
    [x1, y1, x2, y2] in pixels} for the questions that name one shape. Returns {question_id: box} of every split.
    A question drawn again that differs from the file's is a DataError (the world is of another generator)."""
    boxes: dict[int, list[float]] = {}
    for split in SPLITS:
        chosen = [scene for scene in scenes if scene.split == split]
        entries = []
        folder, subtype = next((f, s) for f, s in VQA_FILES[split] if s != "test2015")
        path = world / "vqa" / folder / f"v2_OpenEnded_mscoco_{subtype}_questions.json"
        written = {q["question_id"]: q["question"] for q in json.loads(path.read_text())["questions"]}
        for scene in chosen:
            for question_id, question, _ in replay_vqa_items(scene, seed):
                if written.get(question_id) != question.question:
                    raise DataError(f"{path}: question {question_id} is not the one the world's seed draws "
                                    f"({question.question!r}); regenerate the world with this version")
                if question.target is not None:
                    entries.append({"question_id": question_id, "box": list(scene.shapes[question.target].box)})
        for folder, subtype in VQA_FILES[split]:
            if subtype != "test2015":  # test2015 is the questions-only copy (no answers, no boxes)
                _write_json(world / "vqa" / folder / f"v2_mscoco_{subtype}_grounding.json", entries)
        boxes.update((entry["question_id"], entry["box"]) for entry in entries)
    return boxes


def _write_vqa_cp(world: Path, seed: int, boxes: dict[int, list[float]]) -> int:
    """The changing-priors split from the world's VQA v2 files (see `regroup_changing_priors`), the grounding file
    of each side last; returns the number of questions written."""
    questions, annotations = [], []
    for folder, subtype, coco_split in CP_SOURCES.values():
        path = world / "vqa" / folder
        for q in json.loads((path / f"v2_OpenEnded_mscoco_{subtype}_questions.json").read_text())["questions"]:
            questions.append({**q, "coco_split": coco_split})
        for a in json.loads((path / f"v2_mscoco_{subtype}_annotations.json").read_text())["annotations"]:
            annotations.append({**a, "coco_split": coco_split})
    side = regroup_changing_priors(annotations, seed)
    for split in ("train", "test"):
        _write_json(world / "vqa-cp" / f"vqacp_v2_{split}_questions.json",
                    [q for q in questions if side[q["question_id"]] == split])
        _write_json(world / "vqa-cp" / f"vqacp_v2_{split}_annotations.json",
                    [a for a in annotations if side[a["question_id"]] == split])
    for split in ("train", "test"):
        _write_json(world / "vqa-cp" / f"vqacp_v2_{split}_grounding.json",
                    [{"question_id": q["question_id"], "box": boxes[q["question_id"]]} for q in questions
                     if side[q["question_id"]] == split and q["question_id"] in boxes])
    return len(questions)


def write_task_files(world: str | Path) -> dict[str, int]:
    """Write the tasks' files under `world`; returns the number of items per task (all splits). The VQA grounding
    files, then the VQA-CP files come last (its test grounding file is the Makefile's target)."""
    world = Path(world)
    seed, scenes = load_scenes(world)
    _write_nlvr2(world / "nlvr2", scenes, seed)
    _write_snli_ve(world / "snli_ve", scenes, seed)
    _write_gqa(world / "gqa", scenes, seed)
    _write_visual7w(world / "visual7w", scenes, seed)
    grounded = write_grounded_captions(world, seed, scenes)
    boxes = write_vqa_grounding(world, scenes, seed)
    cp_questions = _write_vqa_cp(world, seed, boxes)
    counts = Counter({"grounded captions": grounded})
    for name in SPLIT_NAMES["nlvr2"].values():
        counts["nlvr2"] += len((world / "nlvr2" / f"{name}.json").read_text().splitlines())
    for name in SPLIT_NAMES["snli_ve"].values():
        counts["snli-ve"] += len((world / "snli_ve" / f"snli_ve_{name}.jsonl").read_text().splitlines())
    for name in SPLIT_NAMES["gqa"].values():
        counts["gqa"] += len(json.loads((world / "gqa" / f"{name}_balanced_questions.json").read_text()))
    v7w = json.loads((world / "visual7w" / "dataset_v7w_pointing.json").read_text())
    counts["visual7w"] = sum(len(image["qa_pairs"]) for image in v7w["images"])
    counts["vqa-cp"] = cp_questions
    return dict(counts)
