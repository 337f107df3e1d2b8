"""tasks.shapes.grounded_captions: a false caption changes one attribute to one the image lacks, and relation
sentences turned around state the same fact. (The files themselves: tests/shapes/test_tasks.py.)"""

import numpy as np

from tasks.shapes.grounded_captions import PHRASE, false_attribute, turned_around
from tasks.shapes.world import COLOURS, Shape


def test_a_false_attribute_names_a_shape_or_colour_the_image_does_not_have():
    shapes = [Shape("red", "circle", "small", (0, 0, 0), (0.0, 0.0), 1.0, 0.0, (0, 0, 1, 1)),
              Shape("blue", "square", "large", (0, 0, 0), (0.0, 0.0), 1.0, 0.0, (0, 0, 1, 1)),
              Shape("red", "square", "large", (0, 0, 0), (0.0, 0.0), 1.0, 0.0, (0, 0, 1, 1))]
    present = {(s.size, s.colour, s.kind) for s in shapes}
    listing = "from left to right: a small red circle, a large blue square and a large red square."
    seen = set()
    for seed in range(60):
        false = false_attribute(listing, shapes, np.random.default_rng(seed))
        changed = [p for p in PHRASE.findall(false) if p not in present]
        assert len(changed) == 1 and false.count(" a ") == listing.count(" a "), false
        seen.add(changed[0])
    assert len(seen) > 5  # colours and kinds of all three phrases
    counts = false_attribute("one blue shape and two red shapes.", shapes, np.random.default_rng(0))
    assert {c for c in ("red", "blue") if c in counts} != {"red", "blue"}
    assert len({c for c in COLOURS if f" {c} " in f" {counts}"} - {"red", "blue"}) == 1  # a colour the image lacks
    assert false_attribute("there are three shapes: one circle and two squares.", shapes, np.random.default_rng(0)) is None


def test_a_turned_relation_sentence_names_the_other_shape_first_with_the_opposite_word():
    text = "a small red circle to the left of a large blue square."
    turned = {turned_around(text, np.random.default_rng(seed)) for seed in range(20)}
    assert turned == {text, "a large blue square to the right of a small red circle."}
    assert turned_around("one red shape.", np.random.default_rng(0)) == "one red shape."
