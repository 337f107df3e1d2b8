"""Published bottom-up-attention weights → the native `BUTDModel` state dict (and back to detectron2 naming).

Three source layouts (docs/features.md says where each file is published):

- `detectron2`: detectron2-zoo-style pickles `{"model": {name: ndarray}, "__author__": ...}` from
  py-bottom-up-attention (airsplay), detectron2 `.pth` checkpoints (MILVLG d2 mode, grid-feats-vqa). Background is
  the LAST class, `bbox_pred` has K*4 rows (no background), anchors size-major.
- `hf-frcnn`: `unc-nlp/frcnn-vg-finetuned` `pytorch_model.bin`; detectron2 names, plus BatchNorm `gamma`/`beta`,
  `num_batches_tracked` and the RPN's `cell_anchors` stored as parameters.
- `milvlg-caffe`: MILVLG `bua-caffe-frcn-r101-*.pth` (Caffe conventions): background first, `bbox_pred`
  (K+1)*4 rows decoded with weights (1, 1, 1, 1), a 2-way softmax per anchor (2A objectness channels: A
  background then A foreground) in Caffe's ratio-major anchor order, attribute head `cls_embed` / `attr_linear1` /
  `attr_linear2`.

The native layout is detectron2's names with background first (see `features.butd`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import zipfile
from collections.abc import Mapping

import numpy as np
import torch
from safetensors.torch import load_file

from features.butd import BUTDModel
from features.checksum import sha256_file
from features.errors import WeightsError
from features.safe_pickle import safe_load

logger = logging.getLogger(__name__)

FORMATS = ("detectron2", "hf-frcnn", "milvlg-caffe")
PREDICTOR = "roi_heads.box_predictor."
_DROPPED_SUFFIXES = (".num_batches_tracked",)
_DROPPED_PREFIXES = ("proposal_generator.anchor_generator.", "pixel_mean", "pixel_std")
_MILVLG_RENAMES = {"cls_embed.": "cls_embedding.", "attr_linear1.": "fc_attr.", "attr_linear2.": "attr_score."}



# ---------------------------------------------------------------------------------------------------------------
# Reading files


def _torch_load(path: str) -> object:
    """torch.load with weights_only=True; numpy arrays inside are allowed through torch's own allow-list."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        numpy_globals = [np.ndarray, np.dtype, np.dtypes.Float32DType, np.dtypes.Float64DType,
                         np.dtypes.Float16DType, np.dtypes.Int64DType, np.dtypes.Int32DType]
        reconstruct = getattr(np, "_core", np.core).multiarray._reconstruct
        with torch.serialization.safe_globals([reconstruct, *numpy_globals]):
            return torch.load(path, map_location="cpu", weights_only=True)


def read_weight_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The raw state dict of a weight file (pickle, torch zip, or safetensors), as float tensors by name."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(f"{path}: no such weight file")
    try:
        if path.endswith(".safetensors"):
            obj = load_file(path)
        elif zipfile.is_zipfile(path):
            obj = _torch_load(path)
        else:
            obj = safe_load(path)
    except WeightsError:
        raise
    except Exception as e:  # torch and safetensors raise many types for a bad file
        raise WeightsError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from e
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    elif isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"{path}: expected a state dict (or {{'model': state dict}}), got {type(obj).__name__}")
    state = {}
    for name, value in obj.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
        if not isinstance(value, torch.Tensor):
            raise WeightsError(f"{path}: entry {name!r} is a {type(value).__name__}, not an array")
        state[name.removeprefix("module.")] = value
    return state


def detect_format(state: Mapping[str, torch.Tensor]) -> str:
    """Guess the layout from key names and shapes."""
    if any(k.startswith(PREDICTOR + p) for k in state for p in ("cls_embed.", "attr_linear1.")):
        return "milvlg-caffe"
    logits, deltas = state.get("proposal_generator.rpn_head.objectness_logits.weight"), state.get(
        "proposal_generator.rpn_head.anchor_deltas.weight")
    if logits is not None and deltas is not None and logits.shape[0] * 2 == deltas.shape[0]:
        return "milvlg-caffe"
    if any(k.endswith((".gamma", ".beta")) or "anchor_generator.cell_anchors" in k for k in state):
        return "hf-frcnn"
    return "detectron2"


# ---------------------------------------------------------------------------------------------------------------
# Layout changes


def background_last_to_first(t: torch.Tensor) -> torch.Tensor:
    """Rows [fg_1..fg_K, bg] → [bg, fg_1..fg_K] (cls_score, cls_embedding)."""
    return torch.cat([t[-1:], t[:-1]])


def background_first_to_last(t: torch.Tensor) -> torch.Tensor:
    return torch.cat([t[1:], t[:1]])


def anchor_permutation(num_sizes: int, num_ratios: int, *, to: str) -> torch.Tensor:
    """Index p with new[i] = old[p[i]]; `to="size-major"` turns Caffe's ratio-major order into detectron2's."""
    s, r = torch.meshgrid(torch.arange(num_sizes), torch.arange(num_ratios), indexing="ij")
    if to == "size-major":  # new index s*R + r holds old index r*S + s
        return (r * num_sizes + s).reshape(-1)
    if to == "ratio-major":
        return (s * num_ratios + r).t().reshape(-1)
    raise ValueError(f"to must be 'size-major' or 'ratio-major', got {to!r}")


def _permute_anchor_blocks(t: torch.Tensor, perm: torch.Tensor, block: int) -> torch.Tensor:
    """Permute the anchor axis of a conv weight/bias laid out as `anchor * block + k`."""
    return t.reshape(len(perm), block, *t.shape[1:])[perm].reshape(t.shape)


def _scale_box_rows(t: torch.Tensor, factors: tuple[float, ...]) -> torch.Tensor:
    """Multiply the dx, dy, dw, dh rows of a class-specific bbox_pred weight/bias by `factors`."""
    scale = torch.tensor(factors, dtype=t.dtype).repeat(t.shape[0] // 4)
    return t * scale.view(-1, *([1] * (t.dim() - 1)))


def _clean(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, value in state.items():
        if name.endswith(_DROPPED_SUFFIXES) or name.startswith(_DROPPED_PREFIXES):
            continue
        if name.endswith(".gamma"):
            name = name[: -len(".gamma")] + ".weight"
        elif name.endswith(".beta"):
            name = name[: -len(".beta")] + ".bias"
        out[name] = value.float() if value.is_floating_point() else value
    return out


# predictor tensors with one row per class (detectron2: background last; ours: first) and 4 rows per class
_CLASS_ROWS = ("cls_score.weight", "cls_score.bias", "cls_embedding.weight")
_BOX_ROWS = ("bbox_pred.weight", "bbox_pred.bias")


def convert_detectron2(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """detectron2 / airsplay / HF frcnn layout → native: background to row 0, 4 zero background rows in bbox_pred."""
    out = _clean(state)
    for key in _CLASS_ROWS:
        if PREDICTOR + key in out:
            out[PREDICTOR + key] = background_last_to_first(out[PREDICTOR + key])
    for key in _BOX_ROWS:
        if PREDICTOR + key in out:
            t = out[PREDICTOR + key]
            out[PREDICTOR + key] = torch.cat([t.new_zeros(4, *t.shape[1:]), t])
    return out


def convert_milvlg_caffe(
    state: Mapping[str, torch.Tensor],
    num_sizes: int = 4,
    num_ratios: int = 3,
    bbox_reg_weights: tuple[float, ...] = (10.0, 10.0, 5.0, 5.0),
) -> dict[str, torch.Tensor]:
    """MILVLG caffe-mode layout → native: fold the RPN softmax, reorder anchors, rescale deltas, rename attributes."""
    out = {}
    for name, value in _clean(state).items():
        for old, new in _MILVLG_RENAMES.items():
            if name.startswith(PREDICTOR + old):
                name = PREDICTOR + new + name[len(PREDICTOR + old):]
        out[name] = value
    perm = anchor_permutation(num_sizes, num_ratios, to="size-major")
    num_anchors = num_sizes * num_ratios
    for suffix in ("weight", "bias"):
        key = f"proposal_generator.rpn_head.objectness_logits.{suffix}"
        if key in out:
            t = out[key]
            if t.shape[0] != 2 * num_anchors:
                raise WeightsError(f"{key}: expected {2 * num_anchors} channels (2 per anchor), got {t.shape[0]}")
            # softmax([s0, s1])[1] = sigmoid(s1 - s0): one logit per anchor, same proposals and ranking
            out[key] = _permute_anchor_blocks(t[num_anchors:] - t[:num_anchors], perm, 1)
        key = f"proposal_generator.rpn_head.anchor_deltas.{suffix}"
        if key in out:
            out[key] = _permute_anchor_blocks(out[key], perm, 4)
        key = f"{PREDICTOR}bbox_pred.{suffix}"
        if key in out:  # decoded with weights (1, 1, 1, 1) there; our coder divides by bbox_reg_weights
            out[key] = _scale_box_rows(out[key], bbox_reg_weights)
    return out


def export_detectron2(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Native → detectron2 layout (background last, no background box rows): for the detectron2 backend."""
    out = dict(state)
    for key in _CLASS_ROWS:
        if PREDICTOR + key in out:
            out[PREDICTOR + key] = background_first_to_last(out[PREDICTOR + key])
    for key in _BOX_ROWS:
        if PREDICTOR + key in out:
            out[PREDICTOR + key] = out[PREDICTOR + key][4:]
    return out


def convert_state_dict(state: Mapping[str, torch.Tensor], fmt: str, config=None) -> dict[str, torch.Tensor]:
    """Any supported layout → native. `config` (a BUTDConfig) supplies anchor counts and box-coder weights."""
    if fmt in ("detectron2", "hf-frcnn"):
        return convert_detectron2(state)
    if fmt == "milvlg-caffe":
        if config is None:
            return convert_milvlg_caffe(state)
        return convert_milvlg_caffe(state, len(config.anchor_sizes), len(config.anchor_ratios),
                                    config.bbox_reg_weights)
    raise WeightsError(f"unknown weights format {fmt!r}; choose one of {', '.join(FORMATS)} or auto")


# ---------------------------------------------------------------------------------------------------------------
# Loading into a model


def check_state_dict(path: str, state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    """One clear error for missing, unexpected or mis-shaped tensors (first few named)."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])}"
                        f"{', ...' if len(unexpected) > 3 else ''})")
    if shapes:
        problems.append(f"{len(shapes)} of the wrong shape ({'; '.join(shapes[:3])})")
    if problems:
        raise WeightsError(f"{path}: weights do not fit the detector: {', '.join(problems)}")


def has_attribute_head(state: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(PREDICTOR + p) for k in state for p in ("attr_score.", "attr_linear2."))


def load_butd_weights(
    path: str | os.PathLike, config, fmt: str = "auto", *, adapt_config: bool = False
) -> tuple[dict[str, torch.Tensor], dict, object]:
    """Read, identify and convert a weight file; returns (native state dict, info for the store, config).

    With `adapt_config`, the config follows the file: no attribute head if the file has none, and Caffe's anchor
    centres (offset 0.5) for MILVLG caffe-mode weights. Shapes are then checked against the model the config
    builds, so a mismatch names the file and the tensors.
    """
    path = os.fspath(path)
    raw = read_weight_file(path)
    fmt = detect_format(raw) if fmt == "auto" else fmt
    if adapt_config:
        changes = {}
        if config.num_attributes and not has_attribute_head(raw):
            changes["num_attributes"] = 0
        if fmt == "milvlg-caffe":
            changes["anchor_offset"] = 0.5
        if changes:
            logger.info("%s: detector config adapted to the weights: %s", path, changes)
            config = dataclasses.replace(config, **changes)
    state = convert_state_dict(raw, fmt, config)
    with torch.device("meta"):
        expected = BUTDModel(config).state_dict()
    check_state_dict(path, state, expected)
    info = {"file": os.path.basename(path), "sha256": sha256_file(path), "format": fmt}
    logger.info("loaded %s weights from %s (sha256 %s)", fmt, path, info["sha256"][:12])
    return state, info, config
