"""ViLBERT: a BERT text stream and a vision stream joined by co-attention layers (Lu et al., NeurIPS 2019).

Numerically the model of vilbert-multi-task: post-LN BERT layers, erf GELU,
LayerNorm eps 1e-12, additive -10000 masks, ReLU poolers, product fusion, the 12-in-1 task token.
Our parameter names differ from the reference's; `vilbert.convert` maps them (table in docs/architecture.md).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoModelForPreTraining, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from vilbert.configuration_vilbert import ViLBertConfig
from vilbert.errors import ConfigError

ACT_FNS = {"gelu": F.gelu, "relu": F.relu, "swish": F.silu, "silu": F.silu}  # F.gelu is the exact erf form


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, N] mask of 1 (attend) / 0 (ignore) -> [B, 1, 1, N] additive mask (1 - m) * -10000 in `dtype`."""
    return (1.0 - mask.to(dtype))[:, None, None, :] * -10000.0


def compute_dtype(parameter: torch.Tensor) -> torch.dtype:
    """The dtype attention scores will have: the autocast dtype when autocast is on, else the parameters'."""
    device_type = parameter.device.type
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return parameter.dtype


def attend(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, num_heads: int, dropout_p: float,
    output_attentions: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Multi-head scaled dot-product attention of `query` [B, Lq, D] over `key`/`value` [B, Lk, D].

    Returns the context [B, Lq, D] and, when `output_attentions`, the attention probabilities [B, h, Lq, Lk]
    (before dropout). The maps need the scores spelled out, so they come from an explicit softmax; the fused
    kernel (scaled_dot_product_attention) serves every call that does not ask for them.
    """
    batch, length, width = query.shape
    head_dim = width // num_heads

    def heads(x: torch.Tensor) -> torch.Tensor:  # [B, L, D] -> [B, h, L, d]
        return x.view(x.shape[0], x.shape[1], num_heads, head_dim).transpose(1, 2)

    q, k, v = heads(query), heads(key), heads(value)
    probs = None
    if output_attentions:
        scores = q @ k.transpose(-1, -2) * head_dim**-0.5 + mask.to(q.dtype)  # [B, h, Lq, Lk]
        probs = torch.softmax(scores, dim=-1)
        context = F.dropout(probs, dropout_p, training=dropout_p > 0).to(v.dtype) @ v  # [B, h, Lq, d]
    else:
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), dropout_p=dropout_p)
    return context.transpose(1, 2).reshape(batch, length, width), probs


# ---------------------------------------------------------------------------------------------------------------------
# Embeddings


class TextEmbeddings(nn.Module):
    """Word + position + token-type embeddings, the optional 12-in-1 task token after [CLS], LayerNorm, dropout."""

    def __init__(self, config: ViLBertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.task_embeddings = (
            nn.Embedding(config.num_task_tokens, config.hidden_size) if config.task_specific_tokens else None
        )
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, task_ids: torch.Tensor | None
    ) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        embedded = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
        embedded = embedded + self.token_type_embeddings(token_type_ids)  # [B, L, H]
        if self.task_embeddings is not None:
            if task_ids is None:
                raise ConfigError("task_ids: required when the config has task_specific_tokens")
            task = self.task_embeddings(task_ids.view(-1, 1))  # [B, 1, H], no position or type embedding
            embedded = torch.cat([embedded[:, :1], task, embedded[:, 1:]], dim=1)  # [B, L+1, H]
        return self.dropout(self.layer_norm(embedded))


class VisionEmbeddings(nn.Module):
    """Region feature and 5-d box location, each projected to the vision width, summed, LayerNorm, dropout."""

    def __init__(self, config: ViLBertConfig):
        super().__init__()
        self.feature_proj = nn.Linear(config.v_feature_size, config.v_hidden_size)
        self.location_proj = nn.Linear(5, config.v_hidden_size)
        self.layer_norm = nn.LayerNorm(config.v_hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)  # the reference uses the text dropout here

    def forward(self, features: torch.Tensor, locations: torch.Tensor) -> torch.Tensor:
        features = features.to(self.feature_proj.weight.dtype)  # float16 as stored: cast here, on the device
        embedded = self.feature_proj(features) + self.location_proj(locations.to(features.dtype))  # [B, R, Hv]
        return self.dropout(self.layer_norm(embedded))


# ---------------------------------------------------------------------------------------------------------------------
# Layers


class AddNorm(nn.Module):
    """Post-LN residual output: LayerNorm(residual + Dropout(dense(x)))."""

    def __init__(self, in_width: int, out_width: int, dropout: float, eps: float):
        super().__init__()
        self.dense = nn.Linear(in_width, out_width)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(out_width, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(self.dropout(self.dense(x)) + residual)


class FeedForward(nn.Module):
    """The position-wise FFN sublayer: width -> ffn_width -> activation -> width, residual, LayerNorm."""

    def __init__(self, width: int, ffn_width: int, activation: str, dropout: float, eps: float):
        super().__init__()
        self.intermediate = nn.Linear(width, ffn_width)
        self.activation = ACT_FNS[activation]
        self.output = AddNorm(ffn_width, width, dropout, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.activation(self.intermediate(x)), x)


class SelfAttention(nn.Module):
    """Multi-head self-attention projections (the scores go through scaled_dot_product_attention)."""

    def __init__(self, width: int, num_heads: int, dropout: float):
        super().__init__()
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.num_heads = num_heads
        self.dropout = dropout

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        dropout_p = self.dropout if self.training else 0.0
        return attend(
            self.query(x), self.key(x), self.value(x), mask, self.num_heads, dropout_p, output_attentions
        )  # [B, N, W], [B, h, N, N] or None


class TransformerLayer(nn.Module):
    """A post-LN BERT layer; the text stream's layers and (at their own widths) the vision stream's."""

    def __init__(
        self, width: int, num_heads: int, ffn_width: int, activation: str, dropout: float, attention_dropout: float,
        eps: float,
    ):
        super().__init__()
        self.attention = SelfAttention(width, num_heads, attention_dropout)
        self.attention_output = AddNorm(width, width, dropout, eps)
        self.ffn = FeedForward(width, ffn_width, activation, dropout, eps)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        context, probs = self.attention(x, mask, output_attentions)
        return self.ffn(self.attention_output(context, x)), probs


class CoAttention(nn.Module):
    """Two cross-attentions at the co-attention width: text queries over regions and region queries over text."""

    def __init__(self, config: ViLBertConfig):
        super().__init__()
        bi = config.bi_hidden_size
        self.vision_query = nn.Linear(config.v_hidden_size, bi)
        self.vision_key = nn.Linear(config.v_hidden_size, bi)
        self.vision_value = nn.Linear(config.v_hidden_size, bi)
        self.text_query = nn.Linear(config.hidden_size, bi)
        self.text_key = nn.Linear(config.hidden_size, bi)
        self.text_value = nn.Linear(config.hidden_size, bi)
        self.num_heads = config.bi_num_attention_heads
        self.text_over_vision_dropout = config.v_attention_probs_dropout_prob
        self.vision_over_text_dropout = config.attention_probs_dropout_prob

    def forward(
        self, text: torch.Tensor, text_mask: torch.Tensor, vision: torch.Tensor, vision_mask: torch.Tensor,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """-> text context [B, L, bi], vision context [B, R, bi], and when asked the maps (words over regions
        [B, h, L, R], regions over words [B, h, R, L])."""
        p_tv = self.text_over_vision_dropout if self.training else 0.0
        p_vt = self.vision_over_text_dropout if self.training else 0.0
        text_context, text_to_vision = attend(
            self.text_query(text), self.vision_key(vision), self.vision_value(vision), vision_mask, self.num_heads,
            p_tv, output_attentions,
        )
        vision_context, vision_to_text = attend(
            self.vision_query(vision), self.text_key(text), self.text_value(text), text_mask, self.num_heads, p_vt,
            output_attentions,
        )
        return text_context, vision_context, (text_to_vision, vision_to_text) if output_attentions else None

    def attend_within(self, stream: str, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One stream attending to itself through this layer's projections of that stream [B, N, bi]: the dual
        encoder's "self" half of the layer (no exchange between the streams)."""
        if stream == "text":
            query, key, value, p = self.text_query, self.text_key, self.text_value, self.vision_over_text_dropout
        else:
            query, key, value, p = self.vision_query, self.vision_key, self.vision_value, self.text_over_vision_dropout
        return attend(query(x), key(x), value(x), mask, self.num_heads, p if self.training else 0.0)[0]


class CoAttentionLayer(nn.Module):
    """Co-attention block: cross-attention replaces self-attention; each stream keeps its residual, LN and FFN."""

    def __init__(self, config: ViLBertConfig):
        super().__init__()
        eps = config.layer_norm_eps
        self.coattention = CoAttention(config)
        self.vision_output = AddNorm(config.bi_hidden_size, config.v_hidden_size, config.v_hidden_dropout_prob, eps)
        self.text_output = AddNorm(config.bi_hidden_size, config.hidden_size, config.hidden_dropout_prob, eps)
        self.vision_ffn = FeedForward(
            config.v_hidden_size, config.v_intermediate_size, config.v_hidden_act, config.v_hidden_dropout_prob, eps
        )
        self.text_ffn = FeedForward(
            config.hidden_size, config.intermediate_size, config.hidden_act, config.hidden_dropout_prob, eps
        )

    def forward(
        self, text: torch.Tensor, text_mask: torch.Tensor, vision: torch.Tensor, vision_mask: torch.Tensor,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        text_context, vision_context, maps = self.coattention(text, text_mask, vision, vision_mask, output_attentions)
        text = self.text_ffn(self.text_output(text_context, text))  # [B, L, H]
        vision = self.vision_ffn(self.vision_output(vision_context, vision))  # [B, R, Hv]
        return text, vision, maps

    def text_alone(self, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """The text half with text as its own context: attention, residual + LN, FFN [B, L, H]."""
        return self.text_ffn(self.text_output(self.coattention.attend_within("text", text, text_mask), text))

    def vision_alone(self, vision: torch.Tensor, vision_mask: torch.Tensor) -> torch.Tensor:
        """The vision half with the regions as their own context [B, R, Hv]."""
        context = self.coattention.attend_within("vision", vision, vision_mask)
        return self.vision_ffn(self.vision_output(context, vision))


# ---------------------------------------------------------------------------------------------------------------------
# Encoder


def layer_schedule(config: ViLBertConfig) -> list[tuple[str, int]]:
    """The executed layer order: ("T", i) text layer, ("V", i) vision layer, ("C", k) co-attention.

    For the k-th attachment pair (v_k, t_k): text layers up to t_k, vision layers up to v_k, then co-attention k;
    after the last pair the remaining vision layers, then the remaining text layers.
    """
    steps: list[tuple[str, int]] = []
    t_start = v_start = 0
    for k, (v_id, t_id) in enumerate(zip(config.v_biattention_id, config.t_biattention_id, strict=True)):
        steps += [("T", i) for i in range(t_start, t_id)]
        steps += [("V", i) for i in range(v_start, v_id)]
        if config.with_coattention:
            steps.append(("C", k))
        t_start, v_start = t_id, v_id
    steps += [("V", i) for i in range(v_start, config.v_num_hidden_layers)]
    steps += [("T", i) for i in range(t_start, config.num_hidden_layers)]
    return steps


@dataclass
class AttentionMaps:
    """Attention probabilities collected layer by layer (each list in layer-index order); see `attend`."""

    text: list[torch.Tensor] = field(default_factory=list)  # per text layer [B, h, L, L]
    vision: list[torch.Tensor] = field(default_factory=list)  # per vision layer [B, hv, R, R]
    text_to_vision: list[torch.Tensor] = field(default_factory=list)  # per co-attention layer [B, hb, L, R]
    vision_to_text: list[torch.Tensor] = field(default_factory=list)  # per co-attention layer [B, hb, R, L]

    def as_outputs(self) -> dict[str, tuple[torch.Tensor, ...]]:
        """The maps under the output dataclasses' field names."""
        return {
            "text_attentions": tuple(self.text),
            "vision_attentions": tuple(self.vision),
            "text_to_vision_attentions": tuple(self.text_to_vision),
            "vision_to_text_attentions": tuple(self.vision_to_text),
        }


class ViLBertEncoder(nn.Module):
    """Text layers, vision layers and co-attention layers, run in the order of `layer_schedule`."""

    def __init__(self, config: ViLBertConfig):
        super().__init__()
        eps = config.layer_norm_eps
        self.text_layers = nn.ModuleList(
            TransformerLayer(
                config.hidden_size, config.num_attention_heads, config.intermediate_size, config.hidden_act,
                config.hidden_dropout_prob, config.attention_probs_dropout_prob, eps,
            )
            for _ in range(config.num_hidden_layers)
        )
        self.vision_layers = nn.ModuleList(
            TransformerLayer(
                config.v_hidden_size, config.v_num_attention_heads, config.v_intermediate_size, config.v_hidden_act,
                config.v_hidden_dropout_prob, config.v_attention_probs_dropout_prob, eps,
            )
            for _ in range(config.v_num_hidden_layers)
        )
        self.coattention_layers = nn.ModuleList(CoAttentionLayer(config) for _ in config.v_biattention_id)
        self.schedule = layer_schedule(config)
        # the leading text-only layers: the text prefix, cacheable across images (reference fast_mode)
        self.num_prefix_steps = next((n for n, (kind, _) in enumerate(self.schedule) if kind != "T"), len(self.schedule))
        self.fixed_t_layer = config.fixed_t_layer
        self.fixed_v_layer = config.fixed_v_layer

    def run_text_prefix(
        self, text: torch.Tensor, text_mask: torch.Tensor, attentions: AttentionMaps | None = None
    ) -> torch.Tensor:
        """Run the text layers before the first co-attention or vision layer."""
        for _, index in self.schedule[: self.num_prefix_steps]:
            text = self._text_layer(index, text, text_mask, attentions)
        return text

    def forward(
        self, text: torch.Tensor, text_mask: torch.Tensor, vision: torch.Tensor, vision_mask: torch.Tensor,
        after_prefix: bool = False, attentions: AttentionMaps | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """text [B, L, H], vision [B, R, Hv], additive masks [B, 1, 1, L] / [B, 1, 1, R] -> final states of both.

        With `attentions`, every layer run appends its attention probabilities there (the explicit softmax path).
        """
        record = attentions is not None
        for kind, index in self.schedule[self.num_prefix_steps if after_prefix else 0 :]:
            if kind == "T":
                text = self._text_layer(index, text, text_mask, attentions)
            elif kind == "V":
                vision = self._vision_layer(index, vision, vision_mask, attentions)
            else:
                text, vision, maps = self.coattention_layers[index](text, text_mask, vision, vision_mask, record)
                if record:
                    attentions.text_to_vision.append(maps[0])
                    attentions.vision_to_text.append(maps[1])
        return text, vision

    def run_text_alone(
        self, text: torch.Tensor, text_mask: torch.Tensor, coattention: str, after_prefix: bool = False
    ) -> torch.Tensor:
        """The text stream without the regions (dual encoder): the text layers in schedule order, each
        co-attention layer skipped (`coattention` "skip") or run as text self-attention ("self")."""
        for kind, index in self.schedule[self.num_prefix_steps if after_prefix else 0 :]:
            if kind == "T":
                text = self._text_layer(index, text, text_mask)
            elif kind == "C" and coattention == "self":
                text = self.coattention_layers[index].text_alone(text, text_mask)
        return text

    def run_vision_alone(self, vision: torch.Tensor, vision_mask: torch.Tensor, coattention: str) -> torch.Tensor:
        """The vision stream without the text (dual encoder), as `run_text_alone`."""
        for kind, index in self.schedule:
            if kind == "V":
                vision = self._vision_layer(index, vision, vision_mask)
            elif kind == "C" and coattention == "self":
                vision = self.coattention_layers[index].vision_alone(vision, vision_mask)
        return vision

    def _text_layer(self, index: int, text: torch.Tensor, text_mask: torch.Tensor,
                    attentions: AttentionMaps | None = None) -> torch.Tensor:
        with torch.no_grad() if index < self.fixed_t_layer else contextlib.nullcontext():
            text, probs = self.text_layers[index](text, text_mask, attentions is not None)
        if attentions is not None:
            attentions.text.append(probs)
        return text

    def _vision_layer(self, index: int, vision: torch.Tensor, vision_mask: torch.Tensor,
                      attentions: AttentionMaps | None = None) -> torch.Tensor:
        with torch.no_grad() if index < self.fixed_v_layer else contextlib.nullcontext():
            vision, probs = self.vision_layers[index](vision, vision_mask, attentions is not None)
        if attentions is not None:
            attentions.vision.append(probs)
        return vision


# The encoder of each `config.architecture`; `vilbert.variants` adds the controlled variants (imported at the end).
ENCODERS: dict[str, type[ViLBertEncoder]] = {"vilbert": ViLBertEncoder}


class Pooler(nn.Module):
    """First position ([CLS] or IMG) -> Linear to the co-attention width -> ReLU."""

    def __init__(self, in_width: int, out_width: int):
        super().__init__()
        self.dense = nn.Linear(in_width, out_width)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.relu(self.dense(hidden[:, 0]))


class DualEncoderHead(nn.Module):
    """The dual encoder's output side: masked mean of a stream's final states, a linear projection to the shared
    `dual_embedding_size`, L2 normalisation; and the learned logit scale (1 / temperature, kept in log space)."""

    def __init__(self, config: ViLBertConfig):
        super().__init__()
        self.text_projection = nn.Linear(config.hidden_size, config.dual_embedding_size, bias=False)
        self.vision_projection = nn.Linear(config.v_hidden_size, config.dual_embedding_size, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.dual_temperature)))

    @staticmethod
    def embed(hidden: torch.Tensor, mask: torch.Tensor, projection: nn.Linear) -> torch.Tensor:
        """hidden [B, N, W], 1/0 mask [B, N] -> unit-length float32 embeddings [B, E]."""
        weights = mask.to(hidden.dtype)[..., None]  # [B, N, 1]
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # [B, W]
        return F.normalize(projection(pooled).float(), dim=-1)

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), capped at 100 as CLIP caps it (keeps the softmax from collapsing)."""
        return self.logit_scale.float().exp().clamp(max=100.0)


def fuse(pooled_text: torch.Tensor, pooled_vision: torch.Tensor, method: str) -> torch.Tensor:
    """Fuse the pooled streams: element-wise product ("mul", the released models) or sum."""
    return pooled_text * pooled_vision if method == "mul" else pooled_text + pooled_vision


# ---------------------------------------------------------------------------------------------------------------------
# The base model


@dataclass
class TextPrefix:
    """Text states after the text-only layers that precede the first co-attention, with the 2-D text mask.

    Computed once by `ViLBertModel.encode_text_prefix` and passed as `text_prefix=`; a batch-1 prefix is expanded
    to the image batch (the reference's fast_mode for retrieval evaluation).
    """

    hidden: torch.Tensor  # [B, L, H] (L includes the task token when there is one)
    attention_mask: torch.Tensor  # [B, L]


@dataclass
class ViLBertModelOutput(ModelOutput):
    """Final states of both streams, their pooled vectors, and (with output_attentions=True) the attention maps."""

    text_hidden: torch.Tensor | None = None  # [B, L, H]
    vision_hidden: torch.Tensor | None = None  # [B, R, Hv]
    pooled_text: torch.Tensor | None = None  # [B, Hb]
    pooled_vision: torch.Tensor | None = None  # [B, Hb]
    text_attentions: tuple[torch.Tensor, ...] | None = None  # per text layer [B, h, L, L]
    vision_attentions: tuple[torch.Tensor, ...] | None = None  # per vision layer [B, hv, R, R]
    text_to_vision_attentions: tuple[torch.Tensor, ...] | None = None  # per co-attention layer [B, hb, L, R]
    vision_to_text_attentions: tuple[torch.Tensor, ...] | None = None  # per co-attention layer [B, hb, R, L]
    text_embeds: torch.Tensor | None = None  # [B, E] dual encoder (with dual=True), unit length
    image_embeds: torch.Tensor | None = None  # [B, E]
    logit_scale: torch.Tensor | None = None  # [] exp(logit_scale), for the contrastive loss


class ViLBertPreTrainedModel(PreTrainedModel):
    """Weight init (normal(0, initializer_range), zero biases, LayerNorm 1/0) and save/load plumbing."""

    config_class = ViLBertConfig
    config: ViLBertConfig
    base_model_prefix = "vilbert"
    _supports_sdpa = True
    trains_word_embeddings = False  # a head reads them (the tied MLM decoder): they train despite frozen text layers
    # the heads on the fused pooled vector (the reference's "vil_" heads; fine-tuning may give them their own lr)
    pooled_heads: tuple[str, ...] = ()

    def text_stream_parameters(self) -> list[nn.Parameter]:
        """The parameters a BERT checkpoint initialises: text embeddings (not the task-token table) and text layers.

        The reference meant these to train at a tenth of the learning rate; trainers may group them.
        """
        base = getattr(self, self.base_model_prefix, self)
        embeddings = [p for n, p in base.embeddings.named_parameters() if not n.startswith("task_embeddings")]
        return embeddings + list(base.encoder.text_layers.parameters())

    def frozen_parameters(self) -> list[nn.Parameter]:
        """The parameters `fixed_t_layer` / `fixed_v_layer` leave without a gradient.

        Frozen layers run under `torch.no_grad()` and precede every co-attention (the config checks that), so
        nothing before them reaches the loss either: the frozen layers and their stream's embeddings get no
        gradient. The word embeddings are frozen with the text stream unless a head uses them (the tied MLM
        decoder of pretraining).
        """
        base = getattr(self, self.base_model_prefix, self)
        frozen: list[nn.Parameter] = []
        if self.config.fixed_t_layer > 0:
            frozen += [p for n, p in base.embeddings.named_parameters()
                       if not (n.startswith("word_embeddings.") and self.trains_word_embeddings)]
            frozen += list(base.encoder.text_layers[: self.config.fixed_t_layer].parameters())
        if self.config.fixed_v_layer > 0:
            frozen += list(base.vision_embeddings.parameters())
            frozen += list(base.encoder.vision_layers[: self.config.fixed_v_layer].parameters())
        return frozen

    def apply_frozen_flags(self) -> None:
        """`requires_grad=False` on `frozen_parameters()` (no gradient, optimizer state or DDP bucket), True on
        every other parameter."""
        frozen = {id(p) for p in self.frozen_parameters()}
        for parameter in self.parameters():
            parameter.requires_grad_(id(parameter) not in frozen)

    def post_init(self) -> None:
        super().post_init()
        self.apply_frozen_flags()

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """As `PreTrainedModel.from_pretrained`; loading makes new parameters, so the frozen flags are set again.

        transformers checks every load against a tensor-parallel plan and, for a model without one (all of ours),
        logs a several-KB "layers were not sharded" line listing every parameter: that check is quieted here.
        """
        tensor_parallel = logging.getLogger("transformers.distributed.tensor_parallel")
        level = tensor_parallel.level
        tensor_parallel.setLevel(logging.ERROR)
        try:
            loaded = super().from_pretrained(*args, **kwargs)
        finally:
            tensor_parallel.setLevel(level)
        (loaded[0] if isinstance(loaded, tuple) else loaded).apply_frozen_flags()
        return loaded

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)  # the padding row too, as the reference
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, MaskedLanguageModelHead):
            init.zeros_(module.bias)
        elif isinstance(module, DualEncoderHead):
            init.constant_(module.logit_scale, math.log(1.0 / self.config.dual_temperature))
        elif isinstance(module, LearnedMixinGate):
            init.constant_(module.smoothing_logit, MIXIN_SMOOTHING_INIT)


class ViLBertModel(ViLBertPreTrainedModel):
    """The two streams, the co-attention encoder and the two poolers."""

    def __init__(self, config: ViLBertConfig):
        super().__init__(config)
        self.embeddings = TextEmbeddings(config)
        self.vision_embeddings = VisionEmbeddings(config)
        self.encoder = ENCODERS[config.architecture](config)
        self.text_pooler = Pooler(config.hidden_size, config.bi_hidden_size)
        self.vision_pooler = Pooler(config.v_hidden_size, config.bi_hidden_size)
        self.dual = DualEncoderHead(config) if config.dual_embedding_size else None
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    def encode_text_prefix(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        task_ids: torch.Tensor | None = None,
        attentions: AttentionMaps | None = None,
    ) -> TextPrefix:
        """Embed the text and run the text layers before the first co-attention (cacheable across images).

        With `attentions`, the prefix layers append their maps there.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if self.embeddings.task_embeddings is not None:  # the task token is always attended
            attention_mask = torch.cat([attention_mask.new_ones(attention_mask.shape[0], 1), attention_mask], dim=1)
        text = self.embeddings(input_ids, token_type_ids, task_ids)  # [B, L, H]
        text_mask = additive_mask(attention_mask, compute_dtype(text))
        return TextPrefix(self.encoder.run_text_prefix(text, text_mask, attentions), attention_mask)

    # ----------------------------------------------------------------------------------------- dual encoder

    def dual_head(self) -> DualEncoderHead:
        if self.dual is None:
            raise ConfigError("dual_embedding_size: 0 in this model's config, so it has no dual encoder; train one "
                              "with the contrastive objective (data.contrastive_weight > 0)")
        return self.dual

    def embed_text_prefix(self, text_prefix: TextPrefix) -> torch.Tensor:
        """Dual-encoder text embeddings [B, E] from a text prefix: the rest of the text layers alone."""
        dual = self.dual_head()
        mask = additive_mask(text_prefix.attention_mask, compute_dtype(text_prefix.hidden))
        text = self.encoder.run_text_alone(text_prefix.hidden, mask, self.config.dual_coattention, after_prefix=True)
        return dual.embed(text, text_prefix.attention_mask, dual.text_projection)

    def embed_vision(self, vision: torch.Tensor, region_mask: torch.Tensor) -> torch.Tensor:
        """Dual-encoder image embeddings [B, E] from embedded regions [B, R, Hv] and their 1/0 mask [B, R]."""
        dual = self.dual_head()
        mask = additive_mask(region_mask, compute_dtype(vision))
        vision = self.encoder.run_vision_alone(vision, mask, self.config.dual_coattention)
        return dual.embed(vision, region_mask, dual.vision_projection)

    def encode_text(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        task_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Unit-length text embeddings [B, E] from the text stream alone (no regions)."""
        return self.embed_text_prefix(self.encode_text_prefix(input_ids, attention_mask, token_type_ids, task_ids))

    def encode_image(
        self, region_features: torch.Tensor, region_locations: torch.Tensor, region_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Unit-length image embeddings [B, E] from the vision stream alone (no text)."""
        if region_mask is None:
            region_mask = region_features.new_ones(region_features.shape[:2])
        return self.embed_vision(self.vision_embeddings(region_features, region_locations), region_mask)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        region_features: torch.Tensor | None = None,
        region_locations: torch.Tensor | None = None,
        region_mask: torch.Tensor | None = None,
        task_ids: torch.Tensor | None = None,
        text_prefix: TextPrefix | None = None,
        output_attentions: bool | None = None,
        dual: bool = False,
    ) -> ViLBertModelOutput:
        """The co-attention forward. `output_attentions` (default: config.output_attentions) adds every layer's
        attention probabilities, computed by an explicit softmax instead of the fused kernel (the other outputs stay
        the same); `dual` adds the dual encoder's embeddings of the same text and regions (the text prefix is
        shared) and its logit scale."""
        if region_features is None or region_locations is None:
            raise ConfigError("region_features and region_locations: required")
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        attentions = AttentionMaps() if output_attentions else None
        if text_prefix is None:
            if input_ids is None:
                raise ConfigError("input_ids: required unless text_prefix is given")
            text_prefix = self.encode_text_prefix(input_ids, attention_mask, token_type_ids, task_ids, attentions)
        elif attentions is not None:
            raise ConfigError("output_attentions: needs input_ids, not text_prefix (the prefix layers' maps are gone); "
                              "or pass attentions= to encode_text_prefix")
        batch = region_features.shape[0]
        if region_mask is None:
            region_mask = region_features.new_ones(region_features.shape[:2])
        vision = self.vision_embeddings(region_features, region_locations)  # [B, R, Hv]
        dual_outputs = {}
        if dual:
            dual_outputs = {"text_embeds": self.embed_text_prefix(text_prefix),
                            "image_embeds": self.embed_vision(vision, region_mask),
                            "logit_scale": self.dual_head().scale()}

        text, text_mask_2d = text_prefix.hidden, text_prefix.attention_mask
        if text.shape[0] == 1 and batch > 1:  # one caption against many images
            text, text_mask_2d = text.expand(batch, -1, -1), text_mask_2d.expand(batch, -1)
        dtype = compute_dtype(vision)
        text_mask, vision_mask = additive_mask(text_mask_2d, dtype), additive_mask(region_mask, dtype)
        text, vision = self.encoder(text, text_mask, vision, vision_mask, after_prefix=True, attentions=attentions)
        return ViLBertModelOutput(
            text_hidden=text,
            vision_hidden=vision,
            pooled_text=self.text_pooler(text),
            pooled_vision=self.vision_pooler(vision),
            **(attentions.as_outputs() if attentions is not None else {}),
            **dual_outputs,
        )


# ---------------------------------------------------------------------------------------------------------------------
# Heads


class PredictionTransform(nn.Module):
    """dense, activation, LayerNorm: the shared front of the MLM and region-class heads."""

    def __init__(self, width: int, activation: str, eps: float):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.activation = ACT_FNS[activation]
        self.layer_norm = nn.LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(self.activation(self.dense(x)))


class MaskedLanguageModelHead(nn.Module):
    """Transform, then a decoder tied to the word embeddings, plus its own output bias."""

    def __init__(self, config: ViLBertConfig):
        super().__init__()
        self.transform = PredictionTransform(config.hidden_size, config.hidden_act, config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.decoder(self.transform(hidden))  # [..., V]
        return logits + self.bias.to(logits.dtype)  # keeps bf16 logits bf16 under autocast


class RegionClassHead(nn.Module):
    """Transform, then Linear to the detector's class distribution (v_target_size, background at 0)."""

    def __init__(self, config: ViLBertConfig):
        super().__init__()
        # the reference's visual transform applies the *text* activation (hidden_act)
        self.transform = PredictionTransform(config.v_hidden_size, config.hidden_act, config.layer_norm_eps)
        self.decoder = nn.Linear(config.v_hidden_size, config.v_target_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden))  # [..., C]


class AnswerClassifier(nn.Module):
    """Two-layer classifier on the fused pooled vector.

    "multi-task": Linear, GELU, LayerNorm, Linear (vilbert-multi-task SimpleClassifier, its dropout unused);
    "beta": Linear, ReLU, Dropout, Linear (vilbert_beta, with the weight norm folded into the weights).
    """

    def __init__(self, in_width: int, hidden_width: int, num_outputs: int, kind: str, dropout: float, eps: float):
        super().__init__()
        self.kind = kind
        self.dense = nn.Linear(in_width, hidden_width)
        if kind == "multi-task":
            self.layer_norm = nn.LayerNorm(hidden_width, eps=eps)
        else:
            self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_width, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "multi-task":
            return self.classifier(self.layer_norm(F.gelu(self.dense(x))))
        return self.classifier(self.dropout(F.relu(self.dense(x))))


class QuestionOnlyBranch(nn.Module):
    """RUBi's question-only branch: an MLP from the question's encoding (the text stream before co-attention,
    mean-pooled) to answer logits, whose sigmoid masks the fused logits in training, and a linear classifier on
    those logits (trained on the answers alone)."""

    def __init__(self, in_width: int, hidden_width: int, num_outputs: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_width, hidden_width), nn.ReLU(), nn.Linear(hidden_width, num_outputs))
        self.classifier = nn.Linear(num_outputs, num_outputs)

    def forward(self, pooled_text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask_logits = self.mlp(pooled_text)
        return mask_logits, self.classifier(mask_logits)


MIXIN_SMOOTHING_INIT = -1.0  # Clark et al.'s initial smoothing logit: the prior starts smoothed by sigmoid(-1) = 0.27


class LearnedMixinGate(nn.Module):
    """Learned-Mixin's parameters: a gate on the fused pooled vector (the prior's learned power g(x) is its softplus)
    and one learned logit s whose sigmoid smooths the answer prior (b + sigmoid(s), 1 - b + sigmoid(s))."""

    def __init__(self, width: int):
        super().__init__()
        self.gate = nn.Linear(width, 1)
        self.smoothing_logit = nn.Parameter(torch.full((1,), MIXIN_SMOOTHING_INIT))

    def forward(self, fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate logit [B], smoothing logit [B]: the one learned value, per question)."""
        return self.gate(fused).squeeze(-1), self.smoothing_logit.expand(fused.shape[0]).clone()


def _select(hidden: torch.Tensor, selected: torch.Tensor, count: int) -> torch.Tensor:
    """Rows of hidden [B, N, D] where selected [B, N] is true, in nonzero order -> [count, D] (no host sync)."""
    index = torch.nonzero_static(selected.flatten(), size=count).squeeze(1)
    return hidden.flatten(0, 1).index_select(0, index)


# ---------------------------------------------------------------------------------------------------------------------
# Pretraining


@dataclass
class ViLBertPreTrainingOutput(ModelOutput):
    """Losses (when labels are given) and the three heads' logits.

    With labels, `mlm_logits` is [N, V] over the labelled tokens and `region_logits` [M, C] over the masked
    regions (both in nonzero order); without labels they are [B, L, V] and [B, R, C].
    """

    loss: torch.Tensor | None = None
    mlm_loss: torch.Tensor | None = None
    region_loss: torch.Tensor | None = None
    alignment_loss: torch.Tensor | None = None
    alignment_logits: torch.Tensor | None = None  # [B, 2], index 0 = aligned
    mlm_logits: torch.Tensor | None = None
    region_logits: torch.Tensor | None = None
    text_hidden: torch.Tensor | None = None
    vision_hidden: torch.Tensor | None = None
    pooled_text: torch.Tensor | None = None
    pooled_vision: torch.Tensor | None = None
    text_attentions: tuple[torch.Tensor, ...] | None = None  # per text layer [B, h, L, L]
    vision_attentions: tuple[torch.Tensor, ...] | None = None  # per vision layer [B, hv, R, R]
    text_to_vision_attentions: tuple[torch.Tensor, ...] | None = None  # per co-attention layer [B, hb, L, R]
    vision_to_text_attentions: tuple[torch.Tensor, ...] | None = None  # per co-attention layer [B, hb, R, L]
    text_embeds: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    logit_scale: torch.Tensor | None = None


class ViLBertWithPretrainingHeads(ViLBertPreTrainedModel):
    """The base model plus the three pretraining heads and the dropout on the fused pooled vector.

    Shared by `ViLBertForPreTraining` and `ViLBertForVLTasks` (the reference's task model keeps these heads too);
    subclasses add their heads and call `post_init()`.
    """

    _tied_weights_keys = {"mlm_head.decoder.weight": "vilbert.embeddings.word_embeddings.weight"}

    def __init__(self, config: ViLBertConfig):
        super().__init__(config)
        self.vilbert = ViLBertModel(config)
        self.mlm_head = MaskedLanguageModelHead(config)
        self.region_head = RegionClassHead(config)
        self.alignment_head = nn.Linear(config.bi_hidden_size, 2)
        self.dropout = nn.Dropout(config.head_dropout_prob)

    def get_output_embeddings(self) -> nn.Linear:
        return self.mlm_head.decoder

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.mlm_head.decoder = value

    def fused_pooled(self, base: ViLBertModelOutput) -> torch.Tensor:
        """Dropout(pooled_text ∘ pooled_vision) [B, Hb]: the input of the alignment and pooled-output heads."""
        return self.dropout(fuse(base.pooled_text, base.pooled_vision, self.config.fusion_method))

    def encode_text(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        task_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The base model's dual-encoder text embeddings [B, E]."""
        return self.vilbert.encode_text(input_ids, attention_mask, token_type_ids, task_ids)

    def encode_image(
        self, region_features: torch.Tensor, region_locations: torch.Tensor, region_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The base model's dual-encoder image embeddings [B, E]."""
        return self.vilbert.encode_image(region_features, region_locations, region_mask)


class ViLBertForPreTraining(ViLBertWithPretrainingHeads):
    """Masked language modelling, masked region classification (KL to the detector's classes) and alignment."""

    trains_word_embeddings = True  # the MLM decoder is tied to them

    def __init__(self, config: ViLBertConfig):
        super().__init__(config)
        self.post_init()

    def alignment_logits(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        region_features: torch.Tensor | None = None,
        region_locations: torch.Tensor | None = None,
        region_mask: torch.Tensor | None = None,
        text_prefix: TextPrefix | None = None,
    ) -> torch.Tensor:
        """The alignment head's logits [B, 2] (index 0: aligned) alone: what scoring pairs needs, without the MLM
        logits over the whole vocabulary and the region logits that `forward` also computes."""
        base = self.vilbert(input_ids, attention_mask, token_type_ids, region_features, region_locations, region_mask,
                            text_prefix=text_prefix)
        return self.alignment_head(self.fused_pooled(base))

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        region_features: torch.Tensor | None = None,
        region_locations: torch.Tensor | None = None,
        region_mask: torch.Tensor | None = None,
        task_ids: torch.Tensor | None = None,
        mlm_labels: torch.Tensor | None = None,
        region_labels: torch.Tensor | None = None,
        region_targets: torch.Tensor | None = None,
        alignment_labels: torch.Tensor | None = None,
        text_prefix: TextPrefix | None = None,
        labelled_counts: tuple[int, int] | None = None,
        output_attentions: bool | None = None,
        dual: bool = False,
    ) -> ViLBertPreTrainingOutput:
        """`labelled_counts` = (positions with an MLM label, masked regions), when the caller knows them on the host
        (the pretraining collate does): it saves the forward's one device-to-host sync. `dual` adds the dual
        encoder's embeddings to the output (for the contrastive loss)."""
        base = self.vilbert(
            input_ids, attention_mask, token_type_ids, region_features, region_locations, region_mask, task_ids,
            text_prefix=text_prefix, output_attentions=output_attentions, dual=dual,
        )
        alignment_logits = self.alignment_head(self.fused_pooled(base))  # [B, 2]

        mlm_selected = mlm_labels != -100 if mlm_labels is not None else None
        region_selected = region_labels == 1 if region_labels is not None else None
        if region_selected is not None and region_targets is None:
            raise ConfigError("region_targets: required with region_labels")
        selected = [m for m in (mlm_selected, region_selected) if m is not None]
        if labelled_counts is not None:
            counts = [n for n, m in zip(labelled_counts, (mlm_selected, region_selected), strict=True) if m is not None]
        else:  # the one host sync: how many positions carry a label
            counts = torch.stack([m.sum() for m in selected]).tolist() if selected else []

        mlm_loss = region_loss = alignment_loss = None
        if mlm_selected is not None:
            num_tokens = counts.pop(0)
            mlm_logits = self.mlm_head(_select(base.text_hidden, mlm_selected, num_tokens))  # [N, V]
            targets = _select(mlm_labels[..., None], mlm_selected, num_tokens).squeeze(1)
            mlm_loss = F.cross_entropy(mlm_logits.float(), targets, reduction="sum") / max(num_tokens, 1)
        else:
            mlm_logits = self.mlm_head(base.text_hidden)  # [B, L, V]
        if region_selected is not None:
            num_regions = counts.pop(0)
            region_logits = self.region_head(_select(base.vision_hidden, region_selected, num_regions))  # [M, C]
            targets = _select(region_targets, region_selected, num_regions).float()
            log_probs = F.log_softmax(region_logits.float(), dim=-1)
            region_loss = F.kl_div(log_probs, targets, reduction="sum") / max(num_regions, 1)
        else:
            region_logits = self.region_head(base.vision_hidden)  # [B, R, C]
        if alignment_labels is not None:
            alignment_loss = F.cross_entropy(alignment_logits.float(), alignment_labels.view(-1))

        losses = [x for x in (mlm_loss, region_loss, alignment_loss) if x is not None]
        return ViLBertPreTrainingOutput(
            loss=torch.stack(losses).sum() if losses else None,
            mlm_loss=mlm_loss,
            region_loss=region_loss,
            alignment_loss=alignment_loss,
            alignment_logits=alignment_logits,
            mlm_logits=mlm_logits,
            region_logits=region_logits,
            **base,
        )


# ---------------------------------------------------------------------------------------------------------------------
# Vision-and-language tasks

VL_HEADS = (
    "answer_logits",
    "gqa_answer_logits",
    "pair_logit",
    "binary_logits",
    "tri_logits",
    "region_logits",
    "token_logits",
    "region_class_logits",
)
# The debiasing branches' outputs: asked for by name only, by models whose config has the branch.
DEBIAS_HEADS = ("question_only_logits", "question_only_answer_logits", "mixin_gate_logit", "mixin_smoothing_logit")
# The module behind each head output: what a checkpoint must hold for a task that reads that output.
HEAD_MODULES = {
    "answer_logits": "answer_head",
    "gqa_answer_logits": "gqa_answer_head",
    "pair_logit": "pair_head",
    "binary_logits": "binary_head",
    "tri_logits": "tri_head",
    "region_logits": "region_score_head",
    "token_logits": "token_score_head",
    "region_class_logits": "region_head",
}


@dataclass
class ViLBertForVLTasksOutput(ModelOutput):
    """Every task head's output (None for heads not asked for), and the base outputs."""

    answer_logits: torch.Tensor | None = None  # [B, num_labels]
    gqa_answer_logits: torch.Tensor | None = None  # [B, gqa_num_labels]
    pair_logit: torch.Tensor | None = None  # [B]
    binary_logits: torch.Tensor | None = None  # [B/2, 2], pairs of consecutive rows; None when B is odd
    tri_logits: torch.Tensor | None = None  # [B, 3]
    region_logits: torch.Tensor | None = None  # [B, R], padded regions -10000
    token_logits: torch.Tensor | None = None  # [B, L]
    region_class_logits: torch.Tensor | None = None  # [B, R, v_target_size]
    question_only_logits: torch.Tensor | None = None  # [B, question_only_labels], from the text before co-attention
    question_only_answer_logits: torch.Tensor | None = None  # [B, question_only_labels]
    mixin_gate_logit: torch.Tensor | None = None  # [B], before the softplus
    mixin_smoothing_logit: torch.Tensor | None = None  # [B] (one learned value), before the sigmoid
    text_hidden: torch.Tensor | None = None
    vision_hidden: torch.Tensor | None = None
    pooled_text: torch.Tensor | None = None
    pooled_vision: torch.Tensor | None = None
    text_attentions: tuple[torch.Tensor, ...] | None = None  # per text layer [B, h, L, L]
    vision_attentions: tuple[torch.Tensor, ...] | None = None  # per vision layer [B, hv, R, R]
    text_to_vision_attentions: tuple[torch.Tensor, ...] | None = None  # per co-attention layer [B, hb, L, R]
    vision_to_text_attentions: tuple[torch.Tensor, ...] | None = None  # per co-attention layer [B, hb, R, L]
    text_embeds: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    logit_scale: torch.Tensor | None = None


class ViLBertForVLTasks(ViLBertWithPretrainingHeads):
    """Every head of the reference VILBertForVLTasks, plus its pretraining heads (they convert and load too)."""

    pooled_heads = ("answer_head", "gqa_answer_head", "binary_head", "pair_head", "tri_head")

    def __init__(self, config: ViLBertConfig):
        super().__init__(config)
        bi, eps = config.bi_hidden_size, config.layer_norm_eps
        self.answer_head = AnswerClassifier(
            bi, 2 * bi, config.num_labels, config.answer_head_type, config.answer_head_dropout_prob, eps
        )
        self.gqa_answer_head = AnswerClassifier(bi, 2 * bi, config.gqa_num_labels, "multi-task", 0.0, eps)
        self.binary_head = AnswerClassifier(2 * bi, 2 * bi, 2, "multi-task", 0.0, eps)
        self.pair_head = nn.Linear(bi, 1)
        self.tri_head = nn.Linear(bi, 3)
        self.region_score_head = nn.Linear(config.v_hidden_size, 1)
        self.token_score_head = nn.Linear(config.hidden_size, 1)
        if config.question_only_labels:
            self.question_only_branch = QuestionOnlyBranch(config.hidden_size, 2 * bi, config.question_only_labels)
        if config.mixin_gate:
            self.mixin_gate = LearnedMixinGate(bi)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        region_features: torch.Tensor | None = None,
        region_locations: torch.Tensor | None = None,
        region_mask: torch.Tensor | None = None,
        task_ids: torch.Tensor | None = None,
        heads: Iterable[str] | None = None,
        text_prefix: TextPrefix | None = None,
        output_attentions: bool | None = None,
        dual: bool = False,
    ) -> ViLBertForVLTasksOutput:
        wanted = set(VL_HEADS if heads is None else heads)
        if unknown := wanted - set(VL_HEADS) - set(DEBIAS_HEADS):
            raise ConfigError(f"heads: unknown head(s) {sorted(unknown)}; expected names from "
                              f"{VL_HEADS + DEBIAS_HEADS}")
        question = None
        if wanted & {"question_only_logits", "question_only_answer_logits"}:
            if not self.config.question_only_labels:
                raise ConfigError("heads: question_only_logits needs question_only_labels > 0 in the model config")
            prefix = text_prefix or self.vilbert.encode_text_prefix(input_ids, attention_mask, token_type_ids, task_ids)
            if not output_attentions:
                text_prefix = prefix  # the same text layers, run once
            # RUBi's question encoding: the text before any co-attention (it has not seen the image), mean over its
            # tokens, detached: the question-only loss does not train the question encoder
            mask = prefix.attention_mask.unsqueeze(-1).to(prefix.hidden.dtype)
            question = ((prefix.hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).detach()
        base = self.vilbert(
            input_ids, attention_mask, token_type_ids, region_features, region_locations, region_mask, task_ids,
            text_prefix=text_prefix, output_attentions=output_attentions, dual=dual,
        )
        out = ViLBertForVLTasksOutput(**base)
        if question is not None:
            out.question_only_logits, out.question_only_answer_logits = self.question_only_branch(question)
        if wanted & {"answer_logits", "gqa_answer_logits", "pair_logit", "binary_logits", "tri_logits",
                     "mixin_gate_logit", "mixin_smoothing_logit"}:
            fused = self.fused_pooled(base)  # [B, Hb]
            if "answer_logits" in wanted:
                out.answer_logits = self.answer_head(fused)
            if "gqa_answer_logits" in wanted:
                out.gqa_answer_logits = self.gqa_answer_head(fused)
            if "pair_logit" in wanted:
                out.pair_logit = self.pair_head(fused).squeeze(-1)
            if "binary_logits" in wanted and fused.shape[0] % 2 == 0:
                out.binary_logits = self.binary_head(fused.reshape(fused.shape[0] // 2, 2 * fused.shape[1]))
            if "tri_logits" in wanted:
                out.tri_logits = self.tri_head(fused)
            if wanted & {"mixin_gate_logit", "mixin_smoothing_logit"}:
                if not self.config.mixin_gate:
                    raise ConfigError("heads: mixin_gate_logit and mixin_smoothing_logit need mixin_gate: true in the "
                                      "model config")
                out.mixin_gate_logit, out.mixin_smoothing_logit = self.mixin_gate(fused)
        if "region_logits" in wanted:
            vision = base.vision_hidden
            if region_mask is None:
                region_mask = vision.new_ones(vision.shape[:2])
            scores = self.region_score_head(self.dropout(vision)).squeeze(-1)  # [B, R]
            out.region_logits = scores + (1.0 - region_mask.to(scores.dtype)) * -10000.0
        if "token_logits" in wanted:
            out.token_logits = self.token_score_head(self.dropout(base.text_hidden)).squeeze(-1)  # [B, L]
        if "region_class_logits" in wanted:
            out.region_class_logits = self.region_head(base.vision_hidden)  # [B, R, C]
        return out


# `AutoModel.from_pretrained(dir)` of a ViLBERT directory, once this module is imported
AutoModel.register(ViLBertConfig, ViLBertModel, exist_ok=True)
AutoModelForPreTraining.register(ViLBertConfig, ViLBertForPreTraining, exist_ok=True)

# The controlled variants add their encoders to ENCODERS. Imported last, once every name vilbert.variants takes from
# here exists, so that any import of the model knows every architecture (the package itself loads lazily).
from vilbert import variants  # noqa: E402, F401
