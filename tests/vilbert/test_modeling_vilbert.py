"""The ViLBERT model on tiny configs: layer order, masks, heads, losses, task token, text prefix, save/load; attention
maps (output_attentions=True, from an explicit softmax that leaves outputs unchanged); the dual encoder (each stream
alone, projected and normalised, the co-attention forward untouched)."""

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel

from tests.fixtures.model_inputs import make_inputs
from vilbert import (
    VL_HEADS,
    AttentionMaps,
    ViLBertConfig,
    ViLBertForPreTraining,
    ViLBertForVLTasks,
    ViLBertModel,
)
from vilbert.errors import ConfigError


@pytest.fixture
def tiny():
    return ViLBertConfig.from_preset("tiny")


# ---------------------------------------------------------------------------------------------------- encoder order

REFERENCE_ORDER = {  # traced from the reference classes
    "2layer": [f"T{i}" for i in range(10)] + ["C0", "T10", "V0", "C1", "V1", "T11"],
    "4layer": [f"T{i}" for i in range(8)] + ["C0", "T8", "V0", "C1", "T9", "V1", "C2", "T10", "V2", "C3", "V3", "T11"],
    "6layer": [f"T{i}" for i in range(6)]
    + "C0 T6 V0 C1 T7 V1 C2 T8 V2 C3 T9 V3 C4 T10 V4 C5 V5 T11".split(),
    "8layer": [f"T{i}" for i in range(4)]
    + "C0 T4 V0 C1 T5 V1 C2 T6 V2 C3 T7 V3 C4 T8 V4 C5 T9 V5 C6 T10 V6 C7 V7 T11".split(),
}


@pytest.mark.parametrize("preset", sorted(REFERENCE_ORDER))
def test_encoder_runs_layers_in_reference_order(preset):
    narrow = dict(
        vocab_size=50, hidden_size=8, num_attention_heads=2, intermediate_size=8, v_feature_size=4, v_hidden_size=8,
        v_num_attention_heads=2, v_intermediate_size=8, bi_hidden_size=8, bi_num_attention_heads=2, v_target_size=3,
        num_labels=3, gqa_num_labels=3,
    )
    config = ViLBertConfig.from_preset(preset, **narrow)
    model = ViLBertModel(config).eval()
    trace = []
    encoder = model.encoder
    for letter, layers in (("T", encoder.text_layers), ("V", encoder.vision_layers), ("C", encoder.coattention_layers)):
        for i, layer in enumerate(layers):
            layer.register_forward_hook(lambda *_, name=f"{letter}{i}": trace.append(name))
    with torch.no_grad():
        model(**make_inputs(config, length=4, regions=3))
    assert trace == REFERENCE_ORDER[preset]


# ---------------------------------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"v_biattention_id": [0, 1], "t_biattention_id": [2]}, "v_biattention_id / t_biattention_id"),
        ({"t_biattention_id": [1, 4]}, "t_biattention_id"),  # 3 text layers
        ({"v_biattention_id": [1, 1]}, "v_biattention_id"),
        ({"hidden_size": 30}, "hidden_size"),
        ({"bi_num_attention_heads": 5}, "bi_hidden_size"),
        ({"fusion_method": "concat"}, "fusion_method"),
        ({"fixed_t_layer": 2}, "fixed_t_layer"),
    ],
)
def test_invalid_config_fails_naming_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        ViLBertConfig.from_preset("tiny", **overrides)


def test_presets_have_the_reference_shapes():
    base = ViLBertConfig.from_preset("base")
    assert (base.hidden_size, base.v_hidden_size, base.v_intermediate_size, base.bi_hidden_size) == (768, 1024, 1024, 1024)
    assert base.t_biattention_id == [6, 7, 8, 9, 10, 11] and base.num_labels == 3129 and base.v_target_size == 1601
    embedded = ViLBertConfig.from_preset("embedded")
    assert (embedded.hidden_size, embedded.num_hidden_layers, embedded.num_attention_heads) == (384, 6, 12)
    assert (embedded.v_feature_size, embedded.v_target_size) == (96, 19)
    with pytest.raises(ConfigError, match="preset"):
        ViLBertConfig.from_preset("huge")


def test_init_follows_the_reference(tiny):
    model = ViLBertForVLTasks(tiny)
    words = model.vilbert.embeddings.word_embeddings.weight
    assert abs(words.std().item() - 0.02) < 0.003 and words[0].abs().sum() > 0  # padding row drawn too
    layer = model.vilbert.encoder.text_layers[0]
    assert torch.all(layer.attention.query.bias == 0) and torch.all(layer.attention_output.layer_norm.weight == 1)
    assert torch.all(model.mlm_head.bias == 0)


# ---------------------------------------------------------------------------------------------------- masks


def test_padding_does_not_change_real_outputs(tiny):
    model = ViLBertForVLTasks(tiny).eval()
    real = make_inputs(tiny, batch=2, length=5, regions=4)
    real["attention_mask"][1, 3:] = 0  # row 1 already has padding
    padded = make_inputs(tiny, batch=2, length=9, regions=7, seed=1)
    padded["input_ids"][:, :5] = real["input_ids"]
    padded["attention_mask"][:, :5] = real["attention_mask"]
    padded["attention_mask"][:, 5:] = 0
    padded["region_features"][:, :4] = real["region_features"]
    padded["region_locations"][:, :4] = real["region_locations"]
    padded["region_mask"][:, 4:] = 0
    with torch.no_grad():
        a, b = model(**real), model(**padded)
    for name in ("pooled_text", "pooled_vision", "answer_logits", "gqa_answer_logits", "pair_logit", "tri_logits",
                 "binary_logits"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), atol=1e-6, rtol=0)
    torch.testing.assert_close(b.text_hidden[:, :5], a.text_hidden, atol=1e-6, rtol=0)
    torch.testing.assert_close(b.vision_hidden[:, :4], a.vision_hidden, atol=1e-6, rtol=0)
    torch.testing.assert_close(b.region_logits[:, :4], a.region_logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(b.token_logits[:, :5], a.token_logits, atol=1e-6, rtol=0)
    assert torch.all(b.region_logits[:, 4:] < -9000)


# ---------------------------------------------------------------------------------------------------- heads


def test_task_heads_have_the_documented_shapes(tiny):
    model = ViLBertForVLTasks(tiny).eval()
    with torch.no_grad():
        out = model(**make_inputs(tiny, batch=4, length=6, regions=5))
    assert out.answer_logits.shape == (4, 10) and out.gqa_answer_logits.shape == (4, 11)
    assert out.pair_logit.shape == (4,) and out.tri_logits.shape == (4, 3) and out.binary_logits.shape == (2, 2)
    assert out.region_logits.shape == (4, 5) and out.token_logits.shape == (4, 6)
    assert out.region_class_logits.shape == (4, 5, 7)
    # binary pairs consecutive rows: [fused(0) | fused(1)]
    fused = out.pooled_text * out.pooled_vision
    torch.testing.assert_close(out.binary_logits[1], model.binary_head(torch.cat([fused[2], fused[3]])))


def test_heads_argument_computes_only_the_named_heads(tiny):
    model = ViLBertForVLTasks(tiny).eval()
    with torch.no_grad():
        out = model(**make_inputs(tiny, batch=3), heads=["region_logits", "binary_logits"])
    assert out.region_logits is not None and out.answer_logits is None and out.region_class_logits is None
    assert out.binary_logits is None  # odd batch: no pairs
    assert all(getattr(out, name) is None for name in VL_HEADS if name != "region_logits")
    with pytest.raises(ConfigError, match="vqa"):  # the package's own error: the CLI prints one line
        model(**make_inputs(tiny), heads=["vqa"])


def test_fusion_sum_adds_the_pooled_vectors(tiny):
    model = ViLBertForVLTasks(ViLBertConfig.from_preset("tiny", fusion_method="sum")).eval()
    with torch.no_grad():
        out = model(**make_inputs(tiny))
        torch.testing.assert_close(out.pair_logit, model.pair_head(out.pooled_text + out.pooled_vision).squeeze(-1))


# ---------------------------------------------------------------------------------------------------- pretraining


def pretraining_labels(config, batch=3, length=6, regions=5):
    mlm = torch.full((batch, length), -100)
    mlm[0, 2], mlm[1, 1], mlm[2, 4] = 5, 7, 9
    region_labels = torch.full((batch, regions), -100)
    region_labels[:, 1:] = 0
    region_labels[0, 3] = region_labels[2, 1] = 1
    targets = torch.softmax(torch.randn(batch, regions, config.v_target_size), dim=-1)
    return {"mlm_labels": mlm, "region_labels": region_labels, "region_targets": targets,
            "alignment_labels": torch.tensor([0, 1, 0])}


def test_pretraining_losses_match_their_definitions(tiny):
    model = ViLBertForPreTraining(tiny).eval()
    inputs, labels = make_inputs(tiny, batch=3), pretraining_labels(tiny)
    with torch.no_grad():
        full = model(**inputs)
        out = model(**inputs, **labels)
    selected = labels["mlm_labels"] != -100
    torch.testing.assert_close(out.mlm_logits, full.mlm_logits[selected])
    mlm = F.cross_entropy(full.mlm_logits.view(-1, tiny.vocab_size), labels["mlm_labels"].view(-1), ignore_index=-100)
    torch.testing.assert_close(out.mlm_loss, mlm)
    masked = labels["region_labels"] == 1
    torch.testing.assert_close(out.region_logits, full.region_logits[masked])
    kl = F.kl_div(F.log_softmax(full.region_logits, -1), labels["region_targets"], reduction="none").sum(-1)
    torch.testing.assert_close(out.region_loss, kl[masked].sum() / masked.sum())
    alignment = F.cross_entropy(full.alignment_logits, labels["alignment_labels"])
    torch.testing.assert_close(out.alignment_loss, alignment)
    torch.testing.assert_close(out.loss, mlm + out.region_loss + alignment)


def test_host_counted_labels_give_the_same_outputs_without_a_sync(tiny):
    model = ViLBertForPreTraining(tiny).eval()
    inputs, labels = make_inputs(tiny, batch=3), pretraining_labels(tiny)
    with torch.no_grad():
        synced = model(**inputs, **labels)
        counted = model(**inputs, **labels, labelled_counts=(3, 2))
    for name in ("loss", "mlm_logits", "region_logits", "alignment_logits"):
        torch.testing.assert_close(getattr(counted, name), getattr(synced, name), rtol=0, atol=0)


def test_region_loss_is_zero_without_masked_regions(tiny):
    model = ViLBertForPreTraining(tiny)
    labels = pretraining_labels(tiny)
    labels["region_labels"][:] = 0
    out = model(**make_inputs(tiny, batch=3), **labels)
    assert out.region_loss.item() == 0.0 and math.isfinite(out.loss.item())
    out.loss.backward()


def test_bf16_autocast_forward_and_backward_run(tiny):
    model = ViLBertForPreTraining(tiny).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**make_inputs(tiny, batch=3), **pretraining_labels(tiny))
    assert out.mlm_logits.dtype == torch.bfloat16
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) > 0 and all(torch.isfinite(g).all() for g in grads)


def test_fixed_text_layers_get_no_gradient():
    config = ViLBertConfig.from_preset("tiny", fixed_t_layer=1)
    model = ViLBertForVLTasks(config).train()
    model(**make_inputs(config), heads=["answer_logits"]).answer_logits.sum().backward()
    layers = model.vilbert.encoder.text_layers
    assert all(p.grad is None for p in layers[0].parameters())
    assert all(p.grad is not None for p in layers[1].parameters())


def _without_gradient(cls, **overrides) -> set[str]:
    """Names of the parameters that a backward through every output leaves without a gradient (nothing frozen)."""
    config = ViLBertConfig.from_preset("tiny", **overrides)
    model = cls(config).train().requires_grad_(True)
    task_ids = torch.ones(3, 1, dtype=torch.long) if config.task_specific_tokens else None
    if cls is ViLBertForPreTraining:
        model(**make_inputs(config, batch=3), **pretraining_labels(config), task_ids=task_ids).loss.backward()
    else:
        out = model(**make_inputs(config, batch=3), task_ids=task_ids)
        sum(getattr(out, key).sum() for key in VL_HEADS if getattr(out, key) is not None).backward()
    return {name for name, p in model.named_parameters() if p.grad is None}


FROZEN_SETTINGS = {
    "text": dict(fixed_t_layer=1),
    "vision": dict(fixed_v_layer=1, v_biattention_id=[1], t_biattention_id=[2]),
    "both+task-token": dict(fixed_t_layer=1, fixed_v_layer=1, v_biattention_id=[1], t_biattention_id=[2],
                            task_specific_tokens=True),
}


@pytest.mark.parametrize("cls", [ViLBertForPreTraining, ViLBertForVLTasks])
@pytest.mark.parametrize("setting", sorted(FROZEN_SETTINGS))
def test_frozen_parameters_are_exactly_those_fixed_layers_leave_without_gradient(cls, setting):
    overrides = FROZEN_SETTINGS[setting]
    layout = {k: v for k, v in overrides.items() if not k.startswith("fixed_")}
    cut_off = _without_gradient(cls, **overrides) - _without_gradient(cls, **layout)  # unused heads aside
    model = cls(ViLBertConfig.from_preset("tiny", **overrides))
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen == cut_off
    assert ("vilbert.embeddings.word_embeddings.weight" in frozen) == (
        cls is ViLBertForVLTasks and "fixed_t_layer" in overrides)  # the tied MLM decoder trains them
    assert not any(not p.requires_grad for p in cls(ViLBertConfig.from_preset("tiny", **layout)).parameters())


def test_frozen_flags_survive_save_and_load(tmp_path):
    config = ViLBertConfig.from_preset("tiny", fixed_t_layer=1)
    ViLBertForPreTraining(config).save_pretrained(tmp_path)
    loaded = ViLBertForPreTraining.from_pretrained(tmp_path)
    frozen = {n for n, p in loaded.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, p in ViLBertForPreTraining(config).named_parameters() if not p.requires_grad}
    assert "vilbert.encoder.text_layers.0.attention.query.weight" in frozen
    assert "vilbert.encoder.text_layers.1.attention.query.weight" not in frozen


# ---------------------------------------------------------------------------------------------------- task token


def test_task_token_follows_cls_without_position_embedding():
    config = ViLBertConfig.from_preset("tiny", task_specific_tokens=True)
    model = ViLBertForVLTasks(config).eval()
    inputs = make_inputs(config, batch=2, length=6)
    task_ids = torch.tensor([[1], [10]])
    with torch.no_grad():
        out = model(**inputs, task_ids=task_ids)
        assert out.text_hidden.shape[1] == 7 and out.token_logits.shape == (2, 7)
        emb = model.vilbert.embeddings
        embedded = emb(inputs["input_ids"], inputs["token_type_ids"], task_ids)
        plain = emb.word_embeddings(inputs["input_ids"]) + emb.position_embeddings.weight[:6]
        plain = plain + emb.token_type_embeddings(inputs["token_type_ids"])
        torch.testing.assert_close(embedded[:, 0], emb.layer_norm(plain[:, 0]))
        torch.testing.assert_close(embedded[:, 1], emb.layer_norm(emb.task_embeddings(task_ids[:, 0])))
        torch.testing.assert_close(embedded[:, 2:], emb.layer_norm(plain[:, 1:]))
        other = model(**inputs, task_ids=torch.tensor([[2], [10]]))
    assert not torch.allclose(other.answer_logits[0], out.answer_logits[0])
    torch.testing.assert_close(other.answer_logits[1], out.answer_logits[1])


# ---------------------------------------------------------------------------------------------------- text prefix


def test_batch1_text_prefix_matches_the_full_forward(tiny):
    model = ViLBertForVLTasks(tiny).eval()
    inputs = make_inputs(tiny, batch=4)
    caption = {k: inputs[k][:1] for k in ("input_ids", "attention_mask", "token_type_ids")}
    repeated = {k: v.expand(4, -1) for k, v in caption.items()}
    with torch.no_grad():
        prefix = model.vilbert.encode_text_prefix(**caption)
        fast = model(region_features=inputs["region_features"], region_locations=inputs["region_locations"],
                     region_mask=inputs["region_mask"], text_prefix=prefix)
        full = model(**{**inputs, **repeated})
    torch.testing.assert_close(fast.pair_logit, full.pair_logit, atol=1e-6, rtol=0)
    torch.testing.assert_close(fast.text_hidden, full.text_hidden, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("cls", [ViLBertForPreTraining, ViLBertForVLTasks])
def test_save_and_load_round_trip_is_bitwise_and_keeps_the_decoder_tied(cls, tiny, tmp_path):
    model = cls(tiny).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "model.safetensors").is_file()
    loaded = cls.from_pretrained(tmp_path).eval()
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert loaded.mlm_head.decoder.weight is loaded.vilbert.embeddings.word_embeddings.weight
    inputs = make_inputs(tiny)
    with torch.no_grad():
        assert torch.equal(model(**inputs).pooled_text, loaded(**inputs).pooled_text)


def test_auto_classes_load_the_base_model(tiny, tmp_path):
    ViLBertForPreTraining(tiny).save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), ViLBertConfig)
    assert isinstance(AutoModel.from_pretrained(tmp_path), ViLBertModel)
    task_model = ViLBertForVLTasks.from_pretrained(tmp_path)  # how fine-tuning starts from pretraining
    assert task_model.answer_head.classifier.weight.shape == (10, 64)


MAP_FIELDS = ("text_attentions", "vision_attentions", "text_to_vision_attentions", "vision_to_text_attentions")


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
