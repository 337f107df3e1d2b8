"""output_attentions=True: every layer's attention probabilities, from an explicit softmax that leaves outputs unchanged."""

import pytest
import torch
from test_model import make_inputs

from vilbert import AttentionMaps, ViLBertConfig, ViLBertForPreTraining, ViLBertForVLTasks, ViLBertModel
from vilbert.errors import ConfigError

MAP_FIELDS = ("text_attentions", "vision_attentions", "text_to_vision_attentions", "vision_to_text_attentions")


@pytest.fixture
def tiny():
    return ViLBertConfig.from_preset("tiny")


def _padded_inputs(config):
    """Batch of 2, length 6, 5 regions; row 1 pads its last 2 words and last 2 regions."""
    inputs = make_inputs(config, batch=2, length=6, regions=5)
    inputs["attention_mask"][1, 4:] = 0
    inputs["region_mask"][1, 3:] = 0
    return inputs


def test_maps_have_one_entry_per_layer_with_the_documented_shapes(tiny):
    model = ViLBertModel(tiny).eval()
    with torch.no_grad():
        out = model(**_padded_inputs(tiny), output_attentions=True)
    assert len(out.text_attentions) == tiny.num_hidden_layers == 3
    assert len(out.vision_attentions) == tiny.v_num_hidden_layers == 2
    assert len(out.text_to_vision_attentions) == len(out.vision_to_text_attentions) == 2
    assert all(m.shape == (2, 4, 6, 6) for m in out.text_attentions)
    assert all(m.shape == (2, 2, 5, 5) for m in out.vision_attentions)
    assert all(m.shape == (2, 4, 6, 5) for m in out.text_to_vision_attentions)  # words over regions
    assert all(m.shape == (2, 4, 5, 6) for m in out.vision_to_text_attentions)  # regions over words


def test_maps_sum_to_one_over_keys_and_give_masked_keys_zero(tiny):
    model = ViLBertModel(tiny).eval()
    with torch.no_grad():
        out = model(**_padded_inputs(tiny), output_attentions=True)
    for name in MAP_FIELDS:
        for probs in getattr(out, name):
            torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]), atol=1e-6, rtol=0)
            assert (probs >= 0).all()
    # row 1: keys that are padded words or padded regions get exactly zero
    for probs in out.text_attentions + out.vision_to_text_attentions:
        assert torch.all(probs[1, ..., 4:] == 0) and torch.all(probs[0] > 0)
    for probs in out.vision_attentions + out.text_to_vision_attentions:
        assert torch.all(probs[1, ..., 3:] == 0) and torch.all(probs[0] > 0)


@pytest.mark.parametrize("cls", [ViLBertForVLTasks, ViLBertForPreTraining])
def test_outputs_agree_with_and_without_maps(cls, tiny):
    model = cls(tiny).eval()
    inputs = _padded_inputs(tiny)
    with torch.no_grad():
        plain, mapped = model(**inputs), model(**inputs, output_attentions=True)
    assert all(getattr(plain, name) is None for name in MAP_FIELDS)
    assert all(len(getattr(mapped, name)) > 0 for name in MAP_FIELDS)
    compared = [k for k in plain.keys() if k not in MAP_FIELDS]
    assert {"text_hidden", "vision_hidden", "pooled_text", "pooled_vision"} <= set(compared)
    for name in compared:
        torch.testing.assert_close(mapped[name], plain[name], atol=1e-6, rtol=0, msg=name)


def test_map_is_the_softmax_of_the_layers_scores(tiny):
    """The first text layer's map, recomputed by hand from the embeddings that entered it."""
    model = ViLBertModel(tiny).eval()
    inputs = _padded_inputs(tiny)
    entered = {}
    layer = model.encoder.text_layers[0]
    layer.register_forward_pre_hook(lambda module, args: entered.update(x=args[0]))
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
        x = entered["x"]
        heads, dim = tiny.num_attention_heads, tiny.hidden_size // tiny.num_attention_heads
        q = layer.attention.query(x).view(2, 6, heads, dim).transpose(1, 2)
        k = layer.attention.key(x).view(2, 6, heads, dim).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / dim**0.5 + (1 - inputs["attention_mask"][:, None, None, :]) * -10000.0
    torch.testing.assert_close(out.text_attentions[0], torch.softmax(scores, -1), atol=1e-6, rtol=0)


def test_config_output_attentions_is_the_default(tiny):
    tiny.output_attentions = True
    model = ViLBertModel(tiny).eval()
    with torch.no_grad():
        assert len(model(**make_inputs(tiny)).text_attentions) == 3
        assert model(**make_inputs(tiny), output_attentions=False).text_attentions is None


def test_text_prefix_maps_go_to_the_given_collector(tiny):
    model = ViLBertModel(tiny).eval()
    inputs = make_inputs(tiny, batch=1)
    with torch.no_grad():
        full = model(**inputs, output_attentions=True)
        maps = AttentionMaps()
        prefix = model.encode_text_prefix(inputs["input_ids"], inputs["attention_mask"], attentions=maps)
        with pytest.raises(ConfigError, match="output_attentions"):
            model(region_features=inputs["region_features"], region_locations=inputs["region_locations"],
                  text_prefix=prefix, output_attentions=True)
    assert len(maps.text) == model.encoder.num_prefix_steps == 1
    torch.testing.assert_close(maps.text[0], full.text_attentions[0], atol=1e-6, rtol=0)
