"""The shapes world's NLVR2 / SNLI-VE / GQA / Visual7W / VQA-CP files and VQA grounding boxes: readable by the task
readers, true to the scenes, deterministic, and written beside the world's other files without changing them."""

import hashlib
import json
import re
import shutil
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tasks.data.captions import load_captions
from tasks.errors import DataError
from tasks.gqa import read_gqa
from tasks.nlvr2 import read_nlvr2
from tasks.pointing import read_visual7w
from tasks.shapes.grounded_captions import COLOUR_COUNT, PHRASE
from tasks.shapes.tasks import GQA_TEMPLATES, balance_answers, gqa_questions, write_task_files
from tasks.shapes.world import COLOURS, COMPOSITIONAL_PAIRS, KINDS, SIZES, above, left_of, make_scene, write_shapes_world
from tasks.snli_ve import LABELS, read_snli_ve
from tasks.vqa import read_cp_split, read_split


def digest(folder: Path, skip: str | None = None) -> str:
    """One hash of every file under `folder` (but those whose name ends with `skip`)."""
    hashed = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not (skip and p.name.endswith(skip))):
        hashed.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return hashed.hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    write_shapes_world(out, seed=3, num_images=60, size=128, progress=False)
    before = digest(out)
    counts = write_task_files(out)
    new = {"nlvr2", "snli_ve", "gqa", "visual7w", "vqa-cp", "captions_grounded"}
    assert {p.name for p in out.iterdir()} >= new and all(counts.values())
    original = out.parent / "original"  # the world's own files are unchanged: the same digest without the new
    original.mkdir()
    for path in out.iterdir():
        if path.name not in new:
            path.rename(original / path.name)
    assert digest(original, skip="_grounding.json") == before  # the VQA folders only gain grounding files
    for path in original.iterdir():
        path.rename(out / path.name)
    return out


def test_files_are_deterministic(world, tmp_path):
    again = tmp_path / "again"
    write_shapes_world(again, seed=3, num_images=60, size=128, progress=False)
    write_task_files(again)
    for name in ("nlvr2", "snli_ve", "gqa", "visual7w", "vqa-cp", "vqa", "captions_grounded"):
        assert digest(world / name) == digest(again / name)


def test_grounded_captions_point_at_the_shapes_they_name_and_state_true_relations(world):
    scenes = {str(i["image_id"]): i["shapes"] for i in json.loads((world / "scenes.json").read_text())["images"]}
    words, originals, false, total = Counter(), 0, 0, 0
    for split in ("train", "val", "test", "compositional"):
        captions = load_captions(world / "captions_grounded" / f"captions_{split}.jsonl")
        source = load_captions(world / "captions" / f"captions_{split}.jsonl")
        assert len(captions) == len(source)
        total += len(captions)
        originals += sum(a.text == b.text for a, b in zip(captions, source, strict=True))
        for caption in captions:
            shapes = scenes[caption.image_id]
            for phrase in caption.phrases:
                size, colour, kind = caption.text[phrase.start:phrase.end].split()
                named = [s for s in shapes if (s["size"], s["colour"], s["kind"]) == (size, colour, kind)]
                assert len(named) == 1 and list(phrase.box) == named[0]["box"], caption
            for relation in caption.relations:
                word = caption.text[relation.start:relation.end]
                words[word] += 1
                a, b = (caption.phrases[i].box for i in (relation.subject, relation.object))
                holds = {"left": a[2] <= b[0], "right": b[2] <= a[0], "above": a[3] <= b[1], "below": b[3] <= a[1]}
                assert holds[word], caption
            if caption.false_caption is not None:
                false += 1
                named = {tuple(m.groups()) for m in PHRASE.finditer(caption.false_caption)}
                present = {(s["size"], s["colour"], s["kind"]) for s in shapes}
                colours = {m.group(2) for m in COLOUR_COUNT.finditer(caption.false_caption)}
                assert not named <= present or not colours <= {s["colour"] for s in shapes}, caption
    assert set(words) == {"left", "right", "above", "below"}
    assert min(words.values()) > 0.15 * sum(words.values())  # the world writes ~92 % as left or above
    assert 0.5 * total < originals < total  # only relation sentences are turned around, about half of them
    assert false > 0.4 * total  # listings, relations and colour counts can be made false


def test_nlvr2_statements_pair_true_and_false(world):
    samples = read_nlvr2(world / "nlvr2" / "train.json", images_from_urls=True)
    labels = Counter(s.label for s in samples)
    assert labels[True] > 0.3 * len(samples) and labels[False] > 0.3 * len(samples)
    scenes = {str(i["image_id"]): i for i in json.loads((world / "scenes.json").read_text())["images"]}
    for sample in samples:
        left, right = (scenes[image] for image in sample.images)
        assert left["split"] == right["split"] == "train"
        if sample.texts[0] == "the two images have the same number of shapes":
            assert sample.label == (len(left["shapes"]) == len(right["shapes"]))


def test_snli_ve_has_one_hypothesis_of_each_label_per_scene(world):
    samples = read_snli_ve(world / "snli_ve" / "snli_ve_dev.jsonl")
    by_image = Counter(s.images[0] for s in samples)
    assert set(by_image.values()) == {3}
    assert Counter(s.label for s in samples) == {i: len(by_image) for i in range(len(LABELS))}


def shape_named(phrase: str, shapes: list[dict]) -> dict:
    """The one shape of the scene that a phrase of attribute words ("large red", "circle") fits."""
    words = phrase.split()
    wanted = {key: word for word in words for key, values in (("size", SIZES), ("colour", COLOURS), ("kind", KINDS))
              if word in values}
    assert len(wanted) == len(words), phrase  # attribute words only: no position ("on the left") tells an answer
    found = [s for s in shapes if all(s[key] == value for key, value in wanted.items())]
    assert len(found) == 1, phrase
    return found[0]


def relation(test, a: dict, b: dict) -> bool:
    """The world's spatial relation (`left_of`, `above`) between two shapes of scenes.json."""
    return test(SimpleNamespace(box=tuple(a["box"])), SimpleNamespace(box=tuple(b["box"])))


def test_gqa_answers_are_true_of_the_scene(world):
    scenes = {str(i["image_id"]): i for i in json.loads((world / "scenes.json").read_text())["images"]}
    samples = read_gqa(world / "gqa" / "testdev_balanced_questions.json")
    assert {s.extra["question_type"] for s in samples} == set(GQA_TEMPLATES)
    for sample in samples:
        text, shapes = sample.texts[0], scenes[sample.images[0]]["shapes"]
        if text.startswith("is there a "):
            options = text.removeprefix("is there a ").removesuffix("?").split(" or a ")
            assert not {tuple(o.split()) for o in options} & set(COMPOSITIONAL_PAIRS)  # pairs no image of it holds
            present = any(f"{s['colour']} {s['kind']}" in options for s in shapes)
            assert sample.label == ("yes" if present else "no")
        elif match := re.fullmatch(r"is the (.+) (to the left of|above) the (.+)\?", text):
            a, b = shape_named(match[1], shapes), shape_named(match[3], shapes)
            holds = relation(left_of if match[2] == "to the left of" else above, a, b)
            assert sample.label == ("yes" if holds else "no")
        elif match := re.fullmatch(r"are the (.+) and the (.+) the same color\?", text):
            a, b = shape_named(match[1], shapes), shape_named(match[2], shapes)
            assert sample.label == ("yes" if a["colour"] == b["colour"] else "no")
        elif match := re.fullmatch(r"what color is the shape to the left of the (.+)\?", text):
            b = shape_named(match[1], shapes)
            left = [s for s in shapes if relation(left_of, s, b)]
            assert [s["colour"] for s in left] == [sample.label]
        else:
            match = re.fullmatch(r"what shape is the object to the right of the (.+) shape\?", text)
            b = shape_named(match[1], shapes)
            right = [s for s in shapes if relation(left_of, b, s)]
            assert [s["kind"] for s in right] == [sample.label]


def test_gqa_answers_are_balanced_per_template_so_the_question_alone_is_at_chance(world):
    for name in ("train", "val", "testdev"):
        answers = {}
        for sample in read_gqa(world / "gqa" / f"{name}_balanced_questions.json"):
            answers.setdefault(sample.extra["question_type"], Counter())[sample.label] += 1
        assert {"relVerify", "existOr"} <= set(answers)
        for template, counts in answers.items():
            assert set(counts) <= set(GQA_TEMPLATES[template][1])
            assert len(set(counts.values())) == 1, (name, template, counts)  # every answer of a template equally often


def test_gqa_splits_keep_as_many_of_each_answer_of_a_template_as_of_its_rarest():
    scenes = [make_scene(5, image_id, "train", 128) for image_id in range(400)]
    asked = [(template, answer) for scene in scenes
             for _, answer, _, template in gqa_questions(scene, np.random.default_rng(scene.image_id))]
    assert all(answer in GQA_TEMPLATES[template][1] for template, answer in asked)
    indices = balance_answers(asked, np.random.default_rng(0))
    assert indices == sorted(set(indices))  # each item once, in order
    kept = [asked[i] for i in indices]
    for template in GQA_TEMPLATES:
        before = Counter(answer for t, answer in asked if t == template)
        after = Counter(answer for t, answer in kept if t == template)
        assert set(after) == set(before) and set(after.values()) == {min(before.values())}


def test_visual7w_candidates_are_the_scene_shapes(world):
    samples = read_visual7w(world / "visual7w" / "dataset_v7w_pointing.json", "test")
    scenes = {str(i["image_id"]): i for i in json.loads((world / "scenes.json").read_text())["images"]}
    for sample in samples:
        shapes = scenes[sample.images[0]]["shapes"]
        assert len(sample.extra["candidates"]) == len(shapes)
        target = shapes[sample.label % 10]
        assert sample.extra["boxes"][sample.extra["candidates"].index(sample.label)] == pytest.approx(target["box"])


def test_the_changing_priors_split_regroups_the_vqa_questions_so_each_type_s_top_answer_changes(world):
    train, test = (read_cp_split(world / "vqa-cp", split) for split in ("train", "test"))
    vqa = [q for root, split in ((world / "vqa", "train"), (world / "vqa", "val"), (world / "vqa" / "test", "val"))
           for q in read_split(root, split)]
    assert sorted(q.question_id for q in train + test) == sorted(q.question_id for q in vqa)  # a regrouping
    assert {q.coco_split for q in train} == {"train2014", "val2014"}
    changed = 0
    for question_type in {q.question_type for q in vqa}:
        top_train = Counter(q.consensus for q in train if q.question_type == question_type).most_common(1)[0]
        in_test = Counter(q.consensus for q in test if q.question_type == question_type)
        share_test = in_test[top_train[0]] / max(1, sum(in_test.values()))
        changed += share_test < 0.5 * top_train[1] / sum(1 for q in train if q.question_type == question_type)
    assert changed == len({q.question_type for q in vqa})  # the train favourite is at most half as common in test


def test_each_question_about_one_shape_has_that_shape_s_box(world):
    scenes = {i["image_id"]: i["shapes"] for i in json.loads((world / "scenes.json").read_text())["images"]}
    named = 0
    for root, split in ((world / "vqa", "trainval"), (world / "vqa" / "test", "val"),
                        (world / "vqa" / "compositional", "val"), (world / "vqa-cp", "train"),
                        (world / "vqa-cp", "test")):
        layout = "vqa-cp" if root.name == "vqa-cp" else "vqa"
        for q in read_split(root, split, minval_size=0, layout=layout, grounding=True):
            about_one = q.question.startswith(("what color is the", "what shape is the"))
            assert (q.box is not None) == about_one, q.question
            if not about_one:
                continue
            shape = next(s for s in scenes[q.image_id] if tuple(s["box"]) == q.box)
            attribute, named_by = ("colour", "kind") if q.question.startswith("what color") else ("kind", "colour")
            assert shape[attribute] == q.consensus and shape[named_by] in q.question
            named += 1
    assert named > 50


def test_grounding_files_refuse_a_world_whose_questions_the_seed_does_not_draw(world, tmp_path):
    copy = tmp_path / "world"
    shutil.copytree(world, copy)
    path = copy / "vqa" / "v2_OpenEnded_mscoco_train2014_questions.json"
    data = json.loads(path.read_text())
    data["questions"][0]["question"] = "what is this?"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="is not the one the world's seed draws"):
        write_task_files(copy)
