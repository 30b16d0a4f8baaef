"""Decoder-only LLM families as decoders: configs that round-trip a transformers ``config.json`` of Llama, Qwen2 or
Gemma 3's text model, reduced to a ``TransformerSpec`` of RMS norms, rotary positions, a gated MLP and
grouped-query attention (and Gemma's norms and sliding windows).

transformers' causal LMs of these families take no encoder states; as the decoder of a pair each layer gains a
cross-attention block (full heads, RMS-normed, pre-norm like the rest) whose output is scaled by ``tanh`` of a
learned per-layer gate initialised to 0, so that a warm-started pair's decoder computes exactly the pretrained LM
until training opens the gates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from jaxencdec.architectures import HFConfig, Role, layer_kinds, register, rope_base
from jaxencdec.errors import require
from jaxencdec.fields import assigned_through_replace, frozen
from jaxencdec.spec import TransformerSpec


def _llm_spec(config, role: Role, activation: str, rotary_theta: float, **specifics) -> TransformerSpec:
    """The spec of a Llama-family config (its field names are Llama's): pre-norm RMS-normed layers with rotary
    positions, a gated MLP, grouped-query attention and gated cross-attention; ``specifics``: the spec fields its
    family sets besides (biases, head width, Gemma's norms and sliding windows)."""
    require(role == "decoder", f"{config.model_type} is supported as a decoder only (a causal LM); pair it with an "
                               f"encoder architecture")
    return TransformerSpec(**{
        **dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_layers=config.num_hidden_layers,
               num_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
               activation=activation, layer_norm_eps=config.rms_norm_eps, max_positions=0,
               context_length=config.max_position_embeddings, pad_token_id=config.pad_token_id, norm="rms",
               num_kv_heads=config.num_key_value_heads, rotary_theta=rotary_theta, gated_mlp=True,
               embedding_norm=False, pre_norm=True, is_decoder=True, add_cross_attention=config.add_cross_attention,
               cross_attention_gate=True, tie_word_embeddings=config.tie_word_embeddings, hidden_dropout=0.0,
               attention_dropout=config.attention_dropout, embedding_dropout=0.0,
               initializer_range=config.initializer_range),
        **specifics})


@assigned_through_replace("encoder_config")
@dataclass(frozen=True)
class LlamaConfig(HFConfig):
    """Hugging Face ``LlamaConfig`` (Llama 1 and 2, and the models that share its layout): a decoder only.

    ``rope_parameters`` (or transformers 4's ``rope_theta`` / ``rope_scaling``) stay in ``extra``; only unscaled
    rotary positions are supported. ``pretraining_tp`` does not change the numbers and stays in ``extra``.
    """

    model_type: ClassVar[str] = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    attention_dropout: float = 0.0
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    def __post_init__(self):
        super().__post_init__()
        # derived as transformers derives them when not given
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)

    @property
    def hidden(self) -> int:
        return self.hidden_size

    def spec(self, role: Role) -> TransformerSpec:
        # transformers' Llama: o_proj has a bias exactly when q/k/v have one
        return _llm_spec(self, role, self.hidden_act, rope_base(self, self.extra.get("rope_parameters") or {}, 1e4),
                         head_size=self.head_dim, attention_bias=self.attention_bias,
                         attention_out_bias=self.attention_bias, mlp_bias=self.mlp_bias)


@assigned_through_replace("encoder_config")
@dataclass(frozen=True)
class Qwen2Config(HFConfig):
    """Hugging Face ``Qwen2Config``: Llama's layout with biases on the query, key and value projections (none on
    the output projection or the MLP); sliding-window attention (``use_sliding_window``) is not supported."""

    model_type: ClassVar[str] = "qwen2"
    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 32
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    use_sliding_window: bool = False
    tie_word_embeddings: bool = False

    @property
    def hidden(self) -> int:
        return self.hidden_size

    def spec(self, role: Role) -> TransformerSpec:
        require(not self.use_sliding_window, "Qwen2 with use_sliding_window=True is not supported; set "
                                             "use_sliding_window to false")
        return _llm_spec(self, role, self.hidden_act, rope_base(self, self.extra.get("rope_parameters") or {}, 1e4),
                         attention_bias=True, attention_out_bias=False, mlp_bias=False)


@assigned_through_replace("encoder_config")
@dataclass(frozen=True)
class Gemma3TextConfig(HFConfig):
    """Hugging Face ``Gemma3TextConfig`` (``Gemma3ForCausalLM``, the text model of Gemma 3): Llama's layout with
    Gemma's RMS norms (``1 + scale``, in float32) around each block (input and output) and on every query and key
    head, embeddings scaled by ``sqrt(hidden_size)``, queries by ``query_pre_attn_scalar ** -0.5``, and
    sliding-window layers (``layer_types``) with their own rotary base. Logit soft-capping and bidirectional
    attention are not supported."""

    model_type: ClassVar[str] = "gemma3_text"
    vocab_size: int = 262208
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int | None = 4
    head_dim: int = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 131072
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    attention_dropout: float = 0.0
    query_pre_attn_scalar: float = 256
    sliding_window: int = 4096
    layer_types: list[str] | None = None
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    use_bidirectional_attention: bool = False
    pad_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    bos_token_id: int | None = 2

    def __post_init__(self):
        super().__post_init__()
        kinds = self.layer_types
        if kinds is None:  # as transformers derives them: every sliding_window_pattern-th layer full
            pattern = self.extra.get("sliding_window_pattern", self.extra.get("_sliding_window_pattern", 6))
            kinds = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                     for i in range(self.num_hidden_layers)]
        object.__setattr__(self, "layer_types", frozen(kinds))

    @property
    def hidden(self) -> int:
        return self.hidden_size

    def spec(self, role: Role) -> TransformerSpec:
        for name in ("final_logit_softcapping", "attn_logit_softcapping"):
            require(getattr(self, name) is None, f"Gemma 3 with {name}={getattr(self, name)} is not supported; set "
                                                 f"{name} to null")
        require(not self.use_bidirectional_attention, "Gemma 3 with use_bidirectional_attention=True is not "
                                                      "supported as a causal decoder; set it to false")
        rope = self.extra.get("rope_parameters") or {}
        return _llm_spec(
            self, role, self.hidden_activation,
            rope_base(self, rope.get("full_attention") or {}, 1e6),
            local_rotary_theta=rope_base(self, rope.get("sliding_attention") or {}, 1e4, "rope_local_base_freq"),
            head_size=self.head_dim, attention_bias=self.attention_bias, attention_out_bias=self.attention_bias,
            mlp_bias=False, norm="rms_unit_offset", embed_scale=math.sqrt(self.hidden_size), qk_norm=True,
            post_sublayer_norm=True, query_scale=self.query_pre_attn_scalar ** -0.5,
            layer_kinds=layer_kinds(self),
            sliding_window=self.sliding_window,
        )


register(LlamaConfig, Qwen2Config, Gemma3TextConfig)
