"""Reading the VMB detector's two published files: `detectron_model.pth` and `detectron_config.yaml`.

The weights file is the fork's checkpointer dict; the state dict sits under `"model"` (other entries such as
`optimizer`, `scheduler` or `iteration` are ignored). Keys may carry a leading `module.` (a multi-GPU training run)
and are then stripped. Every tensor `VMBModel` has must be in the file (a missing one is an error naming it); the
file may hold more (the attribute head of a run trained with ATTR on) and those are logged and ignored.

The yaml is the fork's yacs config. Only the values that change inference are read
(docs/features.md): RPN top-N, NMS and minimum size, anchor strides, sizes and ratios, pooler settings, the ResNeXt body
(depth, groups, width, STRIDE_IN_1X1), FPN and MLP widths, class count. Preprocessing is not read: the extraction
script hard-codes its own.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Mapping

import numpy as np
import torch
import yaml
from torch import nn

from features.checksum import sha256_file
from features.errors import WeightsError
from features.safe_pickle import safe_load

logger = logging.getLogger(__name__)

# CONV_BODY -> blocks per stage (the fork and upstream maskrcnn-benchmark)
CONV_BODIES = {"R-50-FPN": (3, 4, 6, 3), "R-101-FPN": (3, 4, 23, 3), "R-152-FPN": (3, 8, 36, 3)}
# (yaml section, key) -> VMBConfig field
YAML_FIELDS = {
    ("RPN", "PRE_NMS_TOP_N_TEST"): "rpn_pre_nms_top_n",
    ("RPN", "POST_NMS_TOP_N_TEST"): "rpn_post_nms_top_n",
    ("RPN", "FPN_POST_NMS_TOP_N_TEST"): "rpn_fpn_post_nms_top_n",
    ("RPN", "NMS_THRESH"): "rpn_nms_threshold",
    ("RPN", "MIN_SIZE"): "rpn_min_size",
    ("RPN", "ANCHOR_STRIDE"): "anchor_strides",
    ("RPN", "ANCHOR_SIZES"): "anchor_sizes",
    ("RPN", "ASPECT_RATIOS"): "anchor_ratios",
    ("ROI_BOX_HEAD", "POOLER_RESOLUTION"): "pooler_resolution",
    ("ROI_BOX_HEAD", "POOLER_SCALES"): "pooler_scales",
    ("ROI_BOX_HEAD", "POOLER_SAMPLING_RATIO"): "pooler_sampling_ratio",
    ("ROI_BOX_HEAD", "MLP_HEAD_DIM"): "mlp_dim",
    ("RESNETS", "STRIDE_IN_1X1"): "stride_in_1x1",
    ("RESNETS", "NUM_GROUPS"): "num_groups",
    ("RESNETS", "WIDTH_PER_GROUP"): "width_per_group",
    ("RESNETS", "STEM_OUT_CHANNELS"): "stem_channels",
    ("RESNETS", "RES2_OUT_CHANNELS"): "res2_channels",
    ("BACKBONE", "OUT_CHANNELS"): "fpn_channels",
}


def config_from_yaml(path: str | os.PathLike) -> dict:
    """`VMBConfig` field values from a `detectron_config.yaml` (only the keys it sets)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise WeightsError(f"{path}: cannot read the detector config ({e.strerror or e})") from e
    except yaml.YAMLError as e:
        raise WeightsError(f"{path}: not a readable YAML detector config ({e})") from e
    model = data.get("MODEL") if isinstance(data, dict) else None
    if not isinstance(model, dict):
        raise WeightsError(f"{path}: expected a maskrcnn-benchmark config with a MODEL section")
    values = {}
    for (section, key), name in YAML_FIELDS.items():
        value = (model.get(section) or {}).get(key)
        if value is None:
            continue
        if isinstance(value, list):
            value = tuple(value)
        values[name] = value
    body = (model.get("BACKBONE") or {}).get("CONV_BODY")
    if body is not None:
        if body not in CONV_BODIES:
            raise WeightsError(f"{path}: MODEL.BACKBONE.CONV_BODY {body!r} is not an FPN body this detector builds "
                               f"({', '.join(CONV_BODIES)})")
        values["blocks"] = CONV_BODIES[body]
    classes = (model.get("ROI_BOX_HEAD") or {}).get("NUM_CLASSES")
    if classes is not None:
        values["num_classes"] = int(classes) - 1
    if (model.get("RPN") or {}).get("USE_FPN") is False:
        raise WeightsError(f"{path}: MODEL.RPN.USE_FPN is false; this detector is the FPN one")
    logger.info("%s: detector config values %s", path, values)
    return values


def read_vmb_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of a `detectron_model.pth` (`{"model": ...}` or a bare state dict), `module.` stripped."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(f"{path}: no such weight file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # not a torch.save file, or one naming globals torch refuses
        try:
            obj = safe_load(path)
        except WeightsError as plain:
            raise WeightsError(f"{path}: torch.load(weights_only=True) refused it ({str(e).splitlines()[0]}) "
                               f"and as a plain pickle: {plain}") from e
    except (RuntimeError, EOFError, OSError) as e:
        raise WeightsError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from e
    if isinstance(obj, Mapping) and "model" in obj:
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"{path}: expected the fork's checkpoint {{'model': state dict}}, got "
                           f"{type(obj).__name__}")
    names = list(obj)
    strip = all(isinstance(n, str) and n.startswith("module.") for n in names)
    state = {}
    for name, value in obj.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
        if not isinstance(value, torch.Tensor):
            raise WeightsError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")
        state[name.removeprefix("module.") if strip else name] = value
    return state


def load_vmb_weights(path: str | os.PathLike, model: nn.Module) -> dict:
    """Load `path` into `model` (a `VMBModel`, possibly on the meta device): missing tensors and wrong shapes are
    errors naming them, extra tensors are logged and ignored. Returns the weights' description for the store."""
    path = os.fspath(path)
    state = read_vmb_state_dict(path)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or wrong:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''})")
        if wrong:
            problems.append(f"{len(wrong)} of the wrong shape ({'; '.join(wrong[:3])}"
                            f"{'; ...' if len(wrong) > 3 else ''})")
        raise WeightsError(f"{path}: weights do not fit the {len(expected)}-tensor detector: {', '.join(problems)}")
    if extra:
        logger.info("%s: ignoring %d tensors the detector does not use: %s", path, len(extra),
                    ", ".join(extra[:8]) + (", ..." if len(extra) > 8 else ""))
    # assign: the model may have been built on the meta device, so its tensors become the file's
    model.load_state_dict({k: state[k].float().contiguous() for k in expected}, strict=True, assign=True)
    info = {"file": os.path.basename(path), "sha256": sha256_file(path), "format": "vmb"}
    logger.info("loaded VMB weights from %s (sha256 %s)", path, info["sha256"][:12])
    return info
