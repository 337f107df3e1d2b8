"""bench/geometry_pretraining.py and bench/location_pathway.py: the relation sentences turned around state the same
fact, and the pathway check's labels say which of A and B lies left, whichever order they are stored in."""

import json

import torch

from bench.geometry_pretraining import write_balanced_captions
from bench.location_pathway import BATCH, relation_batch
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
