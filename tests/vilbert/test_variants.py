"""The architecture variants (vilbert/variants.py): layer order, every head, attention maps, and end to end through
finetune, checkpoint reload, evaluate and predict; the faithful model unchanged."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BertConfig, BertForPreTraining

from features.detectors import DETECTORS
from features.extract import extract
from features.inputs import ImageInput
from tasks.cli import main
from tests.fixtures.tiny_detector import TinyDetector
from tests.fixtures.tiny_task_data import write_vocab, write_vqa
from vilbert import (
    VL_HEADS,
    ViLBertConfig,
    ViLBertForPreTraining,
    ViLBertForVLTasks,
    ViLBertModel,
    depth_overrides,
)
from vilbert.configuration_vilbert import ARCHITECTURES
from vilbert.convert import export_reference_state_dict, init_text_stream_from_bert
from vilbert.errors import ConfigError
from vilbert.modeling_vilbert import ENCODERS, ViLBertEncoder, layer_schedule
from vilbert.variants import variant_schedule

VARIANTS = [a for a in ARCHITECTURES if a != "vilbert"]
SINGLE_STREAM_WIDTH = {"v_hidden_size": 32, "v_num_attention_heads": 4}  # the tiny text width


def variant_config(architecture: str, **overrides) -> ViLBertConfig:
    extra = SINGLE_STREAM_WIDTH if architecture == "single-stream" else {}
    return ViLBertConfig.from_preset("tiny", architecture=architecture, **extra, **overrides)


def make_inputs(config, batch=2, length=6, regions=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, -2:] = 0
    return {
        "input_ids": torch.randint(1, config.vocab_size, (batch, length), generator=g),
        "attention_mask": mask,
        "token_type_ids": torch.zeros(batch, length, dtype=torch.long),
        "region_features": torch.randn(batch, regions, config.v_feature_size, generator=g),
        "region_locations": torch.rand(batch, regions, 5, generator=g),
        "region_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.float)[:batch, :regions],
    }


def test_every_architecture_has_an_encoder_and_the_faithful_one_is_untouched():
    assert set(ENCODERS) == set(ARCHITECTURES)
    config = ViLBertConfig.from_preset("tiny")
    assert config.architecture == "vilbert" and type(ViLBertModel(config).encoder) is ViLBertEncoder
    assert variant_schedule(config) == layer_schedule(config)


def test_the_faithful_model_gives_the_same_outputs_as_before_the_variants():
    """Numbers of the tiny preset from the commit before vilbert/variants.py existed (seed 0, eval, fp32)."""
    torch.manual_seed(0)
    config = ViLBertConfig.from_preset("tiny")
    model = ViLBertForVLTasks(config).eval()
    with torch.no_grad():
        out = model(**make_inputs(config))
    assert out.answer_logits[0, :3].tolist() == pytest.approx([0.089285, -0.052496, 0.267188], abs=2e-6)
    assert out.pair_logit.tolist() == pytest.approx([-7.7e-05, -0.000345], abs=2e-6)
    assert out.region_logits[1, :3].tolist() == pytest.approx([-0.095344, -0.162424, 0.086619], abs=2e-6)


EXPECTED_ORDER = {  # tiny: 3 text layers, 2 vision layers, blocks at text [1, 2] and vision [0, 1]
    "single-stream": "T0 T1 T2",
    "coattention-only": "T0 C0 C1",
    "sequential": "T0 V0 V1 X0 T1 X1 T2",
    "late-fusion": "T0 T1 T2 V0 V1",
}


@pytest.mark.parametrize("architecture", VARIANTS)
def test_each_variant_runs_only_its_layers_in_its_order(architecture):
    model = ViLBertModel(variant_config(architecture)).eval()
    encoder, trace = model.encoder, []
    layers = {"T": encoder.text_layers, "V": encoder.vision_layers, "C": encoder.coattention_layers,
              "X": getattr(encoder, "cross_attention_layers", [])}
    for letter, modules in layers.items():
        for i, layer in enumerate(modules):
            layer.register_forward_hook(lambda *_, name=f"{letter}{i}": trace.append(name))
    with torch.no_grad():
        model(**make_inputs(model.config))
    assert trace == EXPECTED_ORDER[architecture].split()
    assert sorted(trace) == sorted(f"{k}{i}" for k, modules in layers.items() for i in range(len(modules)))


@pytest.mark.parametrize("architecture", VARIANTS)
def test_each_variant_gives_every_head_and_reads_the_other_modality_only_where_it_should(architecture):
    config = variant_config(architecture)
    torch.manual_seed(0)
    model = ViLBertForVLTasks(config).eval()
    inputs = make_inputs(config)
    with torch.no_grad():
        out = model(**inputs)
        other_image = model(**{**inputs, "region_features": inputs["region_features"].flip(0)})
    assert out.answer_logits.shape == (2, config.num_labels) and out.pair_logit.shape == (2,)
    assert out.region_logits.shape == (2, 5) and out.token_logits.shape == (2, 6)
    assert out.region_class_logits.shape == (2, 5, config.v_target_size) and out.binary_logits.shape == (1, 2)
    assert all(getattr(out, head) is not None for head in VL_HEADS)
    text_reads_image = not torch.allclose(out.text_hidden[0], other_image.text_hidden[0])
    assert text_reads_image == (architecture != "late-fusion")


@pytest.mark.parametrize("architecture", VARIANTS)
def test_attention_maps_exist_where_the_variant_has_them_and_do_not_change_the_outputs(architecture):
    config = variant_config(architecture)
    model = ViLBertModel(config).eval()
    with torch.no_grad():
        plain = model(**make_inputs(config))
        maps = model(**make_inputs(config), output_attentions=True)
    torch.testing.assert_close(maps.pooled_text, plain.pooled_text, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(maps.vision_hidden, plain.vision_hidden, atol=1e-5, rtol=1e-5)
    expected = {  # (text, vision, text->vision, vision->text) map counts
        "single-stream": (3, 3, 3, 3), "coattention-only": (1, 0, 2, 2), "sequential": (3, 2, 2, 0),
        "late-fusion": (3, 2, 0, 0),
    }[architecture]
    counts = tuple(len(getattr(maps, f"{name}_attentions")) for name in ("text", "vision", "text_to_vision",
                                                                         "vision_to_text"))
    assert counts == expected
    if maps.text_to_vision_attentions:
        assert maps.text_to_vision_attentions[-1].shape[2:] == (6, 5)
    if architecture == "single-stream":  # four blocks of one softmax: each row sums to 1 across its two blocks
        rows = maps.text_attentions[0].sum(-1) + maps.text_to_vision_attentions[0].sum(-1)
        torch.testing.assert_close(rows, torch.ones_like(rows))


@pytest.mark.parametrize("architecture", VARIANTS)
def test_each_variant_pretrains_one_step_and_saves_and_reloads_to_identical_outputs(architecture, tmp_path):
    config = variant_config(architecture, dual_embedding_size=8)
    torch.manual_seed(0)
    model = ViLBertForPreTraining(config)
    inputs = make_inputs(config)
    labels = {"mlm_labels": torch.where(torch.rand(2, 6) < 0.5, inputs["input_ids"], -100),
              "region_labels": torch.tensor([[0, 1, 0, 1, 0], [0, 1, 0, 0, 0]]),
              "region_targets": torch.softmax(torch.randn(2, 5, config.v_target_size), -1),
              "alignment_labels": torch.tensor([0, 1])}
    out = model(**inputs, **labels, dual=True)
    out.loss.backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None
              and not n.startswith("vilbert.dual")]
    assert not unused, f"built but never used: {unused[:3]}"
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architecture"] == architecture
    reloaded = ViLBertForVLTasks.from_pretrained(tmp_path).eval()
    model.eval()
    with torch.no_grad():
        before, after = model.vilbert(**inputs, dual=True), reloaded.vilbert(**inputs, dual=True)
    for name in ("text_hidden", "vision_hidden", "pooled_text", "pooled_vision", "text_embeds", "image_embeds"):
        torch.testing.assert_close(getattr(after, name), getattr(before, name), atol=0, rtol=0)


def test_single_stream_and_coattention_only_load_the_same_text_initialisation(tmp_path):
    bert_config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                             intermediate_size=64, max_position_embeddings=64)
    bert = BertForPreTraining(bert_config).eval()
    bert.save_pretrained(tmp_path / "bert")
    ids, mask = torch.randint(1, 100, (2, 7)), torch.ones(2, 7, dtype=torch.long)
    with torch.no_grad():
        expected = bert.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    for architecture, layers in (("single-stream", 3), ("coattention-only", 1)):
        model = ViLBertForPreTraining(variant_config(architecture)).eval()
        names = init_text_stream_from_bert(model, tmp_path / "bert")
        assert f"vilbert.encoder.text_layers.{layers - 1}.attention.query.weight" in names
        assert f"vilbert.encoder.text_layers.{layers}.attention.query.weight" not in names
    base = ViLBertModel(variant_config("single-stream"))
    init_text_stream_from_bert(base, tmp_path / "bert")
    with torch.no_grad():  # with no regions, the single stream is BERT
        text = base.eval().embeddings(ids, torch.zeros_like(ids), None)
        alone = base.encoder.run_text_alone(text, torch.zeros(2, 1, 1, 7), "skip")
    torch.testing.assert_close(alone, expected, atol=1e-5, rtol=1e-5)


def test_depth_places_blocks_as_the_published_models_and_refuses_the_impossible():
    assert depth_overrides(12, 2) == {"v_num_hidden_layers": 2, "v_biattention_id": [0, 1],
                                      "t_biattention_id": [10, 11], "fixed_t_layer": 0}
    assert depth_overrides(6, 4, fixed_t_layer=4)["fixed_t_layer"] == 2
    for architecture in ("vilbert", "coattention-only", "sequential"):
        config = variant_config(architecture, **depth_overrides(3, 3))
        model = ViLBertModel(config)
        blocks = model.encoder.coattention_layers if architecture != "sequential" else model.encoder.cross_attention_layers
        assert len(blocks) == 3
    for depth in (0, 4):
        with pytest.raises(ConfigError, match=f"depth {depth}: impossible with 3 text layers"):
            depth_overrides(3, depth)


@pytest.mark.parametrize(("overrides", "key"), [
    ({"architecture": "two-tower"}, "architecture: unknown 'two-tower'"),
    ({"architecture": "single-stream"}, "v_hidden_size: 24 must equal hidden_size = 32"),
    ({"architecture": "sequential", "v_biattention_id": [], "t_biattention_id": []}, "t_biattention_id: empty"),
])
def test_bad_variant_configs_name_the_field(overrides, key):
    with pytest.raises(ConfigError, match=key):
        ViLBertConfig.from_preset("tiny", **overrides)


def test_only_the_faithful_model_exports_to_reference_names():
    with pytest.raises(ConfigError, match="architecture: 'late-fusion' has no reference counterpart"):
        export_reference_state_dict(ViLBertForVLTasks(variant_config("late-fusion")))


# ------------------------------------------------------------------------------------- end to end through the CLI


@pytest.fixture(scope="module")
def vqa_data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("variants")
    write_vocab(tmp / "tok")
    image_ids = [str(i) for i in write_vqa(tmp / "vqa")["image_ids"]]
    (tmp / "images").mkdir()
    images = []
    for k, image_id in enumerate(image_ids):
        pixels = np.random.default_rng(k).integers(0, 256, (80, 100, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp / "images" / f"{image_id}.png")
        images.append(ImageInput(image_id, str(tmp / "images" / f"{image_id}.png")))
    extract(images, tmp / "f.h5", TinyDetector(), workers=0, progress=False, float32=True)
    return tmp


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_each_variant_finetunes_evaluates_and_predicts(architecture, vqa_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(DETECTORS, "tiny-test", "tests.fixtures.tiny_detector:build_tiny")
    single = ", v_hidden_size: 32, v_num_attention_heads: 4" if architecture == "single-stream" else ""
    width = f"{{v_feature_size: 7, architecture: {architecture}{single}}}"
    data = [f"data.root={vqa_data / 'vqa'}", f"data.features=[{vqa_data / 'f.h5'}]", "data.min_answer_count=1",
            "data.minval_size=4", f"data.tokenizer={vqa_data / 'tok'}", "data.max_regions=5", "data.eval_batch_size=4"]
    run = tmp_path / "run"
    assert main(["finetune", "--task", "vqa", "model.preset=tiny", f"model.overrides={width}", "train.max_steps=2",
                 "train.global_batch_size=4", "train.num_workers=0", "train.device=cpu",
                 f"train.output_dir={run}", *data]) == 0
    checkpoint = sorted((run / "checkpoints").iterdir())[-1]
    assert json.loads((checkpoint / "config.json").read_text())["architecture"] == architecture
    assert main(["evaluate", "--task", "vqa", "--checkpoint", str(checkpoint), "--split", "val",
                 "--out", str(tmp_path / "eval"), *data, "data.val_split=val"]) == 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["num_questions"] == 12
    capsys.readouterr()
    image = vqa_data / "images" / f"{sorted((vqa_data / 'images').iterdir())[0].stem}.png"
    assert main(["predict", "--checkpoint", str(checkpoint), "--image", str(image), "--random-detector",
                 "--device", "cpu", "--question", "what color is it", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["answers"]
