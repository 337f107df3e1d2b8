"""Zero-shot colour and shape accuracy on the shapes world (tasks/shapes/zero_shot.py): every shape alone against
the world's colours and kinds, on a tiny model rigged so that the expected shapes are right."""

import numpy as np
import pytest
import torch

from features.store import FeatureStore, FeatureStoreWriter
from tasks.data.tokenization import load_tokenizer
from tasks.errors import DataError
from tasks.ranking.search import embed_images, embed_texts
from tasks.ranking.zero_shot import prompts
from tasks.shapes.world import COLOURS, KINDS, class_id
from tasks.shapes.zero_shot import shape_regions, shapes_zero_shot
from tests.fixtures.rigged import inputs_of, solve_linear
from tests.fixtures.tiny_task_data import write_vocab
from vilbert import ViLBertConfig, ViLBertForPreTraining

MAX_LENGTH = 12


SHAPES = {"a": ["red circle", "red square", "blue triangle"], "b": ["cyan circle", "purple square"]}


def _shapes_store(path, classes=True):
    """Two images whose boxes carry the given shapes-world classes; random 7-d features."""
    rng = np.random.default_rng(0)
    with FeatureStoreWriter(path, feature_dim=7) as writer:
        for image_id, names in SHAPES.items():
            k = len(names)
            boxes = np.asarray([[10 * j, 5, 10 * j + 8, 20] for j in range(k)], np.float32)
            ids = np.asarray([class_id(*n.split()) for n in names], np.int32) if classes else None
            writer.add(image_id, (64, 64), rng.normal(size=(k, 7)).astype(np.float32), boxes, objects_id=ids)
    return FeatureStore(path)


def test_shapes_zero_shot_scores_every_shape_against_the_world_labels(tmp_path):
    words = sorted({*COLOURS, *KINDS, "a", "one", "shape"})
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]))
    tokenizer = load_tokenizer(tmp_path / "tok")
    store = _shapes_store(tmp_path / "shapes.h5")
    torch.manual_seed(1)
    model = ViLBertForPreTraining(ViLBertConfig.from_preset("tiny", v_feature_size=7, vocab_size=40,
                                                            dual_embedding_size=16)).eval()
    templates = {"colour": ["a {} shape.", "one {} shape."], "shape": ["a {}.", "one {}."]}
    colours, kinds = list(COLOURS), list(KINDS)
    # text: colour prompts -> e[colour], shape prompts -> e[6 + kind]
    texts = prompts(colours, templates["colour"]) + prompts(kinds, templates["shape"])
    targets = [i // 2 for i in range(12)] + [6 + i // 2 for i in range(6)]
    eye = torch.eye(16)
    dual = model.vilbert.dual
    solve_linear(dual.text_projection.weight, inputs_of(dual.text_projection,
                                                   lambda: embed_texts(model, tokenizer, texts, MAX_LENGTH)), eye[targets])
    # images: each shape alone -> e[colour] + e[6 + kind]; the blue triangle rigged as a green square (wrong twice)
    truth = [n.split() for names in SHAPES.values() for n in names]
    rigged_as = [("green", "square") if (c, k) == ("blue", "triangle") else (c, k) for c, k in truth]
    visuals, seen_colours, seen_kinds = shape_regions(store, list(SHAPES))
    assert list(zip(seen_colours, seen_kinds, strict=True)) == [tuple(t) for t in truth]
    assert all(v.features.shape == (2, 7) and v.num_boxes == 1 for v in visuals)  # IMG token + the shape
    image_in = inputs_of(dual.vision_projection, lambda: embed_images(model, visuals))
    solve_linear(dual.vision_projection.weight, image_in,
           torch.stack([eye[colours.index(c)] + eye[6 + kinds.index(k)] for c, k in rigged_as]))

    result = shapes_zero_shot(model, tokenizer, store, list(SHAPES), MAX_LENGTH, "dual", templates)
    assert result == pytest.approx({"shapes": 5.0, "colour_accuracy": 80.0, "shape_accuracy": 80.0,
                                    "colour_chance": 40.0, "shape_chance": 40.0})  # 2 red of 5; 2 circles of 5


def test_shapes_zero_shot_needs_the_world_class_ids(tmp_path):
    store = _shapes_store(tmp_path / "plain.h5", classes=False)
    model = ViLBertForPreTraining(ViLBertConfig.from_preset("tiny", v_feature_size=7, dual_embedding_size=8)).eval()
    with pytest.raises(DataError, match="has no class ids .objects_id.; add the shapes world's ground truth"):
        shapes_zero_shot(model, load_tokenizer(write_vocab(tmp_path / "tok")), store, ["a"], MAX_LENGTH)
