"""Decoder-only LLM families as decoders: configs that round-trip a transformers ``config.json`` of Llama or Qwen2,
reduced to a ``TransformerSpec`` of RMS norms, rotary positions, a gated MLP and grouped-query attention.

transformers' causal LMs of these families take no encoder states; as the decoder of a pair each layer gains a
cross-attention block (full heads, RMS-normed, pre-norm like the rest) whose output is scaled by ``tanh`` of a
learned per-layer gate initialised to 0, so that a warm-started pair's decoder computes exactly the pretrained LM
until training opens the gates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from jaxencdec.architectures import HFConfig, Role, register
from jaxencdec.errors import require
from jaxencdec.fields import assigned_through_replace
from jaxencdec.spec import TransformerSpec


def rope_theta(config: HFConfig) -> float:
    """The rotary base of a config written by transformers 5 (``rope_parameters``) or 4 (``rope_theta``,
    ``rope_scaling``); scaled variants (linear, dynamic, YaRN, Llama 3's) are refused."""
    parameters = config.extra.get("rope_parameters") or {}
    scaling = config.extra.get("rope_scaling") or {}
    kind = parameters.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    require(kind == "default", f"{config.model_type} with rope type {kind!r} is not supported; only the default "
                               f"(unscaled) rotary positions are: set rope_parameters.rope_type to 'default'")
    return float(parameters.get("rope_theta", config.extra.get("rope_theta", 10000.0)))


def _llm_spec(config, role: Role, head_size: int | None, qkv_bias: bool, out_bias: bool,
              mlp_bias: bool) -> TransformerSpec:
    """The spec of a Llama-family config (its field names are Llama's)."""
    require(role == "decoder", f"{config.model_type} is supported as a decoder only (a causal LM); pair it with an "
                               f"encoder architecture")
    return TransformerSpec(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
        activation=config.hidden_act, layer_norm_eps=config.rms_norm_eps, max_positions=0,
        context_length=config.max_position_embeddings, pad_token_id=config.pad_token_id, norm="rms",
        num_kv_heads=config.num_key_value_heads, head_size=head_size, rotary_theta=rope_theta(config),
        gated_mlp=True, attention_bias=qkv_bias, attention_out_bias=out_bias, mlp_bias=mlp_bias,
        embedding_norm=False, pre_norm=True, is_decoder=True, add_cross_attention=config.add_cross_attention,
        cross_attention_gate=True, tie_word_embeddings=config.tie_word_embeddings, hidden_dropout=0.0,
        attention_dropout=config.attention_dropout, embedding_dropout=0.0, initializer_range=config.initializer_range,
    )


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

    @property
    def hidden(self) -> int:
        return self.hidden_size

    def spec(self, role: Role) -> TransformerSpec:
        # transformers' Llama: o_proj has a bias exactly when q/k/v have one
        return _llm_spec(self, role, self.head_dim, self.attention_bias, self.attention_bias, self.mlp_bias)


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
        return _llm_spec(self, role, None, True, False, False)


register(LlamaConfig, Qwen2Config)
