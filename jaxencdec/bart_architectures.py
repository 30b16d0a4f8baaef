"""The BART family's configs (BART, mBART, Marian): encoder-decoder checkpoints whose encoder half serves as an
encoder and whose decoder half (``*ForCausalLM``, always with cross-attention) as a decoder.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

from jaxencdec.architectures import HFConfig, Role, register
from jaxencdec.fields import assigned_through_replace
from jaxencdec.spec import TransformerSpec


@assigned_through_replace("encoder_config")
@dataclass(frozen=True)
class BartConfig(HFConfig):
    """Hugging Face ``BartConfig``; its encoder half serves as an encoder, its decoder half as a decoder."""

    model_type: ClassVar[str] = "bart"
    vocab_size: int = 50265
    max_position_embeddings: int = 1024
    d_model: int = 1024
    encoder_layers: int = 12
    decoder_layers: int = 12
    encoder_attention_heads: int = 16
    decoder_attention_heads: int = 16
    encoder_ffn_dim: int = 4096
    decoder_ffn_dim: int = 4096
    activation_function: str = "gelu"
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    init_std: float = 0.02
    scale_embedding: bool = False
    pad_token_id: int | None = 1
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 2
    decoder_start_token_id: int | None = 2

    @property
    def hidden(self) -> int:
        return self.d_model

    def spec(self, role: Role) -> TransformerSpec:
        decoder = role == "decoder"
        return TransformerSpec(
            vocab_size=self.vocab_size, hidden_size=self.d_model,
            num_layers=self.decoder_layers if decoder else self.encoder_layers,
            num_heads=self.decoder_attention_heads if decoder else self.encoder_attention_heads,
            intermediate_size=self.decoder_ffn_dim if decoder else self.encoder_ffn_dim,
            activation=self.activation_function, layer_norm_eps=1e-5,
            max_positions=self.max_position_embeddings + 2, position_offset=2, pad_token_id=self.pad_token_id,
            embed_scale=math.sqrt(self.d_model) if self.scale_embedding else 1.0,
            # BartForCausalLM always carries cross-attention blocks.
            is_decoder=decoder, add_cross_attention=decoder,
            tie_word_embeddings=self.tie_word_embeddings, hidden_dropout=self.dropout,
            attention_dropout=self.attention_dropout, activation_dropout=self.activation_dropout,
            embedding_dropout=self.dropout, initializer_range=self.init_std,
        )


@assigned_through_replace("encoder_config")
@dataclass(frozen=True)
class MBartConfig(BartConfig):
    """Hugging Face ``MBartConfig``: BART with pre-norm layers and a final layer norm in each half (mBART-25/50's
    multilingual checkpoints; MBartForCausalLM as a decoder)."""

    model_type: ClassVar[str] = "mbart"
    decoder_start_token_id: int | None = None

    def spec(self, role: Role) -> TransformerSpec:
        return dataclasses.replace(super().spec(role), pre_norm=True)


@assigned_through_replace("encoder_config")
@dataclass(frozen=True)
class MarianConfig(BartConfig):
    """Hugging Face ``MarianConfig`` (the Opus-MT translation models; MarianForCausalLM as a decoder): BART's
    post-norm layers without the embedding norm, under fixed sinusoidal positions (computed, not learned: the
    checkpoints' ``embed_positions`` tables are that sinusoid, checked on load and written on export), and a
    decoder vocabulary of its own size (``decoder_vocab_size``) when the embeddings are not shared."""

    model_type: ClassVar[str] = "marian"
    vocab_size: int = 58101
    decoder_vocab_size: int | None = None
    share_encoder_decoder_embeddings: bool = True
    pad_token_id: int | None = 58100
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = 0
    decoder_start_token_id: int | None = 58100

    def __post_init__(self):
        super().__post_init__()
        if self.decoder_vocab_size is None:  # as transformers derives it
            object.__setattr__(self, "decoder_vocab_size", self.vocab_size)

    def spec(self, role: Role) -> TransformerSpec:
        vocab = self.decoder_vocab_size if role == "decoder" else self.vocab_size
        return dataclasses.replace(super().spec(role), vocab_size=vocab, max_positions=self.max_position_embeddings,
                                   position_offset=0, sinusoidal_positions=True, embedding_norm=False)


register(BartConfig, MBartConfig, MarianConfig)
