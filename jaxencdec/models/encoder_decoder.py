"""The composed encoder-decoder module and its loss.

Parameter tree: ``encoder/...`` and ``decoder/...`` (see ``models.transformer``), plus
``enc_to_dec_proj/{kernel [D_enc, D_dec], bias [D_dec]}`` when the hidden sizes differ.
"""

from __future__ import annotations


import chex
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import struct

from jaxencdec.config import EncoderDecoderConfig
from jaxencdec.models.transformer import TransformerStack
from jaxencdec.nn.attention import KeyValue
from jaxencdec.nn.layers import Dtype, dense


@struct.dataclass
class Seq2SeqOutput:
    logits: jax.Array  # [batch, tgt_len, vocab] float32
    encoder_last_hidden_state: jax.Array  # [batch, src_len, D_enc]
    loss: jax.Array | None = None  # scalar float32


class EncoderDecoderModule(nn.Module):
    """Encoder + cross-attending decoder. Methods: ``encode``, ``cross_kv``, ``decode``, ``__call__``."""

    config: EncoderDecoderConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self.encoder = TransformerStack(self.config.encoder_spec, self.dtype, self.param_dtype)
        self.decoder = TransformerStack(self.config.decoder_spec, self.dtype, self.param_dtype)
        if self.config.needs_projection:
            self.enc_to_dec_proj = dense(self.config.decoder.hidden, ("hidden", "embed"),
                                         self.config.decoder_spec.initializer_range, self.dtype, self.param_dtype)

    def encode(self, input_ids: jax.Array, attention_mask: jax.Array, deterministic: bool = True) -> jax.Array:
        """``input_ids``/``attention_mask [batch, src_len]`` -> encoder states ``[batch, src_len, D_enc]``."""
        return self.encoder.encode(input_ids, attention_mask, deterministic)[0]

    def cross_kv(self, encoder_hidden: jax.Array) -> tuple[KeyValue, ...]:
        """Encoder states -> per decoder layer cross-attention keys/values ``[batch, heads, src_len, head_dim]``."""
        if self.config.needs_projection:
            encoder_hidden = self.enc_to_dec_proj(encoder_hidden)
        return self.decoder.cross_kv(encoder_hidden)

    def decode(self, decoder_input_ids, cross_kv, encoder_attention_mask, decoder_attention_mask=None, cache=None,
               cache_index=0, cache_slots=None, deterministic: bool = True):
        """See ``TransformerStack.decode``: returns ``(logits [batch, q_len, vocab] float32, cache)``."""
        return self.decoder.decode(decoder_input_ids, cross_kv, encoder_attention_mask, decoder_attention_mask,
                                   cache, cache_index, cache_slots, deterministic)

    def __call__(self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask=None,
                 deterministic: bool = True) -> Seq2SeqOutput:
        """Teacher-forced forward pass: ``[batch, src_len]`` sources, ``[batch, tgt_len]`` decoder inputs."""
        chex.assert_rank([input_ids, decoder_input_ids], 2)
        chex.assert_equal(input_ids.shape[0], decoder_input_ids.shape[0])
        hidden, pooled = self.encoder.encode(input_ids, attention_mask, deterministic)
        logits, _ = self.decode(decoder_input_ids, self.cross_kv(hidden), attention_mask, decoder_attention_mask,
                                deterministic=deterministic)
        return Seq2SeqOutput(logits=logits, encoder_last_hidden_state=hidden)


def shift_tokens_right(labels: jax.Array, pad_token_id: int, decoder_start_token_id: int) -> jax.Array:
    """Decoder inputs from labels ``[batch, tgt_len]``: prepend the start token, drop the last, -100 -> pad."""
    shifted = jnp.concatenate(
        [jnp.full((labels.shape[0], 1), decoder_start_token_id, labels.dtype), labels[:, :-1]], axis=1)
    return jnp.where(shifted == -100, pad_token_id, shifted)


def cross_entropy_loss(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Mean token cross-entropy over labels != -100, as ``torch.nn.CrossEntropyLoss`` (float32 scalar).

    ``logits [batch, tgt_len, vocab]``, ``labels [batch, tgt_len]`` int.
    """
    chex.assert_equal(logits.shape[:-1], labels.shape)
    valid = labels != -100
    safe_labels = jnp.where(valid, labels, 0)
    logits = logits.astype(jnp.float32)
    if label_smoothing:
        targets = optax.smooth_labels(jax.nn.one_hot(safe_labels, logits.shape[-1]), label_smoothing)
        losses = optax.softmax_cross_entropy(logits, targets)
    else:
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, safe_labels)
    return jnp.sum(losses * valid) / jnp.maximum(jnp.sum(valid), 1)
