"""Co-attention figures: the heat drawn is the model's returned maps; `vilbert predict --attention` end to end."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from features.detectors import DETECTORS
from tasks.cli import main
from tasks.errors import ConfigError
from tasks.figures.attention import (
    CoAttentionView,
    box_heat,
    choose_words,
    coattention_view,
    draw_figure,
    rollout_view,
    save_figure,
)
from tests.fixtures.model_inputs import make_inputs
from tests.fixtures.tiny_checkpoints import save_checkpoint, write_image
from tests.fixtures.tiny_task_data import write_vocab
from vilbert import ViLBertConfig, ViLBertModel

TOKENS = ["[CLS]", "red", "sq", "##uare", "[SEP]"]


@pytest.fixture(autouse=True)
def _tiny_detector_registered(monkeypatch):
    monkeypatch.setitem(DETECTORS, "tiny-test", "tests.fixtures.tiny_detector:build_tiny")


@pytest.fixture(scope="module")
def maps():
    """A tiny model's maps for one text of 5 tokens and 4 rows (IMG + 3 boxes) in a 60x80 image."""
    config = ViLBertConfig.from_preset("tiny")
    model = ViLBertModel(config).eval()
    with torch.no_grad():
        outputs = model(**make_inputs(config, batch=1, length=5, regions=4), output_attentions=True)
    boxes = np.array([[0, 0, 80, 60], [0, 0, 40, 30], [40, 0, 80, 30], [10, 20, 70, 60]], dtype=np.float32)
    return model, outputs, boxes


def test_view_holds_the_last_coattention_layer_head_mean_or_one_head(maps):
    _, outputs, boxes = maps
    view = coattention_view(outputs, TOKENS, boxes)
    np.testing.assert_allclose(view.word_to_region, outputs.text_to_vision_attentions[-1][0].mean(0).numpy(), atol=1e-7)
    np.testing.assert_allclose(view.region_to_word, outputs.vision_to_text_attentions[-1][0].mean(0).numpy(), atol=1e-7)
    head = coattention_view(outputs, TOKENS, boxes, head=3)
    np.testing.assert_array_equal(head.word_to_region, outputs.text_to_vision_attentions[-1][0, 3].numpy())
    assert view.source == "co-attention layer 2/2, mean of 4 heads" and head.source.startswith("co-attention layer 2/2, head 3")
    with pytest.raises(ConfigError, match="--head 4: the co-attention layers have 4 heads"):
        coattention_view(outputs, TOKENS, boxes, head=4)


def test_words_group_pieces_and_their_heat_is_the_mean_of_the_pieces(maps):
    _, outputs, boxes = maps
    view = coattention_view(outputs, TOKENS, boxes)
    words = view.words()
    assert [(w.text, w.positions) for w in words] == [("red", [1]), ("square", [2, 3])]
    np.testing.assert_allclose(view.word_heat(words[1]), view.word_to_region[2:4].mean(0))
    assert [w.text for w in choose_words(view, ["Square"])] == ["square"]
    with pytest.raises(ConfigError, match="'blue' not in the text; its words are red, square"):
        choose_words(view, ["blue"])


def test_box_heat_sums_the_weights_of_covering_boxes():
    boxes = np.array([[0, 0, 4, 2], [2, 0, 6, 4]], dtype=np.float32)
    heat = box_heat((4, 6), boxes, np.array([0.25, 0.5]))
    assert heat[0, 0] == 0.25 and heat[0, 3] == 0.75 and heat[3, 5] == 0.5 and heat[3, 0] == 0


def test_figure_paints_the_returned_maps_and_is_a_non_empty_image(maps, tmp_path):
    _, outputs, boxes = maps
    view = coattention_view(outputs, TOKENS, boxes)
    pixels = np.full((30, 40, 3), 200, dtype=np.uint8)  # a half-size decode of the 60x80 image
    fig = draw_figure(pixels, (60, 80), view, view.words(), title="red square")
    panels = [ax for ax in fig.axes if len(ax.images) == 2]  # the word panels: image + heat
    assert [ax.get_title() for ax in panels] == [f"'red'  (IMG {view.word_to_region[1, 0]:.2f})",
                                                 f"'square'  (IMG {view.word_heat(view.words()[1])[0]:.2f})"]
    painted = np.asarray(panels[0].images[1].get_array())
    expected = box_heat((30, 40), boxes[1:] / 2, outputs.text_to_vision_attentions[-1][0].mean(0)[1, 1:].numpy())
    np.testing.assert_allclose(painted, expected, atol=1e-6)
    (matrix,) = [ax for ax in fig.axes if ax.get_title() == "region -> word"]
    np.testing.assert_allclose(matrix.images[0].get_array(), view.region_to_word)
    out = save_figure(fig, tmp_path / "maps.png", dpi=50)
    with Image.open(out) as image:  # 3 panels of 3.2 in and a colour bar in one row, the matrix below, at 50 dpi
        assert image.format == "PNG" and image.size == (520, 340)
        assert np.asarray(image.convert("L")).std() > 10  # drawn, not blank
    assert [p.name for p in tmp_path.iterdir()] == ["maps.png"]


@pytest.mark.parametrize("words", [1, 3, 9])
def test_nothing_in_the_figure_overlaps(maps, words):
    """Panels, titles, tick labels and both colour bars each keep their own room, whatever the number of words."""
    _, outputs, boxes = maps
    view = coattention_view(outputs, TOKENS, boxes)
    chosen = (view.words() * 9)[:words]
    fig = draw_figure(np.full((30, 40, 3), 200, dtype=np.uint8), (60, 80), view, chosen, title="red square")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    shown = [ax for ax in fig.axes if ax.axison or ax.images]
    assert len([ax for ax in shown if ax.get_label() == "<colorbar>"]) == 2
    extents = [ax.get_tightbbox(renderer) for ax in shown]
    overlaps = [(a.get_title() or a.get_label(), b.get_title() or b.get_label())
                for i, (a, box_a) in enumerate(zip(shown, extents, strict=True))
                for b, box_b in zip(shown[i + 1:], extents[i + 1:], strict=True) if box_a.overlaps(box_b)]
    assert overlaps == []
    fig.clf()


def test_rollout_rows_are_distributions_and_follow_the_schedule(maps):
    model, outputs, boxes = maps
    view = rollout_view(outputs, model.encoder.schedule, TOKENS, boxes)
    np.testing.assert_allclose(view.word_to_region.sum(1), 1, atol=1e-6)
    np.testing.assert_allclose(view.region_to_word.sum(1), 1, atol=1e-6)
    # with a single co-attention step and nothing else, rollout is that layer's head mean
    only = rollout_view(outputs, [("C", 1)], TOKENS, boxes)
    np.testing.assert_allclose(only.word_to_region, outputs.text_to_vision_attentions[1][0].mean(0).numpy(), atol=1e-6)
    assert not np.allclose(view.word_to_region, only.word_to_region)


def test_view_without_words_cannot_be_drawn():
    view = CoAttentionView(["[CLS]", "[SEP]"], np.zeros((2, 4)), np.zeros((2, 2)), np.zeros((2, 2)), "x")
    with pytest.raises(ConfigError, match="no words"):
        draw_figure(np.zeros((4, 4, 3), np.uint8), (4, 4), view, view.words())


def test_predict_attention_writes_the_figure_and_the_raw_maps(tmp_path, capsys):
    save_checkpoint(tmp_path / "ckpt", answers=["red", "blue"], task_specific_tokens=True)
    image = write_image(tmp_path / "a.png", (40, 50), seed=3)
    capsys.readouterr()
    common = ["predict", "--checkpoint", str(tmp_path / "ckpt"), "--image", str(image), "--random-detector",
              "--device", "cpu", "--tokenizer", str(write_vocab(tmp_path / "tok")), "--detector", "tiny-test",
              "--question", "what color is the ball"]
    assert main([*common, "--json", "--attention", str(tmp_path / "fig.png"), "--attention-json",
                 str(tmp_path / "maps.json"), "--words", "color", "ball"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["attention"] == str(tmp_path / "fig.png") and result["attention_json"] == str(tmp_path / "maps.json")
    raw = json.loads((tmp_path / "maps.json").read_text())
    assert raw["tokens"] == ["[CLS]", "[TASK]", "what", "color", "is", "the", "ball", "[SEP]"]
    assert len(raw["region_boxes"]) == 3  # IMG + the tiny detector's two boxes
    assert np.asarray(raw["text_to_vision_attentions"]).shape == (2, 4, 8, 3)  # layers, heads, words, regions
    assert np.asarray(raw["text_attentions"]).shape == (3, 4, 8, 8)
    np.testing.assert_allclose(np.asarray(raw["vision_to_text_attentions"]).sum(-1), 1, atol=1e-5)
    with Image.open(tmp_path / "fig.png") as figure:
        assert figure.size[0] > 200 and np.asarray(figure.convert("L")).std() > 10
    assert main([*common, "--attention", str(tmp_path / "r.png"), "--rollout"]) == 0
    assert "attention -> " in capsys.readouterr().out and (tmp_path / "r.png").is_file()
    for bad, message in ((["--attention", str(tmp_path / "x.png"), "--words", "dog"], "'dog' not in the text"),
                         (["--words", "ball"], "add --attention"),
                         (["--attention", str(tmp_path / "x.png"), "--head", "9"], "--head 9")):
        assert main([*common, *bad]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
