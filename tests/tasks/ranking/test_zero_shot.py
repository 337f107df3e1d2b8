"""Zero-shot classification: `vilbert classify` by the dual encoder and by co-attention, and the shapes-world
colour / shape accuracy. The tiny models are rigged: their last linear layers are solved (least squares on the
features the real inputs produce) so that the right label must win, through every step the command takes."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from features.detectors import DETECTORS
from features.images import read_image
from features.store import FeatureStore, FeatureStoreWriter
from tasks.cli import main
from tasks.data.regions import visual_input
from tasks.data.tokenization import load_tokenizer
from tasks.engine.run_record import write_run_record
from tasks.ranking.search import embed_images, embed_texts
from tasks.ranking.zero_shot import label_embeddings, prompts, zero_shot_scores
from tasks.runners.predict import detect_regions
from tasks.shapes.world import COLOURS, KINDS, class_id
from tasks.shapes.zero_shot import shape_regions, shapes_zero_shot
from tests.fixtures.tiny_detector import TinyDetector
from tests.fixtures.tiny_task_data import write_vocab
from vilbert import ViLBertConfig, ViLBertForPreTraining

LABELS = ["red", "blue", "green"]
TEMPLATES = ["a photo of a {}.", "a {} ball."]
MAX_LENGTH = 12
MAX_REGIONS = 36  # the retrieval task's default: what classify uses for a checkpoint without a run config


@pytest.fixture(autouse=True)
def _tiny_detector_registered(monkeypatch):
    monkeypatch.setitem(DETECTORS, "tiny-test", "tests.fixtures.tiny_detector:build_tiny")


def _inputs_of(module: torch.nn.Module, run) -> torch.Tensor:
    """The inputs [N, W] that `module` sees while `run()` runs (eval mode, so dropout is the identity)."""
    seen = []
    handle = module.register_forward_hook(lambda _m, args, _out: seen.append(args[0].detach().reshape(-1, args[0].shape[-1])))
    try:
        run()
    finally:
        handle.remove()
    return torch.cat(seen)


def _solve(weight: torch.nn.Parameter, inputs: torch.Tensor, targets: torch.Tensor) -> None:
    """Set a bias-free linear layer so that inputs [N, W] map exactly onto targets [N, E] (N <= W)."""
    with torch.no_grad():
        weight.copy_((torch.linalg.pinv(inputs.double()) @ targets.double()).T.float())


def _image(path, rgb, hw=(40, 50)):
    Image.fromarray(np.full((*hw, 3), rgb, np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def rigged(tmp_path_factory):
    """A tiny pretraining checkpoint whose dual encoder and alignment head put each colour image with its word."""
    tmp = tmp_path_factory.mktemp("zero_shot")
    tokenizer = load_tokenizer(write_vocab(tmp / "tok"))
    images = {"red": _image(tmp / "red.png", (220, 40, 40)), "blue": _image(tmp / "blue.png", (40, 80, 220))}
    torch.manual_seed(0)
    model = ViLBertForPreTraining(ViLBertConfig.from_preset("tiny", v_feature_size=7, dual_embedding_size=8)).eval()
    visuals = [visual_input(detect_regions(TinyDetector(), read_image(path), None), MAX_REGIONS)
               for path in images.values()]
    texts = prompts(LABELS, TEMPLATES)  # label-major: LABELS[i // 2]
    dual = model.vilbert.dual
    eye = torch.eye(8)
    text_in = _inputs_of(dual.text_projection, lambda: embed_texts(model, tokenizer, texts, MAX_LENGTH))
    _solve(dual.text_projection.weight, text_in, eye[[i // len(TEMPLATES) for i in range(len(texts))]])
    image_in = _inputs_of(dual.vision_projection, lambda: embed_images(model, visuals))
    _solve(dual.vision_projection.weight, image_in, eye[[LABELS.index(c) for c in images]])
    # alignment head: logit 0 (aligned) - logit 1 = +4 for the image's colour, -4 for the others
    fused = _inputs_of(model.alignment_head, lambda: zero_shot_scores(model, tokenizer, visuals, LABELS, TEMPLATES,
                                                                      MAX_LENGTH, "alignment"))
    match = torch.tensor([4.0 if LABELS[p // len(TEMPLATES)] == colour else -4.0
                          for colour in images for p in range(len(texts))])
    with torch.no_grad():
        model.alignment_head.weight[1].zero_()
        model.alignment_head.bias.zero_()
        model.alignment_head.weight[0].copy_((torch.linalg.pinv(fused.double()) @ match.double()).float())
    model.save_pretrained(tmp / "ckpt")
    shutil.copy(tmp / "tok" / "vocab.txt", tmp / "ckpt" / "vocab.txt")
    write_run_record(tmp / "ckpt", {"task": "retrieval", "task_token": None, "architecture": "pretraining",
                                    "feature_extractor": [{"detector": "tiny-test"}]})
    return {"tmp": tmp, "images": images, "model": model, "tokenizer": tokenizer}


def _classify(capsys, checkpoint, image, *args):
    capsys.readouterr()
    code = main(["classify", "--checkpoint", str(checkpoint), "--image", str(image), "--random-detector",
                 "--device", "cpu", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("scorer", ["dual", "alignment"])
def test_classify_puts_the_true_colour_first_by_either_scorer(rigged, capsys, scorer):
    templates = [a for t in TEMPLATES for a in ("--template", t)]
    for colour, image in rigged["images"].items():
        code, out, err = _classify(capsys, rigged["tmp"] / "ckpt", image, "--labels", "red, blue,green",
                                   "--scorer", scorer, "--json", *templates)
        assert code == 0, err
        result = json.loads(out)
        assert result["detector"] == "tiny-test" and result["templates"] == TEMPLATES
        ranked = result["labels"]
        assert sorted(r["label"] for r in ranked) == sorted(LABELS) and ranked[0]["label"] == colour
        assert [r["score"] for r in ranked] == sorted((r["score"] for r in ranked), reverse=True)
        if scorer == "dual":  # cosine 1 with its label, 0 with the others, times the logit scale
            scale = float(rigged["model"].vilbert.dual.scale().detach())
            assert ranked[0]["score"] == pytest.approx(scale, rel=1e-3)
            assert [r["score"] for r in ranked[1:]] == pytest.approx([0.0, 0.0], abs=1e-3)
            assert sum(r["probability"] for r in ranked) == pytest.approx(1.0, abs=1e-5)
        else:  # P(aligned) ~ sigmoid(±4) = 0.982 / 0.018 for every template (rigged at 12 tokens), averaged
            assert ranked[0]["score"] > 0.95 and all(r["score"] < 0.05 for r in ranked[1:])
            assert "probability" not in ranked[0]
    code, out, _ = _classify(capsys, rigged["tmp"] / "ckpt", rigged["images"]["red"], "--labels", "red,blue",
                             "--scorer", scorer, *templates, "--top", "1")
    assert code == 0 and "red" in out and "blue" not in out.split("\n", 1)[1]


def test_prompt_ensemble_is_the_renormalised_mean_of_the_template_embeddings(rigged):
    model, tokenizer = rigged["model"], rigged["tokenizer"]
    templates = ["a photo of a {}.", "a {} ball.", "two {} dogs."]
    each = embed_texts(model, tokenizer, prompts(["red", "green"], templates), MAX_LENGTH).view(2, 3, -1)
    ensembled = label_embeddings(model, tokenizer, ["red", "green"], templates, MAX_LENGTH)
    torch.testing.assert_close(ensembled, torch.nn.functional.normalize(each.mean(1), dim=-1))
    torch.testing.assert_close(ensembled.norm(dim=1), torch.ones(2))


@pytest.mark.parametrize("args, expected", [
    (["--labels", ""], "--labels: no labels"),
    (["--labels", "red,,blue"], "an empty label (label 2)"),
    (["--labels", "red,blue,red"], "label 'red' is given twice"),
    (["--labels", "red"], "classification needs at least two"),
    (["--labels", "red,blue", "--template", "a photo"], "needs exactly one {} where the label goes (it has 0)"),
    (["--labels", "red,blue", "--template", "a {} and a {}"], "(it has 2)"),
    (["--labels", "red,blue", "--top", "0"], "--top must be >= 1"),
    (["--labels", "red,blue", "no-dual"], "has no dual encoder"),
    (["--labels", "red,blue", "--boxes", "b.json"], "--boxes needs --box-format"),
])
def test_bad_input_is_one_error_line_and_exit_2(rigged, tmp_path, capsys, args, expected):
    checkpoint = rigged["tmp"] / "ckpt"
    if "no-dual" in args:
        args = [a for a in args if a != "no-dual"]
        checkpoint = tmp_path / "plain"
        ViLBertForPreTraining(ViLBertConfig.from_preset("tiny", v_feature_size=7)).save_pretrained(checkpoint)
    code, _, err = _classify(capsys, checkpoint, rigged["images"]["red"], *args)
    lines = err.strip().splitlines()
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("vilbert classify: error:") and expected in lines[0], lines


# ------------------------------------------------------------------------------------------------- shapes world

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
    _solve(dual.text_projection.weight, _inputs_of(dual.text_projection,
                                                   lambda: embed_texts(model, tokenizer, texts, MAX_LENGTH)), eye[targets])
    # images: each shape alone -> e[colour] + e[6 + kind]; the blue triangle rigged as a green square (wrong twice)
    truth = [n.split() for names in SHAPES.values() for n in names]
    rigged_as = [("green", "square") if (c, k) == ("blue", "triangle") else (c, k) for c, k in truth]
    visuals, seen_colours, seen_kinds = shape_regions(store, list(SHAPES))
    assert list(zip(seen_colours, seen_kinds, strict=True)) == [tuple(t) for t in truth]
    assert all(v.features.shape == (2, 7) and v.num_boxes == 1 for v in visuals)  # IMG token + the shape
    image_in = _inputs_of(dual.vision_projection, lambda: embed_images(model, visuals))
    _solve(dual.vision_projection.weight, image_in,
           torch.stack([eye[colours.index(c)] + eye[6 + kinds.index(k)] for c, k in rigged_as]))

    result = shapes_zero_shot(model, tokenizer, store, list(SHAPES), MAX_LENGTH, "dual", templates)
    assert result == pytest.approx({"shapes": 5.0, "colour_accuracy": 80.0, "shape_accuracy": 80.0,
                                    "colour_chance": 40.0, "shape_chance": 40.0})  # 2 red of 5; 2 circles of 5


def test_shapes_zero_shot_needs_the_world_class_ids(tmp_path):
    from tasks.errors import DataError

    store = _shapes_store(tmp_path / "plain.h5", classes=False)
    model = ViLBertForPreTraining(ViLBertConfig.from_preset("tiny", v_feature_size=7, dual_embedding_size=8)).eval()
    with pytest.raises(DataError, match="has no class ids .objects_id.; add the shapes world's ground truth"):
        shapes_zero_shot(model, load_tokenizer(write_vocab(tmp_path / "tok")), store, ["a"], MAX_LENGTH)
