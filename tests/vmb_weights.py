"""A stand-in for the released `detectron_model.pth`: the exact 810 keys and shapes, random values.

The key list (tests/data/vmb-x152-fpn-keys.tsv) is a copy of reference/vmb-x152-fpn-keys.tsv, itself read from
the real checkpoint's load log. Each weight is one random value per output channel broadcast over the rest
(a stride-0 view), so the full-size file is a few hundred kilobytes instead of 826 MB but loads into the same
shapes; the cell anchors are the fork's (reference appendix), as the real file holds them.
"""

import json
from pathlib import Path

import torch

from features.vmb import fork_cell_anchors

KEYS_FILE = Path(__file__).parent / "data" / "vmb-x152-fpn-keys.tsv"
ANCHOR_STRIDES = (4, 8, 16, 32, 64)
ANCHOR_SIZES = (32, 64, 128, 256, 512)


def reference_keys() -> dict[str, tuple[int, ...]]:
    """key -> shape, in the checkpoint's module order."""
    lines = KEYS_FILE.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "key\tshape"
    return {key: tuple(json.loads(shape)) for key, shape in (line.split("\t") for line in lines[1:])}


def random_vmb_state(seed: int = 0, prefix: str = "") -> dict[str, torch.Tensor]:
    """The 810 tensors with random values (BN variances positive), keys optionally prefixed (`module.`)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in reference_keys().items():
        if "cell_anchors." in key:
            level = int(key.rsplit(".", 1)[1])
            value = fork_cell_anchors(ANCHOR_STRIDES[level], ANCHOR_SIZES[level], (0.5, 1.0, 2.0))
        elif key.endswith("running_var"):
            value = torch.rand(shape, generator=gen) + 0.5
        else:
            per_channel = torch.randn(shape[0], generator=gen) * 0.02
            value = per_channel.view(-1, *([1] * (len(shape) - 1))).expand(shape)
        state[prefix + key] = value
    return state


def write_random_vmb_weights(path: Path, seed: int = 0, prefix: str = "", extra: dict | None = None) -> Path:
    """The fork's checkpointer layout: {"model": state dict, "iteration": ...}."""
    state = random_vmb_state(seed, prefix)
    state.update(extra or {})
    torch.save({"model": state, "iteration": 0}, path)
    return path
