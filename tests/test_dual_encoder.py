"""The dual encoder: each stream alone, projected and normalised; the co-attention forward untouched; InfoNCE."""

import logging
import math

import pytest
import torch
import torch.multiprocessing as mp
from contrastive_ranks import loss_and_grads, rank_worker, toy_problem
from test_model import make_inputs

from tasks.ranking.contrastive import contrastive_loss
from vilbert import ViLBertConfig, ViLBertForPreTraining, ViLBertForVLTasks, ViLBertModel
from vilbert.errors import ConfigError


def dual_config(**overrides):
    return ViLBertConfig.from_preset("tiny", dual_embedding_size=8, **overrides)


def test_embeddings_are_unit_length_and_each_stream_ignores_the_other():
    model = ViLBertModel(dual_config()).eval()
    inputs = make_inputs(model.config, batch=3)
    other = make_inputs(model.config, batch=3, seed=1)
    with torch.no_grad():
        out = model(**inputs, dual=True)
        swapped_regions = model(**{**inputs, **{k: other[k] for k in ("region_features", "region_locations")}},
                                dual=True)
        swapped_text = model(**{**inputs, "input_ids": other["input_ids"]}, dual=True)
        text = model.encode_text(inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"])
        image = model.encode_image(inputs["region_features"], inputs["region_locations"], inputs["region_mask"])
    assert out.text_embeds.shape == (3, 8) and out.image_embeds.shape == (3, 8)
    torch.testing.assert_close(out.text_embeds.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out.text_embeds, text)  # the forward's shared prefix gives encode_text's result
    torch.testing.assert_close(out.image_embeds, image)
    torch.testing.assert_close(swapped_regions.text_embeds, out.text_embeds, rtol=0, atol=0)
    torch.testing.assert_close(swapped_text.image_embeds, out.image_embeds, rtol=0, atol=0)
    assert not torch.allclose(swapped_regions.image_embeds, out.image_embeds)
    assert out.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-5)


def test_padding_does_not_change_the_embeddings():
    model = ViLBertModel(dual_config()).eval()
    inputs = make_inputs(model.config, batch=1, length=5, regions=4)
    ids = torch.cat([inputs["input_ids"], torch.zeros(1, 3, dtype=torch.long)], dim=1)
    mask = torch.cat([inputs["attention_mask"], torch.zeros(1, 3, dtype=torch.long)], dim=1)
    features = torch.cat([inputs["region_features"], torch.randn(1, 2, 16)], dim=1)
    locations = torch.cat([inputs["region_locations"], torch.rand(1, 2, 5)], dim=1)
    region_mask = torch.cat([inputs["region_mask"], torch.zeros(1, 2)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(ids, mask), model.encode_text(inputs["input_ids"]), atol=1e-5,
                                   rtol=0)
        torch.testing.assert_close(model.encode_image(features, locations, region_mask),
                                   model.encode_image(inputs["region_features"], inputs["region_locations"]),
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize(("mode", "expected_text", "expected_vision"), [
    ("skip", ["T0", "T1", "T2"], ["V0", "V1"]),
    ("self", ["T0", "C0", "T1", "C1", "T2"], ["C0", "V0", "C1", "V1"]),
])
def test_dual_runs_each_stream_alone_in_schedule_order(mode, expected_text, expected_vision):
    model = ViLBertModel(dual_config(dual_coattention=mode)).eval()
    encoder, trace = model.encoder, []
    for letter, layers in (("T", encoder.text_layers), ("V", encoder.vision_layers)):
        for i, layer in enumerate(layers):
            layer.register_forward_hook(lambda *_, name=f"{letter}{i}": trace.append(name))
    for i, layer in enumerate(encoder.coattention_layers):
        layer.coattention.register_forward_hook(lambda *_: trace.append("cross"))  # never the cross-attention
        layer.text_ffn.register_forward_hook(lambda *_, name=f"C{i}": trace.append(name))
        layer.vision_ffn.register_forward_hook(lambda *_, name=f"C{i}": trace.append(name))
    inputs = make_inputs(model.config)
    with torch.no_grad():
        model.encode_text(inputs["input_ids"])
        text_trace, trace[:] = list(trace), []
        model.encode_image(inputs["region_features"], inputs["region_locations"])
    assert text_trace == expected_text and trace == expected_vision


def test_coattention_forward_is_unchanged_by_the_dual_encoder():
    plain = ViLBertForVLTasks(ViLBertConfig.from_preset("tiny")).eval()
    dual = ViLBertForVLTasks(dual_config()).eval()
    result = dual.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["vilbert.dual.logit_scale", "vilbert.dual.text_projection.weight",
                                           "vilbert.dual.vision_projection.weight"]
    inputs = make_inputs(plain.config)
    with torch.no_grad():
        a, b = plain(**inputs), dual(**inputs, dual=True)
    for key in ("pair_logit", "answer_logits", "text_hidden", "vision_hidden"):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_a_model_without_dual_encoder_says_how_to_get_one():
    model = ViLBertForPreTraining(ViLBertConfig.from_preset("tiny"))
    assert model.vilbert.dual is None
    with pytest.raises(ConfigError, match="dual_embedding_size: 0"):
        model.encode_text(torch.ones(1, 3, dtype=torch.long))


def test_old_checkpoint_loads_with_a_fresh_dual_encoder(tmp_path):
    ViLBertForPreTraining(ViLBertConfig.from_preset("tiny")).save_pretrained(tmp_path)
    model = ViLBertForPreTraining.from_pretrained(tmp_path, dual_embedding_size=8)
    assert model.vilbert.dual.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert model.vilbert.dual.text_projection.weight.std().item() == pytest.approx(0.02, rel=0.3)
    model.save_pretrained(tmp_path / "again")
    again = ViLBertForPreTraining.from_pretrained(tmp_path / "again")
    assert torch.equal(again.vilbert.dual.text_projection.weight, model.vilbert.dual.text_projection.weight)


def test_reference_export_and_import_treat_the_dual_encoder_as_ours_only(tmp_path, caplog):
    from vilbert.convert import export_reference_state_dict, load_reference_checkpoint

    plain = ViLBertForPreTraining(ViLBertConfig.from_preset("tiny"))
    dual = ViLBertForPreTraining(dual_config())
    exported = export_reference_state_dict(dual)
    assert set(exported) == set(export_reference_state_dict(plain))
    torch.save(exported, tmp_path / "ref.bin")
    with caplog.at_level(logging.INFO, logger="vilbert.convert"):
        loaded = load_reference_checkpoint(tmp_path / "ref.bin", config=dual_config())
    assert loaded.vilbert.dual is not None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "dual" in r.getMessage()]
    assert any("initialised fresh" in r.getMessage() and "vilbert.dual.logit_scale" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize(("overrides", "field"), [
    ({"dual_embedding_size": -1}, "dual_embedding_size"),
    ({"dual_coattention": "cross"}, "dual_coattention"),
    ({"dual_temperature": 0.0}, "dual_temperature"),
])
def test_invalid_dual_fields_fail_naming_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        ViLBertConfig.from_preset("tiny", **overrides)


# ------------------------------------------------------------------------------------------------------- InfoNCE


def _ce(logits, target):
    return -logits[target] + math.log(sum(math.exp(v) for v in logits))


def test_info_nce_equals_the_hand_computed_3x3_case():
    text = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    image = torch.tensor([[1.0, 0, 0], [0.6, 0.8, 0], [0, 0, 1.0]])
    # similarities text·image: [[1, .6, 0], [0, .8, 0], [0, 0, 1]], times the scale 2
    text_to_image = [_ce([2.0, 1.2, 0.0], 0), _ce([0.0, 1.6, 0.0], 1), _ce([0.0, 0.0, 2.0], 2)]
    image_to_text = [_ce([2.0, 0.0, 0.0], 0), _ce([1.2, 1.6, 0.0], 1), _ce([0.0, 0.0, 2.0], 2)]
    expected = (sum(text_to_image) / 3 + sum(image_to_text) / 3) / 2
    assert contrastive_loss(text, image, torch.tensor(2.0)).item() == pytest.approx(expected, rel=1e-6)
    # an excluded row is neither a query nor a negative: the 2x2 problem of the other rows
    valid = torch.tensor([True, False, True])
    two = ([_ce([2.0, 0.0], 0), _ce([0.0, 2.0], 1)], [_ce([2.0, 0.0], 0), _ce([0.0, 2.0], 1)])
    assert contrastive_loss(text, image, torch.tensor(2.0), valid).item() == pytest.approx(
        (sum(two[0]) / 2 + sum(two[1]) / 2) / 2, rel=1e-5)


def test_two_gloo_ranks_give_the_single_process_loss_and_gradients(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(rank_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    loss, grads = loss_and_grads(*toy_problem())
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert result["loss"].item() == pytest.approx(loss.item(), rel=1e-6)
        for got, want in zip(result["grads"], grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
