"""The shapes world: a seeded synthetic dataset written in the official file formats of the real tasks.

Each image holds 2-5 non-overlapping coloured shapes (6 colours x 3 kinds x 2 sizes) on a noisy background
(the embedded default of docs/architecture.md). From the scene description alone we write the files the real readers take:
pretraining captions, VQA v2 question/annotation JSON, a Karpathy-style retrieval JSON, refer-toolkit
`refs(unc).p` + COCO `instances.json`, and the ground-truth boxes and colour x shape classes for extraction.

Splits: `train`, `val`, `test`, and `compositional`, whose images each contain at least one of the held-out
colour-shape pairs (`COMPOSITIONAL_PAIRS`); those pairs appear in no train/val/test image nor in their text.

Spatial words have one meaning everywhere: A is "to the left of" B when A's box ends before B's begins
(A.x2 < B.x1), "above" when A.y2 < B.y1; "the red circle on the left" names the red circle left of every other
red circle. Everything is a pure function of (seed, image count, size): the same arguments give byte-identical files.
"""

from __future__ import annotations

import io
import json
import math
import pickle
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from features.atomic import atomic_path, claim_folder

# Base colours (RGB); each shape jitters every channel by a uniform integer in [-25, 25].
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 200),
    "cyan": (40, 200, 210),
}
KINDS = ("circle", "square", "triangle")
SIZES = ("small", "large")
# Radius ranges as fractions of the image side; the gap between them keeps "small" and "large" unambiguous.
RADIUS = {"small": (0.07, 0.10), "large": (0.13, 0.16)}
COMPOSITIONAL_PAIRS = (("red", "triangle"), ("blue", "circle"), ("yellow", "square"))
SPLITS = ("train", "val", "test", "compositional")
# Changes whenever the same seed would draw other scenes or classes; a detector trained on the world records it.
WORLD_VERSION = 1

# Class 0 is background; 1..18 are colour x kind, the stand-in for a detector's object classes.
CLASS_NAMES = ["background"] + [f"{colour} {kind}" for colour in COLOURS for kind in KINDS]
NUM_CLASSES = len(CLASS_NAMES)  # 19

MIN_GAP = 2.0  # pixels between any two boxes
NOISE_STD = 8.0
DISSENT_PROBABILITY = 0.1  # share of VQA questions where 1-3 of the 10 annotators answer differently
PICKLE_PROTOCOL = 4


def class_id(colour: str, kind: str) -> int:
    """The colour x kind class index, 1..18 (0 is background)."""
    return CLASS_NAMES.index(f"{colour} {kind}")


@dataclass(frozen=True)
class Shape:
    """One drawn shape: its words, geometry, and tight box (x1, y1, x2, y2) in pixels."""

    colour: str
    kind: str
    size: str
    rgb: tuple[int, int, int]
    centre: tuple[float, float]
    radius: float
    rotation: float
    box: tuple[float, float, float, float]

    def words(self, *attributes: str) -> str:
        """The shape's description in attribute order size, colour, kind, e.g. "large red circle"."""
        return " ".join(getattr(self, name) for name in ("size", "colour", "kind") if name in attributes)

    def matches(self, **attributes: str) -> bool:
        return all(getattr(self, name) == value for name, value in attributes.items())


@dataclass(frozen=True)
class Scene:
    image_id: int
    split: str
    size: int
    background: tuple[int, int, int]
    shapes: tuple[Shape, ...]

    @property
    def file_name(self) -> str:
        return f"{self.image_id}.png"


# ---------------------------------------------------------------------------------------------------------------
# Geometry and spatial relations


def left_of(a: Shape, b: Shape) -> bool:
    return a.box[2] < b.box[0]


def above(a: Shape, b: Shape) -> bool:
    return a.box[3] < b.box[1]


RELATIONS: dict[str, Callable[[Shape, Shape], bool]] = {"to the left of": left_of, "above": above}
# "the red circle on the left": the target is left of every other shape of its description.
EXTREMES: dict[str, Callable[[Shape, Shape], bool]] = {
    "on the left": left_of,
    "on the right": lambda a, b: left_of(b, a),
    "at the top": above,
    "at the bottom": lambda a, b: above(b, a),
}


def _vertices(kind: str, centre: tuple[float, float], radius: float, rotation: float) -> list[tuple[float, float]]:
    corners = {"square": 4, "triangle": 3}[kind]
    cx, cy = centre
    return [
        (cx + radius * math.cos(rotation + 2 * math.pi * k / corners),
         cy + radius * math.sin(rotation + 2 * math.pi * k / corners))
        for k in range(corners)
    ]


def _tight_box(kind: str, centre: tuple[float, float], radius: float, rotation: float) -> tuple[float, ...]:
    if kind == "circle":
        points = [(centre[0] - radius, centre[1] - radius), (centre[0] + radius, centre[1] + radius)]
    else:
        points = _vertices(kind, centre, radius, rotation)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return (round(min(xs), 2), round(min(ys), 2), round(max(xs), 2), round(max(ys), 2))


def _apart(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return (a[2] + MIN_GAP <= b[0] or b[2] + MIN_GAP <= a[0]
            or a[3] + MIN_GAP <= b[1] or b[3] + MIN_GAP <= a[1])


def shape_area(shape: Shape) -> float:
    """The drawn area in pixels (COCO's `area` is the object's area, not its box's)."""
    r = shape.radius
    area = {"circle": math.pi * r * r, "square": 2 * r * r, "triangle": 3 * math.sqrt(3) / 4 * r * r}[shape.kind]
    return round(area, 2)


# ---------------------------------------------------------------------------------------------------------------
# Scenes and images


def split_of(index: int, num_images: int) -> str:
    """Images come in blocks: train, then val, test and compositional (a tenth each, at least one)."""
    held = max(1, num_images // 10)
    boundaries = [num_images - 3 * held, num_images - 2 * held, num_images - held]
    return SPLITS[sum(index >= b for b in boundaries)]


def make_scene(seed: int, image_id: int, split: str, size: int) -> Scene:
    """Draw one scene; the image's generator depends only on (seed, image_id), so scenes do not shift."""
    rng = np.random.default_rng([seed, image_id])
    background = tuple(int(v) for v in np.clip(rng.normal(205, 20, size=3), 150, 250).round())
    allowed = [(c, k) for c in COLOURS for k in KINDS if (c, k) not in COMPOSITIONAL_PAIRS]
    every = [(c, k) for c in COLOURS for k in KINDS]
    while True:
        count = int(rng.integers(2, 6))
        shapes: list[Shape] = []
        for index in range(count):
            if split == "compositional":
                pool = list(COMPOSITIONAL_PAIRS) if index == 0 else every
            else:
                pool = allowed
            colour, kind = pool[int(rng.integers(len(pool)))]
            shape_size = SIZES[int(rng.integers(2))]
            low, high = RADIUS[shape_size]
            radius = float(rng.uniform(low, high)) * size
            rgb = tuple(int(v) for v in np.clip(np.array(COLOURS[colour]) + rng.integers(-25, 26, size=3), 0, 255))
            for _ in range(200):
                centre = (float(rng.uniform(radius + 1, size - radius - 1)),
                          float(rng.uniform(radius + 1, size - radius - 1)))
                rotation = float(rng.uniform(0, 2 * math.pi))
                box = _tight_box(kind, centre, radius, rotation)
                if all(_apart(box, other.box) for other in shapes):
                    shapes.append(Shape(colour, kind, shape_size, rgb, centre, radius, rotation, box))
                    break
        if len(shapes) >= 2:
            return Scene(image_id, split, size, background, tuple(shapes))


def render(scene: Scene, seed: int) -> Image.Image:
    """Draw the scene, then add Gaussian pixel noise (sigma 8) from a generator of its own."""
    image = Image.new("RGB", (scene.size, scene.size), scene.background)
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        if shape.kind == "circle":
            (cx, cy), r = shape.centre, shape.radius
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=shape.rgb)
        else:
            draw.polygon(_vertices(shape.kind, shape.centre, shape.radius, shape.rotation), fill=shape.rgb)
    noise = np.random.default_rng([seed, scene.image_id, 1]).normal(0, NOISE_STD, (scene.size, scene.size, 3))
    pixels = np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).round().astype(np.uint8)
    return Image.fromarray(pixels)


# ---------------------------------------------------------------------------------------------------------------
# Language: captions, referring expressions, questions

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
DESCRIPTIONS = (("kind",), ("colour", "kind"), ("size", "kind"), ("size", "colour", "kind"))


def _plural(kind: str, count: int) -> str:
    return kind if count == 1 else f"{kind}s"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def unique_descriptions(shapes: Iterable[Shape], target: Shape, attribute_sets=DESCRIPTIONS) -> list[str]:
    """Every noun phrase ("red circle", "circle on the left", ...) that fits the target and no other shape."""
    shapes = list(shapes)
    phrases = []
    for attributes in attribute_sets:
        group = [s for s in shapes if s.matches(**{a: getattr(target, a) for a in attributes})]
        words = target.words(*attributes)
        if len(group) == 1:
            phrases.append(words)
        else:
            for phrase, beyond in EXTREMES.items():
                if all(beyond(target, other) for other in group if other is not target):
                    phrases.append(f"{words} {phrase}")
    return phrases


def captions(scene: Scene, rng: np.random.Generator) -> list[str]:
    """Five templated captions: left-to-right listing, counts by kind, two relations, counts by colour."""
    shapes = scene.shapes
    full = [s.words("size", "colour", "kind") for s in sorted(shapes, key=lambda s: s.centre[0])]
    kinds = Counter(s.kind for s in shapes)
    colours = Counter(s.colour for s in shapes)
    out = [
        "from left to right: " + _join([f"a {w}" for w in full]) + ".",
        f"there are {NUMBER_WORDS[len(shapes)]} shapes: "
        + _join([f"{NUMBER_WORDS[n]} {_plural(k, n)}" for k, n in sorted(kinds.items())]) + ".",
    ]
    # One caption per axis; separated boxes are always apart along x or y, so an empty axis borrows the other's
    # pairs in the inverse wording ("to the right of", "below") and never repeats the first caption.
    axes = [("to the left of", "to the right of", left_of), ("above", "below", above)]
    for index, (forward, backward, test) in enumerate(axes):
        pairs = [(a, b) for a in shapes for b in shapes if test(a, b)]
        if not pairs:
            forward, backward, test = axes[1 - index]
            pairs = [(b, a) for a in shapes for b in shapes if test(a, b)]
            forward = backward
        a, b = pairs[int(rng.integers(len(pairs)))]
        out.append(f"a {a.words('size', 'colour', 'kind')} {forward} a {b.words('size', 'colour', 'kind')}.")
    out.append(_join([f"{NUMBER_WORDS[n]} {c} {_plural('shape', n)}" for c, n in sorted(colours.items())]) + ".")
    return out


def referring_expressions(scene: Scene, target: Shape, rng: np.random.Generator, limit: int = 3) -> list[str]:
    """Up to `limit` expressions that pick out exactly the target ("the large blue square")."""
    phrases = unique_descriptions(scene.shapes, target)
    order = rng.permutation(len(phrases))[:limit]
    return [f"the {phrases[i]}" for i in sorted(order)]


@dataclass(frozen=True)
class Question:
    question: str
    answer: str
    question_type: str  # VQA's question-type prefix
    answer_type: str  # "yes/no", "number" or "other"
    target: int | None = None  # the index in scene.shapes of the one shape the question names (colour, shape)


def _pick(rng: np.random.Generator, items: list):
    return items[int(rng.integers(len(items)))] if items else None


def _colour_question(scene, focus, rng) -> Question | None:
    target = _pick(rng, focus)
    phrase = _pick(rng, unique_descriptions(scene.shapes, target, (("kind",), ("size", "kind"))))
    return phrase and Question(f"what color is the {phrase}?", target.colour, "what color is the", "other",
                               scene.shapes.index(target))


def _shape_question(scene, focus, rng) -> Question | None:
    target = _pick(rng, focus)
    phrase = _pick(rng, unique_descriptions(scene.shapes, target, (("colour",), ("size", "colour"))))
    return phrase and Question(f"what shape is the {phrase} object?", target.kind, "what shape is the", "other",
                               scene.shapes.index(target))


def _count_question(scene, focus, rng, allowed_pairs) -> Question | None:
    target = _pick(rng, focus)
    options = [{}, {"kind": target.kind}, {"colour": target.colour}]
    if (target.colour, target.kind) in allowed_pairs:
        options.append({"colour": target.colour, "kind": target.kind})
    attributes = options[int(rng.integers(len(options)))]
    count = sum(s.matches(**attributes) for s in scene.shapes)
    noun = " ".join([attributes.get("colour", ""), attributes.get("kind", "shape") + "s"]).strip()
    return Question(f"how many {noun} are there?", str(count), "how many", "number")


def _existence_question(scene, focus, rng, allowed_pairs) -> Question | None:
    present = sorted({(s.colour, s.kind) for s in focus})
    absent = sorted(set(allowed_pairs) - {(s.colour, s.kind) for s in scene.shapes})
    if rng.random() < 0.5 or not absent:
        colour, kind = _pick(rng, present)
        answer = "yes"
    else:
        colour, kind = _pick(rng, absent)
        answer = "no"
    return Question(f"is there a {colour} {kind}?", answer, "is there a", "yes/no")


def _relation_question(scene, focus, rng, relation) -> Question | None:
    test = RELATIONS[relation]
    pairs = [(a, b) for a in focus for b in scene.shapes if a is not b and (test(a, b) or test(b, a))]
    if not pairs:
        return None
    a, b = _pick(rng, pairs)
    a_phrase = _pick(rng, unique_descriptions(scene.shapes, a))
    b_phrase = _pick(rng, unique_descriptions(scene.shapes, b))
    if a_phrase is None or b_phrase is None:
        return None
    answer = "yes" if test(a, b) else "no"
    return Question(f"is the {a_phrase} {relation} the {b_phrase}?", answer, "is the", "yes/no")


def questions(scene: Scene, rng: np.random.Generator) -> list[Question]:
    """Colour, shape, count, existence and two spatial questions; compositional images ask about held-out pairs."""
    if scene.split == "compositional":
        focus = [s for s in scene.shapes if (s.colour, s.kind) in COMPOSITIONAL_PAIRS]
        allowed_pairs = list(COMPOSITIONAL_PAIRS)
    else:
        focus = list(scene.shapes)
        allowed_pairs = [(c, k) for c in COLOURS for k in KINDS if (c, k) not in COMPOSITIONAL_PAIRS]
    made = [
        _colour_question(scene, focus, rng),
        _shape_question(scene, focus, rng),
        _count_question(scene, focus, rng, allowed_pairs),
        _existence_question(scene, focus, rng, allowed_pairs),
        _relation_question(scene, focus, rng, "to the left of"),
        _relation_question(scene, focus, rng, "above"),
    ]
    return [q for q in made if q is not None]


def _annotator_answers(question: Question, rng: np.random.Generator) -> list[str]:
    """Ten answers; for a few questions 1-3 annotators give a plausible wrong one (VQA data has such noise)."""
    answers = [question.answer] * 10
    if rng.random() < DISSENT_PROBABILITY:
        if question.answer_type == "yes/no":
            wrong = ["no" if question.answer == "yes" else "yes"]
        elif question.answer_type == "number":
            wrong = [str(n) for n in (int(question.answer) - 1, int(question.answer) + 1) if n >= 0]
        elif question.answer in COLOURS:
            wrong = [c for c in COLOURS if c != question.answer]
        else:
            wrong = [k for k in KINDS if k != question.answer]
        for slot in rng.permutation(10)[: int(rng.integers(1, 4))]:
            answers[int(slot)] = _pick(rng, wrong)
    return answers


def tokens(sentence: str) -> list[str]:
    """Karpathy/refer-style tokens: lower case, punctuation dropped."""
    return [w for w in "".join(ch if ch.isalnum() or ch == " " else " " for ch in sentence.lower()).split()]


# ---------------------------------------------------------------------------------------------------------------
# Writing the dataset


def _write_bytes(path: Path, data: bytes) -> None:
    """Write through a temporary file in the same folder, then rename: no half-written files."""
    with atomic_path(path) as temp:
        temp.write_bytes(data)


def _write_json(path: Path, value) -> None:
    _write_bytes(path, json.dumps(value).encode())


def write_shapes_world(out: str | Path, seed: int = 0, num_images: int = 2000, size: int = 128,
                       progress: bool = True) -> dict[str, int]:
    """Generate the dataset under `out`; returns the number of images per split."""
    if num_images < 4:
        raise ValueError(f"--images must be at least 4 (one per split), got {num_images}")
    if size not in (128, 224):
        raise ValueError(f"--size must be 128 or 224, got {size}")
    out = Path(out)
    if not (out / "scenes.json").is_file():  # a world is rewritten in place (the same files), a user's folder is not
        claim_folder(out)
    scenes = [make_scene(seed, i, split_of(i, num_images), size) for i in range(num_images)]
    for scene in tqdm(scenes, desc="shapes-world images", disable=not progress):
        buffer = io.BytesIO()
        render(scene, seed).save(buffer, format="PNG")
        _write_bytes(out / "images" / scene.file_name, buffer.getvalue())

    texts = {scene.image_id: np.random.default_rng([seed, scene.image_id, 2]) for scene in scenes}
    scene_captions = {s.image_id: captions(s, texts[s.image_id]) for s in scenes}
    _write_json(out / "gt_boxes.json", {str(s.image_id): [list(x.box) for x in s.shapes] for s in scenes})
    _write_json(out / "gt_classes.json",
                {str(s.image_id): [class_id(x.colour, x.kind) for x in s.shapes] for s in scenes})
    _write_captions(out / "captions", scenes, scene_captions)
    _write_retrieval(out / "retrieval", scenes, scene_captions)
    _write_vqa(out / "vqa", scenes, texts)
    _write_refer(out / "refshapes", scenes, texts)
    # scenes.json comes last: its presence says the whole dataset is written (the Makefile's target)
    _write_json(out / "scenes.json", {
        "version": WORLD_VERSION, "seed": seed, "size": size, "classes": CLASS_NAMES,
        "compositional_pairs": [list(p) for p in COMPOSITIONAL_PAIRS],
        "images": [{"image_id": s.image_id, "file_name": s.file_name, "split": s.split,
                    "shapes": [asdict(shape) for shape in s.shapes]} for s in scenes],
    })
    return dict(Counter(s.split for s in scenes))


def _write_captions(folder: Path, scenes: list[Scene], scene_captions: dict[int, list[str]]) -> None:
    """`captions_<split>.jsonl` (one line per caption) and the reference's `caption_<split>.json` dict form."""
    for split in SPLITS:
        chosen = [s for s in scenes if s.split == split]
        lines = [json.dumps({"image_id": str(s.image_id), "caption": c})
                 for s in chosen for c in scene_captions[s.image_id]]
        _write_bytes(folder / f"captions_{split}.jsonl", ("\n".join(lines) + "\n").encode())
        _write_json(folder / f"caption_{split}.json", {str(s.image_id): scene_captions[s.image_id][0] for s in chosen})


def _raw(caption: str) -> str:
    """A sentence as annotators typed it: capitalised (the `raw` field of Karpathy's files)."""
    return caption[0].upper() + caption[1:]


RETRIEVAL_EVAL_IMAGES = 50  # images in each `set0` evaluation file (COCO's 1k test subset, scaled down)


def _write_retrieval(folder: Path, scenes: list[Scene], scene_captions: dict[int, list[str]]) -> None:
    """Karpathy's split JSON `dataset_shapes.json` (five sentences per image; imgid equals the image id, ids
    are 0..N-1), and the reference's JSON-lines files: `all_data_final_train.jsonline` with every train image and,
    per held-out split, `all_data_final_<split>_set0.jsonline` with its first 50 images. Scoring every caption
    against every image costs captions x images forward passes, so a CPU evaluates the small sets.
    """
    for split in SPLITS:
        chosen = [s for s in scenes if s.split == split]
        name = "all_data_final_train.jsonline" if split == "train" else f"all_data_final_{split}_set0.jsonline"
        if split != "train":
            chosen = chosen[:RETRIEVAL_EVAL_IMAGES]
        lines = [json.dumps({"id": s.image_id, "img_path": s.file_name,
            "sentences": [_raw(c) for c in scene_captions[s.image_id]]})
                 for s in chosen]
        _write_bytes(folder / name, ("\n".join(lines) + "\n").encode())
    images, sentid = [], 0
    for scene in scenes:
        sentences = []
        for caption in scene_captions[scene.image_id]:
            sentences.append({"raw": _raw(caption), "tokens": tokens(caption), "imgid": scene.image_id, "sentid": sentid})
            sentid += 1
        images.append({"filename": scene.file_name, "imgid": scene.image_id, "split": scene.split,
                       "sentences": sentences, "sentids": [s["sentid"] for s in sentences]})
    _write_json(folder / "dataset_shapes.json", {"images": images, "dataset": "shapes"})


# Where each split's VQA files go, under the official names the VQA reader knows: train and val as COCO's
# train2014/val2014, test's questions alone as test2015 (answers hidden, as on the server), and test and
# compositional with answers in folders of their own, as val2014, so the reader's `val` split evaluates them.
VQA_FILES = {
    "train": [("", "train2014")],
    "val": [("", "val2014")],
    "test": [("", "test2015"), ("test", "val2014")],
    "compositional": [("compositional", "val2014")],
}


def vqa_items(scene: Scene, rng: np.random.Generator) -> list[tuple[int, Question, list[str]]]:
    """(question_id, question, the ten annotators' answers) of one scene; question_id = image_id * 100 + index.
    `rng` is the scene's text generator after its captions (as `write_shapes_world` draws them)."""
    items = []
    for index, q in enumerate(questions(scene, rng)):
        items.append((scene.image_id * 100 + index, q, _annotator_answers(q, rng)))
    return items


def replay_vqa_items(scene: Scene, seed: int) -> list[tuple[int, Question, list[str]]]:
    """`vqa_items` of a scene of a written world, drawn again from its seed: the same questions, with their
    targets (which the VQA files do not hold)."""
    rng = np.random.default_rng([seed, scene.image_id, 2])
    captions(scene, rng)
    return vqa_items(scene, rng)


def _write_vqa(folder: Path, scenes: list[Scene], texts: dict[int, np.random.Generator]) -> None:
    """VQA v2 question and annotation JSON per split (`vqa_items`)."""
    for split in SPLITS:
        qs, anns = [], []
        for scene in (s for s in scenes if s.split == split):
            for question_id, q, answers in vqa_items(scene, texts[scene.image_id]):
                qs.append({"image_id": scene.image_id, "question": q.question, "question_id": question_id})
                anns.append({
                    "question_id": question_id, "image_id": scene.image_id,
                    "question_type": q.question_type, "answer_type": q.answer_type,
                    "multiple_choice_answer": Counter(answers).most_common(1)[0][0],
                    "answers": [{"answer": a, "answer_confidence": "yes" if a == q.answer else "maybe",
                                 "answer_id": k + 1} for k, a in enumerate(answers)],
                })
        for subfolder, subtype in VQA_FILES[split]:
            common = {"info": {"description": f"shapes world (synthetic), {split} split", "version": "1.0"},
                      "license": {"name": "MIT"}, "data_type": "shapes", "data_subtype": subtype}
            _write_json(folder / subfolder / f"v2_OpenEnded_mscoco_{subtype}_questions.json",
                        {**common, "task_type": "Open-Ended", "questions": qs})
            if subtype != "test2015":
                _write_json(folder / subfolder / f"v2_mscoco_{subtype}_annotations.json", {**common, "annotations": anns})


def _write_refer(folder: Path, scenes: list[Scene], texts: dict[int, np.random.Generator]) -> None:
    """refer-toolkit `refs(unc).p` and COCO `instances.json`; ann_id = image_id * 10 + shape index.

    In the compositional split only shapes of held-out pairs are referred to.
    """
    images, annotations, refs, sent_id = [], [], [], 0
    for scene in scenes:
        images.append({"id": scene.image_id, "file_name": scene.file_name,
                       "height": scene.size, "width": scene.size})
        rng = texts[scene.image_id]
        for index, shape in enumerate(scene.shapes):
            ann_id = scene.image_id * 10 + index
            x1, y1, x2, y2 = shape.box
            annotations.append({"id": ann_id, "image_id": scene.image_id,
                                "bbox": [x1, y1, round(x2 - x1, 2), round(y2 - y1, 2)],
                                "category_id": class_id(shape.colour, shape.kind), "area": shape_area(shape),
                                "iscrowd": 0})
            if scene.split == "compositional" and (shape.colour, shape.kind) not in COMPOSITIONAL_PAIRS:
                continue
            expressions = referring_expressions(scene, shape, rng)
            if not expressions:
                continue
            sentences = []
            for text in expressions:
                sentences.append({"sent": " ".join(tokens(text)), "raw": text, "tokens": tokens(text),
                                  "sent_id": sent_id})
                sent_id += 1
            refs.append({"ref_id": len(refs), "ann_id": ann_id, "image_id": scene.image_id, "split": scene.split,
                         "sentences": sentences, "sent_ids": [s["sent_id"] for s in sentences],
                         "category_id": class_id(shape.colour, shape.kind),
                         "file_name": f"{scene.image_id}_{ann_id}.png"})
    categories = [{"id": i, "name": name, "supercategory": name.split()[1]}
                  for i, name in enumerate(CLASS_NAMES) if i > 0]
    _write_json(folder / "instances.json", {"images": images, "annotations": annotations, "categories": categories})
    _write_bytes(folder / "refs(unc).p", pickle.dumps(refs, protocol=PICKLE_PROTOCOL))
