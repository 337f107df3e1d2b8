"""Zero-shot classification: `vilbert classify` by the dual encoder and by co-attention. The tiny models are rigged:
their last linear layers are solved (least squares on the
features the real inputs produce) so that the right label must win, through every step the command takes."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from features.detectors import DETECTORS
from features.images import read_image
from tasks.cli import main
from tasks.data.regions import visual_input
from tasks.data.tokenization import load_tokenizer
from tasks.engine.run_record import write_run_record
from tasks.ranking.search import embed_images, embed_texts
from tasks.ranking.zero_shot import label_embeddings, prompts, zero_shot_scores
from tasks.runners.predict import detect_regions
from tests.fixtures.rigged import inputs_of, solve_linear
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
    text_in = inputs_of(dual.text_projection, lambda: embed_texts(model, tokenizer, texts, MAX_LENGTH))
    solve_linear(dual.text_projection.weight, text_in, eye[[i // len(TEMPLATES) for i in range(len(texts))]])
    image_in = inputs_of(dual.vision_projection, lambda: embed_images(model, visuals))
    solve_linear(dual.vision_projection.weight, image_in, eye[[LABELS.index(c) for c in images]])
    # alignment head: logit 0 (aligned) - logit 1 = +4 for the image's colour, -4 for the others
    fused = inputs_of(model.alignment_head, lambda: zero_shot_scores(model, tokenizer, visuals, LABELS, TEMPLATES,
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
