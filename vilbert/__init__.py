"""ViLBERT: the two-stream co-attention model, its configuration and checkpoint conversion.

The package loads lazily (PEP 562): `import vilbert` and `import vilbert.errors` import neither torch nor
transformers, so the command line starts fast; the first name asked for imports its module. The modules register
the model with transformers' Auto classes where they define it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# public name -> the module under vilbert that defines it
_EXPORTS: dict[str, str] = {
    "PRESETS": "configuration_vilbert",
    "ViLBertConfig": "configuration_vilbert",
    "VL_HEADS": "modeling_vilbert",
    "AttentionMaps": "modeling_vilbert",
    "TextPrefix": "modeling_vilbert",
    "ViLBertForPreTraining": "modeling_vilbert",
    "ViLBertForVLTasks": "modeling_vilbert",
    "ViLBertForVLTasksOutput": "modeling_vilbert",
    "ViLBertModel": "modeling_vilbert",
    "ViLBertModelOutput": "modeling_vilbert",
    "ViLBertPreTrainingOutput": "modeling_vilbert",
    "depth_overrides": "variants",
}

__all__ = [
    "AttentionMaps",
    "PRESETS",
    "VL_HEADS",
    "TextPrefix",
    "ViLBertConfig",
    "ViLBertForPreTraining",
    "ViLBertPreTrainingOutput",
    "ViLBertForVLTasks",
    "ViLBertForVLTasksOutput",
    "ViLBertModel",
    "ViLBertModelOutput",
    "depth_overrides",
]

if TYPE_CHECKING:
    from vilbert.configuration_vilbert import PRESETS, ViLBertConfig
    from vilbert.modeling_vilbert import (
        VL_HEADS,
        AttentionMaps,
        TextPrefix,
        ViLBertForPreTraining,
        ViLBertForVLTasks,
        ViLBertForVLTasksOutput,
        ViLBertModel,
        ViLBertModelOutput,
        ViLBertPreTrainingOutput,
    )
    from vilbert.variants import depth_overrides


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vilbert' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"vilbert.{_EXPORTS[name]}"), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
