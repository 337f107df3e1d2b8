"""The shapes-world generator: determinism, scene truth of every text, the compositional split, the file formats."""

import hashlib
import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from features.errors import OutputError
from tasks.shapes.world import CLASS_NAMES, COMPOSITIONAL_PAIRS, write_shapes_world

SPLITS = ("train", "val", "test", "compositional")
EXTREME = {"on the left": (0, -1), "on the right": (0, 1), "at the top": (1, -1), "at the bottom": (1, 1)}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    write_shapes_world(out, seed=3, num_images=40, size=128, progress=False)
    return out


@pytest.fixture(scope="module")
def scenes(world) -> dict[int, dict]:
    return {image["image_id"]: image for image in json.loads((world / "scenes.json").read_text())["images"]}


def vqa_file(world: Path, split: str, kind: str) -> Path:
    """Where the generator puts a split's VQA file (under the official names; see VQA_FILES)."""
    folder, subtype = {"train": ("", "train2014"), "val": ("", "val2014"), "test": ("test", "val2014"),
                       "compositional": ("compositional", "val2014")}[split]
    name = f"v2_OpenEnded_mscoco_{subtype}_questions.json" if kind == "questions" else f"v2_mscoco_{subtype}_annotations.json"
    return world / "vqa" / folder / name


def folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


# An independent reading of the generator's language, from the scene description alone.

def strictly_beyond(a: dict, b: dict, axis: int, sign: int) -> bool:
    """a lies entirely on the `sign` side of b along x (axis 0) or y (axis 1)."""
    if sign < 0:
        return a["box"][axis + 2] < b["box"][axis]
    return b["box"][axis + 2] < a["box"][axis]


def resolve(phrase: str, shapes: list[dict]) -> list[int]:
    """Indices of the shapes a noun phrase such as "large red circle on the left" can mean."""
    location = next((p for p in EXTREME if phrase.endswith(" " + p)), None)
    words = phrase[: -len(location) - 1].split() if location else phrase.split()
    wanted = {}
    for word in words:
        key = "size" if word in ("small", "large") else "kind" if word in ("circle", "square", "triangle") else "colour"
        wanted[key] = word
    group = [i for i, s in enumerate(shapes) if all(s[k] == v for k, v in wanted.items())]
    if location:
        axis, sign = EXTREME[location]
        group = [i for i in group if all(strictly_beyond(shapes[i], shapes[j], axis, sign) for j in group if j != i)]
    return group


def answer_from_scene(question: str, shapes: list[dict]) -> str:
    if m := re.fullmatch(r"what color is the (.+)\?", question):
        (index,) = resolve(m[1], shapes)
        return shapes[index]["colour"]
    if m := re.fullmatch(r"what shape is the (.+) object\?", question):
        (index,) = resolve(m[1], shapes)
        return shapes[index]["kind"]
    if m := re.fullmatch(r"how many (?:(\w+) )?(\w+)s are there\?", question):
        colour, kind = m[1], m[2]
        return str(sum((colour is None or s["colour"] == colour) and kind in ("shape", s["kind"]) for s in shapes))
    if m := re.fullmatch(r"is there a (\w+) (\w+)\?", question):
        return "yes" if any(s["colour"] == m[1] and s["kind"] == m[2] for s in shapes) else "no"
    if m := re.fullmatch(r"is the (.+) (to the left of|above) the (.+)\?", question):
        (a,), (b,) = resolve(m[1], shapes), resolve(m[3], shapes)
        axis = 0 if m[2] == "to the left of" else 1
        return "yes" if strictly_beyond(shapes[a], shapes[b], axis, -1) else "no"
    raise AssertionError(f"question of unknown form: {question!r}")


def test_same_seed_gives_byte_identical_files_and_another_seed_differs(world, tmp_path):
    write_shapes_world(tmp_path / "again", seed=3, num_images=40, size=128, progress=False)
    write_shapes_world(tmp_path / "other", seed=4, num_images=40, size=128, progress=False)
    assert folder_digest(tmp_path / "again") == folder_digest(world)
    assert folder_digest(tmp_path / "other") != folder_digest(world)


def test_a_users_folder_is_refused_and_a_killed_world_is_written_again(tmp_path):
    mine = tmp_path / "mine"
    (mine / "images").mkdir(parents=True)
    (mine / "images" / "0.png").write_bytes(b"my photo")
    with pytest.raises(OutputError, match="did not write"):
        write_shapes_world(mine, seed=3, num_images=8, progress=False)
    assert (mine / "images" / "0.png").read_bytes() == b"my photo" and len(list(tmp_path.rglob("*"))) == 3
    killed = tmp_path / "killed"  # a generation killed before scenes.json: its own folder, written again
    write_shapes_world(killed, seed=3, num_images=8, progress=False)
    (killed / "scenes.json").unlink()
    write_shapes_world(killed, seed=3, num_images=8, progress=False)
    assert (killed / "scenes.json").is_file()


def test_scenes_hold_two_to_five_separated_shapes_inside_the_image(scenes, world):
    for image_id, scene in scenes.items():
        shapes = scene["shapes"]
        assert 2 <= len(shapes) <= 5
        for i, a in enumerate(shapes):
            x1, y1, x2, y2 = a["box"]
            assert 0 <= x1 < x2 <= 128 and 0 <= y1 < y2 <= 128
            for b in shapes[i + 1:]:
                assert any(strictly_beyond(a, b, axis, sign) for axis in (0, 1) for sign in (-1, 1))
        pixels = np.asarray(Image.open(world / "images" / scene["file_name"]), dtype=float)
        assert pixels.shape == (128, 128, 3)
        for shape in shapes:  # the centre pixel has the shape's colour (noise sigma 8)
            cx, cy = (int(v) for v in shape["centre"])
            assert np.abs(pixels[cy, cx] - shape["rgb"]).max() < 45, (image_id, shape)


def test_every_referring_expression_picks_exactly_its_shape(world, scenes):
    refs = pickle.loads((world / "refshapes" / "refs(unc).p").read_bytes())
    instances = json.loads((world / "refshapes" / "instances.json").read_text())
    boxes = {a["id"]: a["bbox"] for a in instances["annotations"]}
    assert len(refs) > 40
    for ref in refs:
        shapes = scenes[ref["image_id"]]["shapes"]
        target = [i for i, s in enumerate(shapes) if s["box"][:2] == boxes[ref["ann_id"]][:2]]
        assert ref["split"] == scenes[ref["image_id"]]["split"]
        for sentence in ref["sentences"]:
            assert sentence["raw"].startswith("the ")
            assert resolve(sentence["raw"][4:], shapes) == target, sentence["raw"]
            assert sentence["tokens"] == sentence["sent"].split()


def test_vqa_answers_agree_with_the_scene(world, scenes):
    for split in SPLITS:
        questions = json.loads(vqa_file(world, split, "questions").read_text())
        annotations = json.loads(vqa_file(world, split, "annotations").read_text())
        assert questions["task_type"] == "Open-Ended"
        by_id = {a["question_id"]: a for a in annotations["annotations"]}
        assert len(by_id) == len(questions["questions"]) > 0
        for q in questions["questions"]:
            annotation = by_id[q["question_id"]]
            truth = answer_from_scene(q["question"], scenes[q["image_id"]]["shapes"])
            answers = [a["answer"] for a in annotation["answers"]]
            assert annotation["multiple_choice_answer"] == truth, q["question"]
            assert len(answers) == 10 and answers.count(truth) >= 7
            assert [a["answer_id"] for a in annotation["answers"]] == list(range(1, 11))
            expected_type = {"yes": "yes/no", "no": "yes/no"}.get(truth, "number" if truth.isdigit() else "other")
            assert annotation["answer_type"] == expected_type


def test_compositional_pairs_appear_only_in_the_compositional_split(world, scenes):
    held_out = [f"{colour} {kind}" for colour, kind in COMPOSITIONAL_PAIRS]
    for scene in scenes.values():
        pairs = {f"{s['colour']} {s['kind']}" for s in scene["shapes"]}
        if scene["split"] == "compositional":
            assert pairs & set(held_out)
        else:
            assert not pairs & set(held_out)
    for split in ("train", "val", "test"):
        texts = (world / "captions" / f"captions_{split}.jsonl").read_text()
        texts += vqa_file(world, split, "questions").read_text()
        texts += " ".join(s["raw"] for r in pickle.loads((world / "refshapes" / "refs(unc).p").read_bytes())
                          if r["split"] == split for s in r["sentences"])
        # "red triangle", "large red triangle": the two words next to each other in any text
        assert not any(pair in texts for pair in held_out), split


def test_retrieval_json_has_five_tokenised_sentences_per_image(world, scenes):
    dataset = json.loads((world / "retrieval" / "dataset_shapes.json").read_text())
    assert dataset["dataset"] == "shapes" and len(dataset["images"]) == len(scenes)
    sentids = []
    for image in dataset["images"]:
        assert image["split"] == scenes[image["imgid"]]["split"]
        assert image["filename"] == scenes[image["imgid"]]["file_name"]
        assert len(image["sentences"]) == 5 and image["sentids"] == [s["sentid"] for s in image["sentences"]]
        for sentence in image["sentences"]:
            assert sentence["imgid"] == image["imgid"]
            assert sentence["tokens"] == re.sub(r"[^a-z ]", " ", sentence["raw"].lower()).split()
        sentids += image["sentids"]
    assert sentids == list(range(len(sentids)))


def test_boxes_and_classes_for_extraction_match_the_scenes(world, scenes):
    boxes = json.loads((world / "gt_boxes.json").read_text())
    classes = json.loads((world / "gt_classes.json").read_text())
    instances = json.loads((world / "refshapes" / "instances.json").read_text())
    assert sorted(boxes, key=int) == [str(i) for i in sorted(scenes)]
    for image_id, scene in scenes.items():
        assert boxes[str(image_id)] == [s["box"] for s in scene["shapes"]]
        names = [CLASS_NAMES[c] for c in classes[str(image_id)]]
        assert names == [f"{s['colour']} {s['kind']}" for s in scene["shapes"]]
    for annotation in instances["annotations"]:
        x, y, w, h = annotation["bbox"]
        assert [x, y, round(x + w, 2), round(y + h, 2)] in boxes[str(annotation["image_id"])]
    assert [c["id"] for c in instances["categories"]] == list(range(1, 19))


def test_caption_files_hold_every_image_of_their_split(world, scenes):
    for split in SPLITS:
        lines = [json.loads(line) for line in (world / "captions" / f"captions_{split}.jsonl").read_text().splitlines()]
        ids = {int(line["image_id"]) for line in lines}
        assert ids == {i for i, s in scenes.items() if s["split"] == split}
        assert len(lines) == 5 * len(ids)
        first = json.loads((world / "captions" / f"caption_{split}.json").read_text())
        assert set(first) == {str(i) for i in ids}


def test_command_rejects_too_few_images_with_one_line(tmp_path, capsys):
    from tasks.cli import main

    assert main(["shapes-world", "--out", str(tmp_path / "x"), "--images", "3"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "vilbert shapes-world: error: --images must be at least 4 (one per split), got 3"]
    assert not (tmp_path / "x").exists()


def test_class_targets_become_one_hot_cls_prob_in_the_store(world, scenes, tmp_path):
    from features.store import FeatureStore, FeatureStoreWriter
    from tasks.cli import main

    boxes = json.loads((world / "gt_boxes.json").read_text())
    store_path = tmp_path / "gt.h5"
    with FeatureStoreWriter(store_path, feature_dim=8) as writer:
        for image_id in ("0", "5"):
            writer.add(image_id, (128, 128), np.ones((len(boxes[image_id]), 8)), np.asarray(boxes[image_id]))
    assert main(["shapes-world", "--out", str(world), "--add-cls-prob", str(store_path)]) == 0
    store = FeatureStore(store_path)
    regions = store.read("5")
    names = [CLASS_NAMES[c] for c in regions.cls_prob.argmax(1)]
    assert names == [f"{s['colour']} {s['kind']}" for s in scenes[5]["shapes"]]
    assert np.array_equal(regions.cls_prob.sum(1), np.ones(len(names)))
    assert np.array_equal(regions.features, np.ones((len(names), 8)))


def test_class_targets_refuse_a_store_with_other_boxes(world, tmp_path, capsys):
    from features.store import FeatureStoreWriter
    from tasks.cli import main

    store_path = tmp_path / "grid.h5"
    with FeatureStoreWriter(store_path, feature_dim=8) as writer:
        writer.add("0", (128, 128), np.ones((1, 8)), np.array([[0, 0, 64, 64]]))
    before = store_path.read_bytes()
    assert main(["shapes-world", "--out", str(world), "--add-cls-prob", str(store_path)]) == 2
    assert "are not the ground-truth boxes" in capsys.readouterr().err
    assert store_path.read_bytes() == before


def test_vqa_files_load_through_the_vqa_reader(world, scenes):
    from tasks.vqa import build_vocabulary, read_split

    train = read_split(world / "vqa", "train")
    trainval = read_split(world / "vqa", "trainval", minval_size=0)
    assert {scenes[q.image_id]["split"] for q in train} == {"train"}
    assert {scenes[q.image_id]["split"] for q in trainval} == {"train", "val"}
    assert len(read_split(world / "vqa", "test")) == len(read_split(world / "vqa" / "test", "val"))
    compositional = read_split(world / "vqa" / "compositional", "val")
    assert compositional and {scenes[q.image_id]["split"] for q in compositional} == {"compositional"}
    vocabulary = build_vocabulary(trainval, min_count=1)
    assert {"yes", "no", "red", "circle", "2"} <= set(vocabulary) and len(vocabulary) <= 32
    assert all(len(q.answers) == 10 for q in train)


def test_refer_files_load_through_the_refexp_reader(world, scenes):
    from tasks.refexp import read_refs

    refs, instances = world / "refshapes" / "refs(unc).p", world / "refshapes" / "instances.json"
    for split in SPLITS:
        expressions = read_refs(refs, instances, split)
        assert expressions and {scenes[e.image_id]["split"] for e in expressions} == {split}
        for e in expressions:
            assert list(e.box) in [pytest.approx(s["box"], abs=1e-3) for s in scenes[e.image_id]["shapes"]]


def test_retrieval_files_load_through_the_karpathy_and_jsonlines_readers(world, scenes):
    from tasks.retrieval import read_jsonlines, read_karpathy

    for split in SPLITS:
        images = read_karpathy(world / "retrieval" / "dataset_shapes.json", split)
        assert {scenes[int(im.image_id)]["split"] for im in images} == {split}
        assert all(len(im.captions) == 5 for im in images)
        name = "all_data_final_train.jsonline" if split == "train" else f"all_data_final_{split}_set0.jsonline"
        lines = read_jsonlines(world / "retrieval" / name)
        assert [(im.image_id, im.captions) for im in lines] == [(im.image_id, im.captions) for im in images[:len(lines)]]
        assert len(lines) == (len(images) if split == "train" else min(50, len(images)))


def test_caption_files_load_through_the_caption_reader(world):
    from tasks.data.captions import load_captions

    lines = load_captions(world / "captions" / "captions_train.jsonl")
    first = load_captions(world / "captions" / "caption_train.json")
    assert len(lines) == 5 * len(first)
    assert {c.image_id for c in lines} == {c.image_id for c in first}
    assert all(c.text.startswith("from left to right: ") for c in first)
