"""Pretraining on grounded captions: the caption files' phrases, relations and false captions are read and checked;
the geometry targets sit on the phrase's head word and the relation word with the values a hand computation gives;
relation words are always masked, hard negatives are the own image with the false caption; and a tiny model learns
the box centres through `vilbert pretrain`, resumes bitwise and refuses captions without grounding."""

import json
import re

import numpy as np
import pytest
import torch
import yaml

from features.store import FeatureStore
from tasks import cli
from tasks.data.caption_geometry import geometry_targets, geometry_tokens
from tasks.data.captions import Caption, Phrase, Relation, load_captions
from tasks.data.regions import visual_input
from tasks.data.tokenization import load_tokenizer
from tasks.engine.checkpoints import STATE_FILE, list_checkpoints
from tasks.errors import AnnotationError
from tasks.pretraining import IGNORE, PretrainingDataset
from tests.fixtures.pretrain_resume import killed_and_resumed
from tests.fixtures.run_logs import records
from tests.fixtures.tiny_pretrain_data import grounded_line, make_images, write_store, write_vocab

IMAGE_HW = (80, 100)  # the tiny stores' image size (tests.fixtures.tiny_pretrain_data.write_store)


def usable(images):
    """The images `grounded_line` grounds (two colours that occur once, a colour they lack)."""
    return {i: image for i, image in images.items() if "phrases" in grounded_line(i, image)}


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("grounded")
    out = {"vocab": write_vocab(root / "vocab")}  # the fixture's words: "left" and "right" included
    for split, count, seed in (("train", 160, 0), ("val", 40, 1)):
        images = usable(make_images(count, seed=seed))
        out[f"{split}_features"] = write_store(root / f"{split}.h5", images)
        lines = [json.dumps(grounded_line(image_id, image)) for image_id, image in images.items()]
        out[f"{split}_captions"] = root / f"{split}.jsonl"
        out[f"{split}_captions"].write_text("\n".join(lines) + "\n")
        out[f"{split}_images"] = images
    return out


def test_grounded_caption_lines_are_read_with_their_phrases_relations_and_false_caption(paths):
    captions = load_captions(paths["train_captions"])
    first = captions[0]
    assert len(first.phrases) == 2 and len(first.relations) == 1 and first.false_caption
    assert first.text[first.relations[0].start:first.relations[0].end] in ("left", "right")
    assert first.text[first.phrases[0].start:first.phrases[0].end].endswith(" thing")


@pytest.mark.parametrize("field, value, message", [
    ("phrases", [{"start": 0, "end": 99, "box": [0, 0, 1, 1]}], "span [0, 99) is not within"),
    ("phrases", [{"start": 0, "end": 3, "box": [5, 0, 1, 1]}], "box must be [x1, y1, x2, y2]"),
    ("relations", [{"start": 0, "end": 3, "subject": 0, "object": 0}], "two different phrase indices"),
    ("false_caption", "", "false_caption must be a non-empty string"),
])
def test_a_bad_grounding_is_one_error_naming_the_file_and_line(tmp_path, field, value, message):
    path = tmp_path / "caps.jsonl"
    line = {"image_id": "1", "caption": "a red thing", field: value}
    path.write_text(json.dumps({"image_id": "0", "caption": "fine"}) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(AnnotationError, match=rf"caps.jsonl: line 2: .*{re.escape(message)}"):
        load_captions(path)


def test_geometry_targets_sit_on_the_head_word_and_the_relation_word(tmp_path):
    tokenizer = load_tokenizer(write_vocab(tmp_path / "vocab"))
    text = "a red thing left of a blue thing"  # [CLS] a red thing left of a blue thing [SEP]
    caption = Caption("0", text, (Phrase(2, 11, (0.0, 0.0, 20.0, 40.0)), Phrase(22, 32, (60.0, 20.0, 100.0, 60.0))),
                      (Relation(12, 16, 0, 1),))
    tokens = geometry_tokens(caption, tokenizer, 16)
    assert tokens.phrase_tokens.tolist() == [3, 8] and tokens.relation_tokens.tolist() == [4]
    phrases, relations = geometry_targets(tokens, IMAGE_HW, 16)
    # centres (10, 20) and (80, 40) of a 100 x 80 image, in [-1, 1]: (-0.8, -0.5) and (0.6, 0.0)
    assert np.allclose(phrases[3], [-0.8, -0.5]) and np.allclose(phrases[8], [0.6, 0.0])
    assert np.allclose(relations[4], [-1.4, -0.5])  # the subject's centre minus the object's
    assert np.isfinite(phrases[:, 0]).sum() == 2 and np.isfinite(relations[:, 0]).sum() == 1
    cut = geometry_tokens(caption, tokenizer, 6)  # [CLS] a red thing left [SEP]: the object phrase is cut off
    assert cut.phrase_tokens.tolist() == [3] and len(cut.relation_tokens) == 0


def grounded_dataset(paths, **options):
    captions = load_captions(paths["train_captions"])
    tokenizer = load_tokenizer(paths["vocab"])
    return PretrainingDataset(captions, FeatureStore(paths["train_features"]), tokenizer, max_text_length=16,
                              max_regions=9, objective=1, seed=3, negatives="image", **options)


def test_relation_words_are_always_masked_and_hard_negatives_are_the_own_image_made_false(paths):
    ds = grounded_dataset(paths, geometry=True, mask_relations=True, hard_negatives=1.0)
    false_ids = ds.tokenizer.encode([c.false_caption for c in ds.captions], 16).input_ids
    aligned = mismatched = 0
    for index in range(len(ds)):
        sample = ds.sample(index, 0)
        relation = ds.geometry_tokens[index].relation_tokens
        if sample["alignment_labels"] == 0:
            aligned += 1
            assert (sample["input_ids"][relation] == ds.tokenizer.mask_id).all()
            assert (sample["mlm_labels"][relation] == ds.text[index][relation]).all()
            assert np.isfinite(sample["relation_offsets"][relation]).all()
        else:
            mismatched += 1  # the own image (hard_negatives=1), its false caption, no labels, no geometry
            unmasked = np.where(sample["input_ids"] == ds.tokenizer.mask_id, false_ids[index], sample["input_ids"])
            assert (sample["mlm_labels"] == IGNORE).all() and np.isnan(sample["phrase_centres"]).all()
            assert (unmasked != ds.text[index]).sum() >= 1
            own = visual_input(ds.store.read(ds.captions[index].image_id), 9)
            assert np.array_equal(sample["visual"].locations, own.locations)  # the caption's own image
    assert aligned > 20 and mismatched > 20
    plain = grounded_dataset(paths)  # no options: the samples are the ungrounded dataset's, draw for draw
    reference = PretrainingDataset([Caption(c.image_id, c.text) for c in plain.captions], plain.store,
                                   plain.tokenizer, max_text_length=16, max_regions=9, objective=1, seed=3,
                                   negatives="image")
    for index in range(10):
        a, b = plain.sample(index, 1), reference.sample(index, 1)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in ("input_ids", "mlm_labels"))


def write_config(tmp_path, paths, **data):
    config = {
        "model": {"preset": "tiny"},
        "data": {"tokenizer": str(paths["vocab"]), "train_features": str(paths["train_features"]),
                 "train_captions": str(paths["train_captions"]), "val_features": str(paths["val_features"]),
                 "val_captions": str(paths["val_captions"]), "max_text_length": 16, "max_regions": 9,
                 "eval_batch_size": 16, "retrieval_chunk": 8, "negatives": "image", "geometry_weight": 4.0,
                 "mask_relations": True, "hard_negatives": 0.5, **data},
        "train": {"output_dir": str(tmp_path / "run"), "epochs": 12, "global_batch_size": 16, "num_workers": 0,
                  "log_every": 4, "device": "cpu", "eval_at_end": False, "eval_every": 1000},
        "optim": {"lr": 3e-3, "warmup": 0.1},
    }
    path = tmp_path / "pretrain.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_grounded_pretraining_learns_the_box_centres(tmp_path, paths):
    assert cli.main(["pretrain", "--config", str(write_config(tmp_path, paths))]) == 0
    train = records(tmp_path / "run", "train")
    phrase = [r["phrase_centres_error"] for r in train]
    assert np.mean(phrase[-3:]) < 0.6 * np.mean(phrase[:2])  # squared error per head word falls
    assert all(np.isfinite(r["relation_offsets_error"]) for r in train)
    state = torch.load(list_checkpoints(tmp_path / "run")[-1] / STATE_FILE, weights_only=True)
    assert state is not None
    from safetensors.torch import load_file

    weights = load_file(list_checkpoints(tmp_path / "run")[-1] / "model.safetensors")
    assert {"geometry_head.phrase.weight", "geometry_head.relation.weight"} <= set(weights)


def test_grounded_pretraining_resumes_bitwise(tmp_path, paths, monkeypatch):
    killed_and_resumed(write_config(tmp_path, paths), ["train.epochs=2", "train.log_every=1", "train.save_every=3"],
                       tmp_path, monkeypatch)


@pytest.mark.parametrize("option", ["data.geometry_weight=1", "data.mask_relations=true", "data.hard_negatives=0.5"])
def test_an_option_without_grounded_captions_is_one_error_naming_the_file(tmp_path, paths, capsys, option):
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"image_id": i, "caption": "a red thing"}) + "\n"
                             for i in paths["train_images"]))
    config = write_config(tmp_path, paths, geometry_weight=0.0, mask_relations=False, hard_negatives=0.0)
    assert cli.main(["pretrain", "--config", str(config), f"data.train_captions={plain}", option]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and option.split("=")[0] in err[0] and "plain.jsonl" in err[0]
    assert not (tmp_path / "run").exists()
