"""Controlled variants of ViLBERT's encoder, chosen by `config.architecture`: the paper's ablations and two more.

Every variant keeps the faithful model's embeddings, poolers, heads, forward signature and output dataclasses; only
the encoder between the embeddings and the poolers changes, and only the layers it runs are built:

- "vilbert": the faithful encoder (`modeling_vilbert.ViLBertEncoder`, `layer_schedule`), unchanged.
- "single-stream": one BERT stream over [text; regions] (the paper's Table 1 baseline, VisualBERT-like). The text
  layers read both; the regions carry a learned modality embedding (the text its token-type embedding), so the
  stream loads from the same BERT text initialisation. Needs v_hidden_size = hidden_size; builds no vision or
  co-attention layers. Attention maps: each layer's joint map cut into its text-text, region-region,
  word-over-region and region-over-word blocks (blocks of one softmax over all L + R keys, so a block's rows sum
  to the share of attention that went there, not to 1).
- "coattention-only": the within-modality layers between co-attention blocks removed. The text stream keeps its
  layers below the first block (t_biattention_id[0]), the vision stream only its co-attention blocks, which run
  one after another.
- "sequential": the vision stream runs to its end first; the text stream then cross-attends to its output, one
  way, at each t_biattention_id (text queries over the regions; no vision-from-text path). The cross-attention maps
  are words over regions only (`vision_to_text_attentions` is empty).
- "late-fusion": the two streams never meet before the pooled outputs (the lower bound). No cross maps.

The co-attention depth of "vilbert", "coattention-only" and "sequential" is the number of attachment pairs
(`v_biattention_id`, `t_biattention_id`); `depth_overrides` places N of them as the published N-layer models do.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vilbert.configuration_vilbert import ViLBertConfig
from vilbert.errors import ConfigError
from vilbert.modeling_vilbert import (
    ENCODERS,
    AddNorm,
    AttentionMaps,
    FeedForward,
    ViLBertEncoder,
    attend,
    layer_schedule,
)


def depth_overrides(num_text_layers: int, depth: int, fixed_t_layer: int = 0) -> dict[str, Any]:
    """Config fields for `depth` co-attention blocks, placed as the published N-layer models place them: N vision
    layers, a block before each, and before each of the last N text layers; `fixed_t_layer` is lowered to the first
    block when it would freeze layers above it."""
    if not 1 <= depth <= num_text_layers:
        raise ConfigError(f"co-attention depth {depth}: impossible with {num_text_layers} text layers (each block "
                          f"runs before its own text layer: 1..{num_text_layers})")
    first = num_text_layers - depth
    return {"v_num_hidden_layers": depth, "v_biattention_id": list(range(depth)),
            "t_biattention_id": list(range(first, num_text_layers)), "fixed_t_layer": min(fixed_t_layer, first)}


def variant_schedule(config: ViLBertConfig) -> list[tuple[str, int]]:
    """The executed layer order of `config.architecture`: ("T", i) text layer, ("V", i) vision layer, ("C", k)
    co-attention block, ("X", k) one-way text-over-vision block (sequential)."""
    architecture, t_ids = config.architecture, config.t_biattention_id
    text = [("T", i) for i in range(config.num_hidden_layers)]
    vision = [("V", i) for i in range(config.v_num_hidden_layers)]
    first = t_ids[0] if t_ids else config.num_hidden_layers
    if architecture == "vilbert":
        return layer_schedule(config)
    if architecture == "single-stream":
        return text
    if architecture == "late-fusion":
        return text + vision
    if architecture == "coattention-only":
        return text[:first] + [("C", k) for k in range(len(t_ids))]
    if architecture == "sequential":
        steps = text[:first] + vision  # the text prefix before the vision stream: it does not read the regions
        for k, (start, end) in enumerate(zip(t_ids, [*t_ids[1:], config.num_hidden_layers], strict=True)):
            steps += [("X", k), *text[start:end]]
        return steps
    raise ConfigError(f"architecture: unknown {architecture!r}")


def text_to_vision_maps(config: ViLBertConfig) -> int:
    """How many words-over-regions maps (`text_to_vision_attentions`) the encoder of `config` returns: one per
    co-attention block or one-way block, one per layer of the single stream, none for late fusion."""
    if config.architecture == "single-stream":
        return config.num_hidden_layers
    return sum(kind in ("C", "X") for kind, _ in variant_schedule(config))


def _count(schedule: list[tuple[str, int]], kind: str) -> int:
    """How many layers of `kind` the schedule runs (indices are 0..n-1)."""
    return 1 + max((index for k, index in schedule if k == kind), default=-1)


class TextOverVisionLayer(nn.Module):
    """One-way co-attention block: text queries over the regions replace the text's self-attention; the text keeps
    its residual, LayerNorm and FFN; the regions pass unchanged."""

    def __init__(self, config: ViLBertConfig):
        super().__init__()
        bi, eps = config.bi_hidden_size, config.layer_norm_eps
        self.text_query = nn.Linear(config.hidden_size, bi)
        self.vision_key = nn.Linear(config.v_hidden_size, bi)
        self.vision_value = nn.Linear(config.v_hidden_size, bi)
        self.num_heads = config.bi_num_attention_heads
        self.dropout = config.v_attention_probs_dropout_prob
        self.text_output = AddNorm(bi, config.hidden_size, config.hidden_dropout_prob, eps)
        self.text_ffn = FeedForward(
            config.hidden_size, config.intermediate_size, config.hidden_act, config.hidden_dropout_prob, eps
        )

    def forward(
        self, text: torch.Tensor, vision: torch.Tensor, vision_mask: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> text [B, L, H] and, when asked, the words-over-regions map [B, hb, L, R]."""
        context, probs = attend(
            self.text_query(text), self.vision_key(vision), self.vision_value(vision), vision_mask, self.num_heads,
            self.dropout if self.training else 0.0, output_attentions,
        )  # [B, L, bi]
        return self.text_ffn(self.text_output(context, text)), probs


class VariantEncoder(ViLBertEncoder):
    """The faithful encoder's layers run in `variant_schedule` order (coattention-only, sequential, late-fusion).

    The faithful set is built, then cut to the layers the schedule runs, so parameter names stay those of the
    faithful model (`text_layers.i`, `vision_layers.i`, `coattention_layers.k`) and the text layers load from BERT.
    """

    def __init__(self, config: ViLBertConfig):
        super().__init__(config)
        self.schedule = variant_schedule(config)
        self.text_layers = self.text_layers[: _count(self.schedule, "T")]
        self.vision_layers = self.vision_layers[: _count(self.schedule, "V")]
        self.coattention_layers = self.coattention_layers[: _count(self.schedule, "C")]
        self.cross_attention_layers = nn.ModuleList(TextOverVisionLayer(config) for _ in range(_count(self.schedule, "X")))
        self.num_prefix_steps = next((n for n, (kind, _) in enumerate(self.schedule) if kind != "T"), len(self.schedule))

    def forward(
        self, text: torch.Tensor, text_mask: torch.Tensor, vision: torch.Tensor, vision_mask: torch.Tensor,
        after_prefix: bool = False, attentions: AttentionMaps | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As `ViLBertEncoder.forward`, with the one-way blocks of the sequential variant."""
        record = attentions is not None
        for kind, index in self.schedule[self.num_prefix_steps if after_prefix else 0 :]:
            if kind == "T":
                text = self._text_layer(index, text, text_mask, attentions)
            elif kind == "V":
                vision = self._vision_layer(index, vision, vision_mask, attentions)
            elif kind == "X":
                text, probs = self.cross_attention_layers[index](text, vision, vision_mask, record)
                if record:
                    attentions.text_to_vision.append(probs)
            else:
                text, vision, maps = self.coattention_layers[index](text, text_mask, vision, vision_mask, record)
                if record:
                    attentions.text_to_vision.append(maps[0])
                    attentions.vision_to_text.append(maps[1])
        return text, vision


class SingleStreamEncoder(ViLBertEncoder):
    """One stream of BERT layers over [text; regions + modality embedding]; the halves are split again at the end.

    Frozen text layers (`fixed_t_layer`) keep their weights (no `requires_grad`) but still pass the gradient on to
    the regions below them, which they read.
    """

    def __init__(self, config: ViLBertConfig):
        super().__init__(config)
        self.schedule = variant_schedule(config)
        self.vision_layers = nn.ModuleList()
        self.coattention_layers = nn.ModuleList()
        self.num_prefix_steps = 0  # the first layer already reads the regions
        self.region_modality = nn.Embedding(1, config.hidden_size)

    def joint(
        self, text: torch.Tensor, text_mask: torch.Tensor, vision: torch.Tensor, vision_mask: torch.Tensor,
        attentions: AttentionMaps | None = None,
    ) -> torch.Tensor:
        """text [B, L, H] and regions [B, R, H] (either may have length 0) through every layer -> [B, L + R, H]."""
        length = text.shape[1]
        hidden = torch.cat([text, vision + self.region_modality.weight[0]], dim=1)  # [B, L+R, H]
        mask = torch.cat([text_mask, vision_mask], dim=-1)  # [B, 1, 1, L+R]
        for _, index in self.schedule:
            hidden, probs = self.text_layers[index](hidden, mask, attentions is not None)
            if attentions is not None:  # [B, h, L+R, L+R] cut into its four blocks
                attentions.text.append(probs[:, :, :length, :length])
                attentions.vision.append(probs[:, :, length:, length:])
                attentions.text_to_vision.append(probs[:, :, :length, length:])
                attentions.vision_to_text.append(probs[:, :, length:, :length])
        return hidden

    def forward(
        self, text: torch.Tensor, text_mask: torch.Tensor, vision: torch.Tensor, vision_mask: torch.Tensor,
        after_prefix: bool = False, attentions: AttentionMaps | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.joint(text, text_mask, vision, vision_mask, attentions)
        return hidden[:, : text.shape[1]], hidden[:, text.shape[1] :]

    def run_vision_alone(self, vision: torch.Tensor, vision_mask: torch.Tensor, coattention: str) -> torch.Tensor:
        """The regions alone through the stream (dual encoder)."""
        empty = vision[:, :0]
        return self.joint(empty, vision_mask[..., :0], vision, vision_mask)


ENCODERS.update({
    "single-stream": SingleStreamEncoder,
    "coattention-only": VariantEncoder,
    "sequential": VariantEncoder,
    "late-fusion": VariantEncoder,
})
