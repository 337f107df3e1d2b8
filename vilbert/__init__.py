"""ViLBERT: the two-stream co-attention model, its configuration and checkpoint conversion."""

from transformers import AutoConfig, AutoModel, AutoModelForPreTraining

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
from vilbert.variants import depth_overrides  # importing vilbert.variants registers the variants' encoders

AutoConfig.register("vilbert", ViLBertConfig, exist_ok=True)
AutoModel.register(ViLBertConfig, ViLBertModel, exist_ok=True)
AutoModelForPreTraining.register(ViLBertConfig, ViLBertForPreTraining, exist_ok=True)

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
