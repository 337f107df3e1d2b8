"""Released ViLBERT checkpoints <-> this model; Hugging Face BERT -> the text stream.

The only module that knows the reference's parameter names (docs/architecture.md tabulates them). Rules map module-path
prefixes both ways, so import and export share one table; `{i}` stands for a layer index.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import load_file

from vilbert.configuration_vilbert import ViLBertConfig
from vilbert.errors import CheckpointError, ConfigError
from vilbert.modeling_vilbert import ViLBertForPreTraining, ViLBertForVLTasks, ViLBertPreTrainedModel

logger = logging.getLogger(__name__)

SOURCES = ("vilbert-multi-task", "vilbert_beta")
# the region features each source's released models were trained on (docs/features.md, the VMB
# X-152 FPN and BUTD sections);
# `detector` uses the names feature stores record, so a store from another family can be warned about
RELEASED_VISUAL_FEATURES: dict[str, dict[str, Any]] = {
    "vilbert-multi-task": {
        "detector": "vmb-x152-fpn",
        "description": "vqa-maskrcnn-benchmark ResNeXt-152 32x8d FPN, Visual Genome 1600 classes, fc6 2048-d",
        "selection": "per-class NMS 0.5, top 100 boxes",
        "boxes": 100,
        "published_features": "vilbert-lmdb (*_resnext152_faster_rcnn_genome.lmdb)",
    },
    "vilbert_beta": {
        "detector": "butd-r101-c4",
        "description": "bottom-up-attention Caffe ResNet-101 C4, Visual Genome 1600 classes, pool5 2048-d",
        "selection": "per-class NMS 0.3, max_conf >= 0.2, 10-100 boxes",
        "boxes": "10-100",
        "published_features": "vilbert-beta-lmdb (*_resnet101_faster_rcnn_genome.lmdb)",
    },
}
REFERENCE_CONFIG_DIR = os.path.join(os.path.dirname(__file__), "reference_configs")  # the released JSON configs

# (reference prefix, our prefix), most specific first in both columns
_COMMON_RULES: list[tuple[str, str]] = [
    ("bert.embeddings.LayerNorm.", "vilbert.embeddings.layer_norm."),
    ("bert.embeddings.", "vilbert.embeddings."),
    ("bert.v_embeddings.image_embeddings.", "vilbert.vision_embeddings.feature_proj."),
    ("bert.v_embeddings.image_location_embeddings.", "vilbert.vision_embeddings.location_proj."),
    ("bert.v_embeddings.LayerNorm.", "vilbert.vision_embeddings.layer_norm."),
    ("bert.encoder.layer.{i}.attention.self.", "vilbert.encoder.text_layers.{i}.attention."),
    ("bert.encoder.layer.{i}.attention.output.LayerNorm.", "vilbert.encoder.text_layers.{i}.attention_output.layer_norm."),
    ("bert.encoder.layer.{i}.attention.output.dense.", "vilbert.encoder.text_layers.{i}.attention_output.dense."),
    ("bert.encoder.layer.{i}.intermediate.dense.", "vilbert.encoder.text_layers.{i}.ffn.intermediate."),
    ("bert.encoder.layer.{i}.output.LayerNorm.", "vilbert.encoder.text_layers.{i}.ffn.output.layer_norm."),
    ("bert.encoder.layer.{i}.output.dense.", "vilbert.encoder.text_layers.{i}.ffn.output.dense."),
    ("bert.encoder.v_layer.{i}.attention.self.", "vilbert.encoder.vision_layers.{i}.attention."),
    ("bert.encoder.v_layer.{i}.attention.output.LayerNorm.", "vilbert.encoder.vision_layers.{i}.attention_output.layer_norm."),
    ("bert.encoder.v_layer.{i}.attention.output.dense.", "vilbert.encoder.vision_layers.{i}.attention_output.dense."),
    ("bert.encoder.v_layer.{i}.intermediate.dense.", "vilbert.encoder.vision_layers.{i}.ffn.intermediate."),
    ("bert.encoder.v_layer.{i}.output.LayerNorm.", "vilbert.encoder.vision_layers.{i}.ffn.output.layer_norm."),
    ("bert.encoder.v_layer.{i}.output.dense.", "vilbert.encoder.vision_layers.{i}.ffn.output.dense."),
    # co-attention: suffix 1 = vision, 2 = text
    ("bert.encoder.c_layer.{i}.biattention.query1.", "vilbert.encoder.coattention_layers.{i}.coattention.vision_query."),
    ("bert.encoder.c_layer.{i}.biattention.key1.", "vilbert.encoder.coattention_layers.{i}.coattention.vision_key."),
    ("bert.encoder.c_layer.{i}.biattention.value1.", "vilbert.encoder.coattention_layers.{i}.coattention.vision_value."),
    ("bert.encoder.c_layer.{i}.biattention.query2.", "vilbert.encoder.coattention_layers.{i}.coattention.text_query."),
    ("bert.encoder.c_layer.{i}.biattention.key2.", "vilbert.encoder.coattention_layers.{i}.coattention.text_key."),
    ("bert.encoder.c_layer.{i}.biattention.value2.", "vilbert.encoder.coattention_layers.{i}.coattention.text_value."),
    ("bert.encoder.c_layer.{i}.biOutput.dense1.", "vilbert.encoder.coattention_layers.{i}.vision_output.dense."),
    ("bert.encoder.c_layer.{i}.biOutput.LayerNorm1.", "vilbert.encoder.coattention_layers.{i}.vision_output.layer_norm."),
    ("bert.encoder.c_layer.{i}.biOutput.dense2.", "vilbert.encoder.coattention_layers.{i}.text_output.dense."),
    ("bert.encoder.c_layer.{i}.biOutput.LayerNorm2.", "vilbert.encoder.coattention_layers.{i}.text_output.layer_norm."),
    ("bert.encoder.c_layer.{i}.v_intermediate.dense.", "vilbert.encoder.coattention_layers.{i}.vision_ffn.intermediate."),
    ("bert.encoder.c_layer.{i}.v_output.LayerNorm.", "vilbert.encoder.coattention_layers.{i}.vision_ffn.output.layer_norm."),
    ("bert.encoder.c_layer.{i}.v_output.dense.", "vilbert.encoder.coattention_layers.{i}.vision_ffn.output.dense."),
    ("bert.encoder.c_layer.{i}.t_intermediate.dense.", "vilbert.encoder.coattention_layers.{i}.text_ffn.intermediate."),
    ("bert.encoder.c_layer.{i}.t_output.LayerNorm.", "vilbert.encoder.coattention_layers.{i}.text_ffn.output.layer_norm."),
    ("bert.encoder.c_layer.{i}.t_output.dense.", "vilbert.encoder.coattention_layers.{i}.text_ffn.output.dense."),
    ("bert.t_pooler.dense.", "vilbert.text_pooler.dense."),
    ("bert.v_pooler.dense.", "vilbert.vision_pooler.dense."),
    ("cls.predictions.transform.LayerNorm.", "mlm_head.transform.layer_norm."),
    ("cls.predictions.transform.dense.", "mlm_head.transform.dense."),
    ("cls.predictions.decoder.", "mlm_head.decoder."),
    ("cls.predictions.", "mlm_head."),
    ("cls.bi_seq_relationship.", "alignment_head."),
    ("cls.imagePredictions.transform.LayerNorm.", "region_head.transform.layer_norm."),
    ("cls.imagePredictions.transform.dense.", "region_head.transform.dense."),
    ("cls.imagePredictions.decoder.", "region_head.decoder."),
    ("vil_logit.", "pair_head."),
    ("vision_logit.", "region_score_head."),
    ("linguisic_logit.", "token_score_head."),
]
_SOURCE_RULES: dict[str, list[tuple[str, str]]] = {
    "vilbert-multi-task": [
        ("vil_prediction.logit_fc.0.", "answer_head.dense."),
        ("vil_prediction.logit_fc.2.", "answer_head.layer_norm."),
        ("vil_prediction.logit_fc.3.", "answer_head.classifier."),
        ("vil_prediction_gqa.logit_fc.0.", "gqa_answer_head.dense."),
        ("vil_prediction_gqa.logit_fc.2.", "gqa_answer_head.layer_norm."),
        ("vil_prediction_gqa.logit_fc.3.", "gqa_answer_head.classifier."),
        ("vil_binary_prediction.logit_fc.0.", "binary_head.dense."),
        ("vil_binary_prediction.logit_fc.2.", "binary_head.layer_norm."),
        ("vil_binary_prediction.logit_fc.3.", "binary_head.classifier."),
        ("vil_tri_prediction.", "tri_head."),
    ],
    # vilbert_beta has no gqa, binary or tri heads; its answer head is weight-normed (folded on import)
    "vilbert_beta": [
        ("vil_prediction.main.0.", "answer_head.dense."),
        ("vil_prediction.main.3.", "answer_head.classifier."),
    ],
}
_UNUSED_REFERENCE = re.compile(r"^bert\.encoder\.c_layer\.(\d+)\.biOutput\.q_dense[12]\.(weight|bias)$")
_TIED_DECODER = "mlm_head.decoder.weight"
# our parameters with no reference counterpart (the dual encoder): never exported, initialised fresh on import
OURS_ONLY_PREFIXES = ("vilbert.dual.",)
# keys of the reference config JSONs that the reference code never reads or that we do not model
_IGNORED_JSON_KEYS = {"pooling_method", "bi_attention_type", "visualization", "objective", "num_negative", "fast_mode"}
_UNSUPPORTED_JSON_FLAGS = {"in_batch_pairs": False, "dynamic_attention": False, "visual_target": 0, "model": "bert"}


def _compile(prefix: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(prefix).replace(re.escape("{i}"), r"(\d+)"))


def _rules(source: str, reverse: bool) -> list[tuple[re.Pattern[str], str]]:
    if source not in SOURCES:
        raise ConfigError(f"source: unknown checkpoint source {source!r}; expected one of {SOURCES}")
    table = _SOURCE_RULES[source] + _COMMON_RULES
    pairs = [(ours, ref) for ref, ours in table] if reverse else table
    return [(_compile(a), b.replace("{i}", r"\1")) for a, b in pairs]


def _rename(key: str, rules: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, replacement in rules:
        if pattern.match(key):
            return pattern.sub(replacement, key, count=1)
    return None


def normalise_reference_names(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip a `module.` prefix (DataParallel/DDP) and rename legacy LayerNorm `gamma`/`beta` to `weight`/`bias`."""
    out = {}
    for key, tensor in state_dict.items():
        key = key.removeprefix("module.")
        key = re.sub(r"\.gamma$", ".weight", key)
        key = re.sub(r"\.beta$", ".bias", key)
        out[key] = tensor
    return out


def fold_weight_norm(weight_g: torch.Tensor, weight_v: torch.Tensor) -> torch.Tensor:
    """weight_norm(dim=None) -> plain weight: W = g * v / ||v||_F, with g a scalar."""
    return weight_g * weight_v / weight_v.norm()


def _expected_shapes(config: ViLBertConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = ViLBertForVLTasks(config)
    return {k: v.shape for k, v in model.state_dict().items()}


def _convert(
    state_dict: Mapping[str, torch.Tensor], source: str
) -> dict[str, tuple[str, torch.Tensor]]:
    """Our key -> (reference key, tensor). Keys no rule knows keep their reference name (reported unexpected)."""
    state = normalise_reference_names(state_dict)
    rules = _rules(source, reverse=False)
    for stem in sorted({k[: -len(".weight_g")] for k in state if k.endswith(".weight_g")}):
        state[stem + ".weight"] = fold_weight_norm(state.pop(stem + ".weight_g"), state.pop(stem + ".weight_v"))
    decoder = state.pop("cls.predictions.decoder.weight", None)
    words = state.get("bert.embeddings.word_embeddings.weight")
    if (
        decoder is not None and words is not None and not decoder.is_meta
        and (decoder.shape != words.shape or not torch.equal(decoder, words))
    ):
        logger.warning("cls.predictions.decoder.weight differs from the word embeddings; using the word embeddings "
                       "(the model ties them)")
    out: dict[str, tuple[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if _UNUSED_REFERENCE.match(key):
            continue  # q_dense1/2: never used in the reference forward
        ours = _rename(key, rules)
        out[ours if ours is not None else key] = (key, tensor)
    return out


def _check_shapes(converted: dict[str, tuple[str, torch.Tensor]], config: ViLBertConfig, origin: str) -> None:
    expected = _expected_shapes(config)
    for ours, (ref, tensor) in converted.items():
        if ours in expected and tuple(tensor.shape) != tuple(expected[ours]):
            raise CheckpointError(
                f"{origin}: {ref} has shape {list(tensor.shape)} but the model ({ours}) expects "
                f"{list(expected[ours])}; check the config (--config) and --num-labels"
            )


def convert_reference_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: ViLBertConfig, source: str = "vilbert-multi-task",
    origin: str = "<state dict>",
) -> dict[str, torch.Tensor]:
    """A reference state dict (either repository) -> ours, shape-checked against `config`.

    Drops q_dense1/2, takes the MLM decoder from the word embeddings, folds BETA's weight norm, accepts
    gamma/beta and a `module.` prefix. Keys no rule knows keep their reference name, so loading reports them.
    """
    converted = _convert(state_dict, source)
    _check_shapes(converted, config, origin)
    return {ours: tensor for ours, (_, tensor) in converted.items()}


def export_reference_state_dict(model: ViLBertPreTrainedModel, source: str = "vilbert-multi-task") -> dict[str, torch.Tensor]:
    """Our model -> the reference key set of `source` (the .bin layout the reference code loads).

    The MLM decoder is written out as a copy of the word embeddings (the reference stores it twice) and the unused
    q_dense1/2 as zeros, so the key set and shapes equal the released files'. Our own parameters (the dual
    encoder, `OURS_ONLY_PREFIXES`) are left out. From a ViLBertForVLTasks model
    exported as vilbert_beta, the heads BETA lacks (gqa, binary, tri) are left out and the answer head is written
    in weight-norm form (g = ||W||_F, v = W).
    """
    if not isinstance(model, ViLBertForPreTraining | ViLBertForVLTasks):
        raise ConfigError(f"model: export needs ViLBertForPreTraining or ViLBertForVLTasks, not {type(model).__name__}")
    config: ViLBertConfig = model.config
    if config.architecture != "vilbert":
        raise ConfigError(f"architecture: {config.architecture!r} has no reference counterpart; only the faithful "
                          "'vilbert' model exports")
    if source == "vilbert_beta" and isinstance(model, ViLBertForVLTasks) and config.answer_head_type != "beta":
        raise ConfigError("answer_head_type: exporting to vilbert_beta needs the 'beta' answer head")
    rules = _rules(source, reverse=True)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        if key.startswith(OURS_ONLY_PREFIXES):
            continue
        ref = _rename(key, rules)
        if ref is None:
            if source == "vilbert_beta" and key.startswith(("gqa_answer_head.", "binary_head.", "tri_head.")):
                continue
            raise CheckpointError(f"{type(model).__name__}: no reference name for parameter {key}")
        tensor = tensor.detach().clone()
        if source == "vilbert_beta" and ref.startswith("vil_prediction.main.") and ref.endswith(".weight"):
            stem = ref[: -len(".weight")]
            out[stem + ".weight_g"] = tensor.norm()
            out[stem + ".weight_v"] = tensor
            continue
        out[ref] = tensor
    words = model.vilbert.embeddings.word_embeddings.weight
    like = {"device": words.device, "dtype": words.dtype}
    for k in range(len(config.v_biattention_id)):
        prefix = f"bert.encoder.c_layer.{k}.biOutput."
        out[prefix + "q_dense1.weight"] = torch.zeros(config.v_hidden_size, config.bi_hidden_size, **like)
        out[prefix + "q_dense1.bias"] = torch.zeros(config.v_hidden_size, **like)
        out[prefix + "q_dense2.weight"] = torch.zeros(config.hidden_size, config.bi_hidden_size, **like)
        out[prefix + "q_dense2.bias"] = torch.zeros(config.hidden_size, **like)
    return out


def read_reference_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a reference `.bin` (a plain state dict) with weights_only=True; names normalised."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or non-weights pickles
        first = next((line.strip() for line in str(error).splitlines() if line.strip()), "no detail")
        raise CheckpointError(
            f"{path}: not a readable weights-only state dict ({type(error).__name__}: {first}); "
            "resume files (pytorch_ckpt_*.tar) hold pickled objects and are not supported"
        ) from error
    if isinstance(state, Mapping) and "model_state_dict" in state:
        state = state["model_state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors, found {type(state).__name__}")
    if not state:
        raise CheckpointError(f"{path}: the state dict holds no tensors")
    return normalise_reference_names(state)


def config_from_reference_json(path: str | os.PathLike, **overrides: Any) -> ViLBertConfig:
    """A reference config JSON -> ViLBertConfig, with overrides. A bare name such as
    "bert_base_4layer_4conect.json" that is not a file here is looked up among the packaged reference configs."""
    path = os.fspath(path)
    packaged = os.path.join(REFERENCE_CONFIG_DIR, path)
    if not os.path.exists(path) and os.path.basename(path) == path and os.path.isfile(packaged):
        path = packaged
    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        reason = "binary data, not JSON" if isinstance(error, UnicodeDecodeError) else error
        raise ConfigError(f"{path}: cannot read the reference config ({reason})") from error
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    fields = set(ViLBertConfig.__dataclass_fields__)
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key in _UNSUPPORTED_JSON_FLAGS:
            if value != _UNSUPPORTED_JSON_FLAGS[key]:
                raise ConfigError(f"{path}: {key} = {value!r} is not supported (only {_UNSUPPORTED_JSON_FLAGS[key]!r})")
        elif key in _IGNORED_JSON_KEYS:
            logger.debug("%s: ignoring %s (unused by the reference model)", path, key)
        elif key in fields or key == "num_labels":
            kwargs[key] = value
        else:
            logger.warning("%s: ignoring unknown key %s", path, key)
    kwargs.update(overrides)
    try:
        return ViLBertConfig(**kwargs)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from error


def _fit_config(
    config: ViLBertConfig, state: Mapping[str, torch.Tensor], source: str, num_labels: int | None
) -> ViLBertConfig:
    """Adjust `config` to what a reference checkpoint shows and its JSON config cannot say: the task-token table,
    the answer count (unless `num_labels` is given) and the answer-head style of the source."""
    overrides: dict[str, Any] = {"task_specific_tokens": "bert.embeddings.task_embeddings.weight" in state}
    if source == "vilbert_beta":
        overrides["answer_head_type"] = "beta"
    answers = state.get("vil_prediction.logit_fc.3.bias", state.get("vil_prediction.main.3.bias"))
    if num_labels is not None:
        overrides["num_labels"] = num_labels
    elif answers is not None:
        overrides["num_labels"] = answers.shape[0]
    current = {key: getattr(config, key) for key in overrides}
    if current == overrides:
        return config
    logger.info("config adjusted to the checkpoint: %s", overrides)
    values = config.to_dict()
    if overrides.get("num_labels", config.num_labels) != config.num_labels:  # label names no longer apply
        del values["id2label"], values["label2id"]
    return ViLBertConfig(**{**values, **overrides})


def load_reference_checkpoint(
    path: str | os.PathLike,
    source: str = "vilbert-multi-task",
    config: ViLBertConfig | None = None,
    num_labels: int | None = None,
) -> ViLBertForPreTraining | ViLBertForVLTasks:
    """Load a released reference checkpoint into ViLBertForPreTraining (only bert.*/cls.* keys) or
    ViLBertForVLTasks (task heads present), in eval mode. Missing and unexpected keys are logged by name.

    `config` (default: the base model) gives widths and attachment points; the task-token table, the answer count
    and the answer-head style come from the checkpoint, except that `num_labels`, when given, fixes the answer count
    (a checkpoint whose head has another size is then refused).
    """
    path = os.fspath(path)
    state = read_reference_state_dict(path)
    config = _fit_config(config if config is not None else ViLBertConfig(), state, source, num_labels)
    converted = convert_reference_state_dict(state, config, source, origin=path)
    has_task_heads = any(not k.startswith(("bert.", "cls.")) for k in state)
    model = (ViLBertForVLTasks if has_task_heads else ViLBertForPreTraining)(config)
    result = model.load_state_dict(converted, strict=False)
    loaded = len(converted) - len(result.unexpected_keys)
    expected = len(model.state_dict())
    if loaded < expected // 2:  # an unrelated state dict would otherwise give a random model
        raise CheckpointError(
            f"{path}: not a {source} ViLBERT checkpoint: only {loaded} of its {len(state)} tensors fit the model's "
            f"{expected} (e.g. {(result.unexpected_keys or list(state))[0]!r})")
    ours_only = [k for k in result.missing_keys if k.startswith(OURS_ONLY_PREFIXES)]
    if ours_only:
        logger.info("%s: %d parameters of ours that reference checkpoints do not have, initialised fresh: %s",
                    path, len(ours_only), ", ".join(ours_only))
    missing = [k for k in result.missing_keys if k != _TIED_DECODER and k not in ours_only]
    if missing:
        logger.warning("%s: %d parameters not in the checkpoint (left at their initial values): %s",
                       path, len(missing), ", ".join(missing))
    if result.unexpected_keys:
        logger.warning("%s: %d checkpoint tensors not used: %s",
                       path, len(result.unexpected_keys), ", ".join(result.unexpected_keys))
    logger.info("%s: loaded %d tensors into %s", path, len(converted) - len(result.unexpected_keys),
                type(model).__name__)
    return model.eval()


_BERT_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def _read_bert_dir(bert_dir: str) -> tuple[dict[str, Any], dict[str, torch.Tensor], str]:
    config_path = os.path.join(bert_dir, "config.json")
    try:
        with open(config_path, encoding="utf-8") as f:
            bert_config = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{config_path}: cannot read the BERT config ({error})") from error
    safetensors_path = os.path.join(bert_dir, "model.safetensors")
    bin_path = os.path.join(bert_dir, "pytorch_model.bin")
    if os.path.isfile(safetensors_path):
        return bert_config, load_file(safetensors_path), safetensors_path
    if os.path.isfile(bin_path):
        return bert_config, read_reference_state_dict(bin_path), bin_path
    raise CheckpointError(f"{bert_dir}: neither model.safetensors nor pytorch_model.bin found")


def init_text_stream_from_bert(model: ViLBertPreTrainedModel, bert_dir: str | os.PathLike) -> list[str]:
    """Copy a local Hugging Face BERT (embeddings, all text layers, and the MLM head when the file has one and the
    model has `mlm_head`) into the text stream. Returns our names of the parameters set.

    The BERT must match the text stream: same vocabulary, width, layer count, heads and FFN width.
    """
    bert_dir = os.fspath(bert_dir)
    bert_config, state, weights_path = _read_bert_dir(bert_dir)
    config: ViLBertConfig = model.config
    for name in _BERT_FIELDS:
        if bert_config.get(name) != getattr(config, name):
            raise CheckpointError(
                f"{os.path.join(bert_dir, 'config.json')}: {name} = {bert_config.get(name)} but the text stream has "
                f"{name} = {getattr(config, name)}"
            )
    rules = _rules("vilbert-multi-task", reverse=False)
    ours_state = model.state_dict()
    # the rules name base-model parameters "vilbert.*", as in the head models; a bare ViLBertModel has no prefix
    base = "vilbert." if isinstance(model, ViLBertForPreTraining | ViLBertForVLTasks) else ""
    updates: dict[str, torch.Tensor] = {}
    for key, tensor in normalise_reference_names(state).items():
        key = key.removeprefix("bert.")
        if key.startswith(("embeddings.", "encoder.layer.")):
            key = "bert." + key
        elif not key.startswith("cls.predictions.") or key.startswith("cls.predictions.decoder."):
            continue  # pooler, NSP head, position_ids buffer; the decoder is tied to the word embeddings
        ours = _rename(key, rules)
        if ours is None:
            continue
        if ours.startswith("vilbert."):
            ours = base + ours.removeprefix("vilbert.")
        if ours not in ours_state:
            continue  # the MLM head when the model has none
        expected = ours_state[ours]
        if tuple(tensor.shape) != tuple(expected.shape):
            if ours.endswith("position_embeddings.weight") and tensor.shape[1:] == expected.shape[1:]:
                rows = min(tensor.shape[0], expected.shape[0])  # keep the first positions the model has
                tensor = torch.cat([tensor[:rows], expected[rows:]])
            else:
                raise CheckpointError(
                    f"{weights_path}: {key} has shape {list(tensor.shape)} but {ours} expects {list(expected.shape)}"
                )
        updates[ours] = tensor
    layers = f"{base}encoder.text_layers."  # a variant may build fewer text layers than num_hidden_layers
    num_layers = len({key[len(layers):].split(".")[0] for key in ours_state if key.startswith(layers)})
    missing_layers = [i for i in range(num_layers) if f"{layers}{i}.attention.query.weight" not in updates]
    if missing_layers or f"{base}embeddings.word_embeddings.weight" not in updates:
        raise CheckpointError(f"{weights_path}: no BERT weights for the embeddings or text layers {missing_layers}")
    model.load_state_dict(updates, strict=False)
    logger.info("%s: initialised %d text-stream tensors from BERT", weights_path, len(updates))
    return sorted(updates)
