"""bench/geometry_pretraining.py and bench/location_pathway.py: the relation sentences turned around state the same
fact, the box-centre targets sit on the shape word of a phrase that names one shape, the relation word's target is the
first shape's centre minus the second's, and the pathway check's labels
say which of A and B lies left, whichever order they are stored in."""

import json

import numpy as np
import torch

from bench.geometry_pretraining import relation_offsets, shape_positions, write_balanced_captions
from bench.location_pathway import BATCH, relation_batch
from tasks.data.tokenization import load_tokenizer
from tasks.shapes.world import Shape, above, left_of

HOLDS = {"to the left of": left_of, "to the right of": lambda a, b: left_of(b, a), "above": above,
         "below": lambda a, b: above(b, a)}


def shape(colour, kind, box):
    return Shape(colour, kind, "large", (0, 0, 0), (0.0, 0.0), 1.0, 0.0, box)


def test_balanced_captions_turn_relations_around_without_changing_the_fact(tmp_path):
    red, blue = shape("red", "circle", (0, 0, 10, 10)), shape("blue", "square", (20, 20, 30, 30))
    captions = [f"a large red circle {relation} a large blue square." for relation in ("to the left of", "above")]
    source = tmp_path / "captions.jsonl"
    lines = [{"image_id": str(i), "caption": c} for i in range(40) for c in captions]
    lines.append({"image_id": "0", "caption": "there are two shapes: one circle and one square."})
    source.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    write_balanced_captions(source, tmp_path / "out" / "captions.jsonl")
    written = [json.loads(line)["caption"] for line in (tmp_path / "out" / "captions.jsonl").read_text().splitlines()]
    assert written[-1] == lines[-1]["caption"]  # not a relation: kept
    turned = [w for w, line in zip(written, lines, strict=True) if w != line["caption"]]
    assert 20 < len(turned) < 60  # about half of the 80
    named = {"large red circle": red, "large blue square": blue}
    for caption in written[:-1]:
        relation = next(r for r in HOLDS if f" {r} " in caption)
        first, second = caption[2:-1].split(f" {relation} a ")
        assert HOLDS[relation](named[first], named[second]), caption  # still true of the scene


def test_the_pathway_labels_follow_a_and_b_not_the_stored_order():
    features = torch.arange(3 * 4, dtype=torch.float32).view(3, 4)
    regions, locations, labels = relation_batch(features, torch.Generator().manual_seed(0))
    assert regions.shape == (BATCH, 3, 4) and locations.shape == (BATCH, 3, 5)
    a_first = (regions[:, 1] == features[1]).all(dim=1)
    x_a = torch.where(a_first, locations[:, 1, 0], locations[:, 2, 0])
    x_b = torch.where(a_first, locations[:, 2, 0], locations[:, 1, 0])
    assert torch.equal(labels, (x_a < x_b).long())
    assert 0 < int(a_first.sum()) < BATCH and 0 < int(labels.sum()) < BATCH


def test_box_centre_targets_sit_on_the_shape_word_of_a_phrase_naming_one_shape(tmp_path):
    words = "a small large red blue circle square to the left of there are two shapes one and".split()
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = load_tokenizer(tmp_path)
    scenes = {"size": 100, "images": [{"image_id": 7, "shapes": [
        {"colour": "red", "kind": "circle", "size": "small", "centre": [25.0, 50.0]},
        {"colour": "blue", "kind": "square", "size": "large", "centre": [75.0, 10.0]},
        {"colour": "blue", "kind": "square", "size": "small", "centre": [50.0, 90.0]},
    ]}]}
    captions = ["a small red circle to the left of a large blue square.", "there are two shapes: one blue square."]
    text = tokenizer.encode(captions, 16).input_ids
    targets = shape_positions(tokenizer, text, ["7", "7"], scenes)
    assert targets.shape == (2, 16, 2)
    circle, square = 4, 12  # [CLS] a small red circle to the left of a large blue square
    assert np.allclose(targets[0, circle], [-0.5, 0.0]) and np.allclose(targets[0, square], [0.5, -0.8])
    labelled = np.isfinite(targets[..., 0])
    assert labelled.sum() == 2  # "blue square" alone fits two shapes: no target

    offsets = relation_offsets(tokenizer, text, targets)
    relation = 7  # ... circle to the [left] of ...
    assert np.allclose(offsets[0, relation], [-1.0, 0.8])  # the circle's centre minus the square's
    assert np.isfinite(offsets[..., 0]).sum() == 1  # the second caption has no relation word

