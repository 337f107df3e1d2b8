"""ViLBERT configuration: every field of the reference config, presets, and validation at construction."""

from __future__ import annotations

from typing import Any, ClassVar

from transformers import AutoConfig, PreTrainedConfig

from vilbert.errors import ConfigError

ACTIVATIONS = ("gelu", "relu", "swish", "silu")
FUSION_METHODS = ("mul", "sum")
# "multi-task": Linear, GELU, LayerNorm, Linear (vilbert-multi-task SimpleClassifier);
# "beta": Linear, ReLU, Dropout(0.5), Linear (vilbert_beta, weight norm folded into plain weights).
ANSWER_HEAD_TYPES = ("multi-task", "beta")
# what the dual encoder does at a co-attention layer: "skip" it, or run its "self" half (each stream attending to
# itself through the layer's own query/key/value of that stream, then its output LN and FFN)
DUAL_COATTENTION = ("skip", "self")
# The faithful model and the controlled variants of vilbert/variants.py (what each is: its module docstring).
ARCHITECTURES = ("vilbert", "single-stream", "coattention-only", "sequential", "late-fusion")


def layer_variant(num_coattention: int) -> dict[str, Any]:
    """The published N-layer variants: N vision layers, co-attention before each of them and before the last N
    of the 12 text layers (bert_base_{N}layer_{N}conect.json)."""
    n = num_coattention
    return {"v_num_hidden_layers": n, "v_biattention_id": list(range(n)), "t_biattention_id": list(range(12 - n, 12))}


PRESETS: dict[str, dict[str, Any]] = {
    "base": {},  # the field defaults are the published base model (= layer_variant(6))
    "6layer": {},
    "2layer": layer_variant(2),
    "4layer": layer_variant(4),
    "8layer": layer_variant(8),
    # Text stream shaped like all-MiniLM-L6-v2; vision stream over MobileNetV2 stride-16 features (96-d);
    # 18 colour x shape classes + background as region targets.
    "embedded": {
        "vocab_size": 30522,
        "hidden_size": 384,
        "num_hidden_layers": 6,
        "num_attention_heads": 12,
        "intermediate_size": 1536,
        "v_feature_size": 96,
        "v_hidden_size": 256,
        "v_num_hidden_layers": 2,
        "v_num_attention_heads": 4,
        "v_intermediate_size": 512,
        "bi_hidden_size": 256,
        "bi_num_attention_heads": 4,
        "bi_intermediate_size": 512,
        "v_biattention_id": [0, 1],
        "t_biattention_id": [4, 5],
        "v_target_size": 19,
        "num_labels": 32,
        "gqa_num_labels": 32,
    },
    # For tests: every part present, everything tiny.
    "tiny": {
        "vocab_size": 100,
        "hidden_size": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "max_position_embeddings": 64,
        "v_feature_size": 16,
        "v_hidden_size": 24,
        "v_num_hidden_layers": 2,
        "v_num_attention_heads": 2,
        "v_intermediate_size": 48,
        "bi_hidden_size": 32,
        "bi_num_attention_heads": 4,
        "bi_intermediate_size": 32,
        "v_biattention_id": [0, 1],
        "t_biattention_id": [1, 2],
        "v_target_size": 7,
        "num_labels": 10,
        "gqa_num_labels": 11,
    },
}


class ViLBertConfig(PreTrainedConfig):
    """Configuration of the two-stream ViLBERT model; defaults are the published base (6-layer/6-conect) model.

    Suffix-free fields describe the text stream (BERT), `v_*` the vision stream, `bi_*` the co-attention.
    `v_biattention_id[k]` / `t_biattention_id[k]` say before which vision / text layer co-attention layer k runs.
    `bi_intermediate_size` and `v_initializer_range` are kept from the reference config but unused (as there).
    `architecture` picks the faithful model ("vilbert") or one of the controlled variants of `vilbert.variants`.
    """

    model_type: ClassVar[str] = "vilbert"

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12

    v_feature_size: int = 2048
    v_hidden_size: int = 1024
    v_num_hidden_layers: int = 6
    v_num_attention_heads: int = 8
    v_intermediate_size: int = 1024
    v_hidden_act: str = "gelu"
    v_hidden_dropout_prob: float = 0.1
    v_attention_probs_dropout_prob: float = 0.1
    v_initializer_range: float = 0.02
    v_target_size: int = 1601

    bi_hidden_size: int = 1024
    bi_num_attention_heads: int = 8
    bi_intermediate_size: int = 1024
    v_biattention_id: list[int] | None = None
    t_biattention_id: list[int] | None = None
    with_coattention: bool = True
    architecture: str = "vilbert"

    fusion_method: str = "mul"
    fixed_t_layer: int = 0
    fixed_v_layer: int = 0
    task_specific_tokens: bool = False
    num_task_tokens: int = 20

    head_dropout_prob: float = 0.1
    answer_head_type: str = "multi-task"
    answer_head_dropout_prob: float = 0.5
    gqa_num_labels: int = 1533
    tie_word_embeddings: bool = True

    # The dual encoder (ours, not in the reference): each stream alone, mean-pooled, projected to
    # `dual_embedding_size`, L2-normalised, compared by a learned temperature. 0 = no dual encoder parameters.
    dual_embedding_size: int = 0
    dual_coattention: str = "skip"
    dual_temperature: float = 0.07  # initial temperature (logit scale 1/0.07), as CLIP

    # Debiasing branches (ours, not in the reference), used in training only; 0 / False = no parameters.
    # RUBi (Cadene et al., 2019): a question-only branch on the text before co-attention, `question_only_labels` outputs.
    # Learned-Mixin (Clark et al., 2019): a scalar gate on the fused pooled vector and a learned prior smoothing.
    question_only_labels: int = 0
    mixin_gate: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        if self.v_biattention_id is None:
            self.v_biattention_id = [0, 1, 2, 3, 4, 5]
        if self.t_biattention_id is None:
            self.t_biattention_id = [6, 7, 8, 9, 10, 11]
        self.v_biattention_id = [int(i) for i in self.v_biattention_id]
        self.t_biattention_id = [int(i) for i in self.t_biattention_id]
        if self.id2label is None:
            kwargs.setdefault("num_labels", 3129)
        super().__post_init__(**kwargs)
        self._check()

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ViLBertConfig:
        """The named preset ("base" = "6layer", "2layer", "4layer", "8layer", "embedded", "tiny") with overrides."""
        if name not in PRESETS:
            raise ConfigError(f"preset: unknown preset {name!r}; expected one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def _check(self) -> None:
        """Raise ConfigError naming the first invalid field."""
        for width, heads in (
            ("hidden_size", "num_attention_heads"),
            ("v_hidden_size", "v_num_attention_heads"),
            ("bi_hidden_size", "bi_num_attention_heads"),
        ):
            w, h = getattr(self, width), getattr(self, heads)
            if h <= 0 or w <= 0 or w % h != 0:
                raise ConfigError(f"{width}: {w} is not divisible by {heads} = {h}")
        for name in ("hidden_act", "v_hidden_act"):
            if getattr(self, name) not in ACTIVATIONS:
                raise ConfigError(f"{name}: unknown activation {getattr(self, name)!r}; expected one of {ACTIVATIONS}")
        if self.fusion_method not in FUSION_METHODS:
            raise ConfigError(f"fusion_method: unknown {self.fusion_method!r}; expected one of {FUSION_METHODS}")
        if self.answer_head_type not in ANSWER_HEAD_TYPES:
            raise ConfigError(
                f"answer_head_type: unknown {self.answer_head_type!r}; expected one of {ANSWER_HEAD_TYPES}"
            )
        v_ids, t_ids = self.v_biattention_id, self.t_biattention_id
        self._check_architecture()
        if len(v_ids) != len(t_ids):
            raise ConfigError(
                f"v_biattention_id / t_biattention_id: lengths differ ({len(v_ids)} vs {len(t_ids)}); "
                "each co-attention layer needs one attachment point in each stream"
            )
        for name, ids, layers, layers_name in (
            ("v_biattention_id", v_ids, self.v_num_hidden_layers, "v_num_hidden_layers"),
            ("t_biattention_id", t_ids, self.num_hidden_layers, "num_hidden_layers"),
        ):
            for i in ids:
                if not 0 <= i < layers:  # as the reference asserts: co-attention runs before an existing layer
                    raise ConfigError(f"{name}: id {i} is out of range [0, {layers - 1}] ({layers_name} = {layers})")
            if any(b <= a for a, b in zip(ids, ids[1:], strict=False)):
                raise ConfigError(f"{name}: {ids} is not strictly increasing")
        for name, fixed, ids in (("fixed_t_layer", self.fixed_t_layer, t_ids), ("fixed_v_layer", self.fixed_v_layer, v_ids)):
            limit = ids[0] if ids else (self.num_hidden_layers if name == "fixed_t_layer" else self.v_num_hidden_layers)
            if not 0 <= fixed <= limit:
                raise ConfigError(f"{name}: {fixed} must lie in [0, {limit}] (layers before the first co-attention)")
        if self.dual_embedding_size < 0:
            raise ConfigError(f"dual_embedding_size: {self.dual_embedding_size} must be >= 0 (0 = no dual encoder)")
        if self.dual_coattention not in DUAL_COATTENTION:
            raise ConfigError(f"dual_coattention: unknown {self.dual_coattention!r}; expected one of {DUAL_COATTENTION}")
        if not 0 < self.dual_temperature <= 1:
            raise ConfigError(f"dual_temperature: {self.dual_temperature} must lie in (0, 1]")
        if self.question_only_labels < 0:
            raise ConfigError(f"question_only_labels: {self.question_only_labels} must be >= 0 (0 = no branch)")
        if self.task_specific_tokens and self.num_task_tokens <= 0:
            raise ConfigError(f"num_task_tokens: {self.num_task_tokens} must be positive with task_specific_tokens")
        for name in ("vocab_size", "v_feature_size", "v_target_size", "gqa_num_labels", "num_labels"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: {getattr(self, name)} must be positive")

    def _check_architecture(self) -> None:
        """What each variant needs of the other fields (vilbert.variants)."""
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"architecture: unknown {self.architecture!r}; expected one of {ARCHITECTURES}")
        if self.architecture == "single-stream" and self.v_hidden_size != self.hidden_size:
            raise ConfigError(f"v_hidden_size: {self.v_hidden_size} must equal hidden_size = {self.hidden_size} for "
                              "the single-stream architecture (the regions run through the text layers)")
        if self.architecture in ("coattention-only", "sequential") and not self.t_biattention_id:
            raise ConfigError(f"t_biattention_id: empty, but the {self.architecture} architecture needs at least one "
                              "co-attention layer")


# `AutoConfig.from_pretrained(dir)` of a ViLBERT directory, once this module is imported
AutoConfig.register("vilbert", ViLBertConfig, exist_ok=True)
