"""The composed encoder-decoder module, its outputs, and its loss.

Parameter tree: ``encoder/...`` and ``decoder/...`` (see ``models.transformer``), plus
``enc_to_dec_proj/{kernel [D_enc, D_dec], bias [D_dec]}`` when the hidden sizes differ.

With ``config.tie_encoder_decoder`` (transformers' ``_tie_encoder_decoder_weights``: the decoder's modules that
the encoder also has, by name, are the encoder's) the decoder holds no ``embeddings`` and, per layer, no
``self_attention``, ``self_attention_norm``, ``mlp`` or ``mlp_norm``: it reads the encoder's (of the layer with
the same index), so they exist, train and save once, and their gradient is the sum of both uses. Its
``cross_attention``, ``cross_attention_norm`` and ``lm_head`` stay its own, as does every hyperparameter
(dropout rates, norm epsilon, activation).

Attention probabilities and hidden states are sown (``Module.sow``) into the ``ATTENTIONS`` and
``HIDDEN_STATES`` collections; ``apply_recording`` makes the requested ones mutable and ``stack_records`` reads
them back in transformers' order. When neither is requested nothing is recorded and nothing extra is computed.
"""

from __future__ import annotations

import dataclasses
import re
from functools import lru_cache, partial
from typing import Any, Mapping

import chex
import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct

from jaxencdec.config import EncoderDecoderConfig
from jaxencdec.models.layout import SCANNED_KEY, unstack_layers
from jaxencdec.models.transformer import HIDDEN_STATES, TransformerStack, cache_rows_and_length, init_cache
from jaxencdec.nn.attention import ATTENTIONS, KeyValue
from jaxencdec.nn.layers import Dtype, dense
from jaxencdec.spec import TransformerSpec

Layers = tuple[jax.Array, ...]

# Per decoder layer, the blocks that tie_encoder_decoder takes from the encoder layer of the same index.
TIED_LAYER_BLOCKS = ("self_attention", "self_attention_norm", "mlp", "mlp_norm")
_TIED_PATH = re.compile(r"^(embeddings|(layers_\d+|" + SCANNED_KEY + ")/(" + "|".join(TIED_LAYER_BLOCKS) + r"))/")


def is_tied_decoder_path(path: str) -> bool:
    """Whether ``path`` (inside the decoder stack, ``/``-joined) is one the decoder reads from the encoder when
    ``tie_encoder_decoder`` is set (the encoder path is the same)."""
    return _TIED_PATH.match(path) is not None


class ModelOutput:
    """transformers' ``ModelOutput`` access on an output dataclass: ``out["logits"]`` (a field that is set; else
    KeyError, as transformers' outputs hold only the set ones), ``out[0]`` / ``out[1:]`` (of ``to_tuple()``)."""

    def to_tuple(self) -> tuple:
        """The fields that are set, in the dataclass's (transformers') order: what ``return_dict=False`` gives."""
        return tuple(value for value in (getattr(self, f.name) for f in dataclasses.fields(self))
                     if value is not None)

    def __getitem__(self, key):
        if isinstance(key, str):
            value = getattr(self, key) if key in {f.name for f in dataclasses.fields(self)} else None
            if value is None:
                raise KeyError(key)
            return value
        return self.to_tuple()[key]


@struct.dataclass
class EncoderOutput(ModelOutput):
    """What ``encode`` returns (transformers' ``BaseModelOutput``); ``decode`` and ``__call__`` take it back."""

    last_hidden_state: jax.Array  # [batch, src_len, D_enc], before enc_to_dec_proj
    hidden_states: Layers | None = None  # num_layers + 1 x [batch, src_len, D_enc]: embeddings, then each layer's
    attentions: Layers | None = None  # num_layers x [batch, heads, src_len, src_len] float32


@struct.dataclass
class DecoderCache:
    """The decoder's self-attention keys/values (``past_key_values``) and how many positions they hold."""

    layers: tuple[KeyValue, ...] | KeyValue  # per layer key/value [batch, heads, max_length, head_dim] (scanned:
    # one KeyValue [num_layers, batch, heads, max_length, head_dim])
    index: jax.Array  # int32 scalar: positions written so far, the position of the next token

    @property
    def max_length(self) -> int:
        return cache_rows_and_length(self.layers)[1]


@struct.dataclass
class DecoderOutput(ModelOutput):
    """What ``decode`` returns (transformers' ``CausalLMOutputWithCrossAttentions``)."""

    logits: jax.Array  # [batch, q_len, vocab] float32
    past_key_values: DecoderCache | None = None  # the cache advanced by q_len positions (None without a cache)
    hidden_states: Layers | None = None  # num_layers + 1 x [batch, q_len, D_dec]
    attentions: Layers | None = None  # num_layers x [batch, heads, q_len, keys] (keys: q_len, or the cache length)
    cross_attentions: Layers | None = None  # num_layers x [batch, heads, q_len, src_len]


ENCODER_OUTPUT_FIELDS = ("last_hidden_state", "hidden_states", "attentions")


def as_encoder_output(encoder_outputs: Any) -> Any:
    """``encoder_outputs`` as an ``EncoderOutput`` when it is one, a mapping with ``"last_hidden_state"`` (what
    transformers' ``BaseModelOutput`` is) or a tuple / list of its fields in that order (as transformers reads
    one); an array stays the array. A mapping without the last hidden state is a ValueError."""
    if isinstance(encoder_outputs, EncoderOutput):
        return encoder_outputs
    if isinstance(encoder_outputs, Mapping):
        if "last_hidden_state" not in encoder_outputs:
            raise ValueError(f"encoder_outputs is a mapping without 'last_hidden_state' (it has "
                             f"{', '.join(map(repr, encoder_outputs)) or 'no keys'}): pass model.encode(...)'s "
                             f"output or {{'last_hidden_state': states}}")
        return EncoderOutput(**{k: encoder_outputs.get(k) for k in ENCODER_OUTPUT_FIELDS})
    if isinstance(encoder_outputs, (tuple, list)):
        return EncoderOutput(*encoder_outputs[:len(ENCODER_OUTPUT_FIELDS)])
    return encoder_outputs


@struct.dataclass
class Seq2SeqOutput(ModelOutput):
    """What the forward pass returns (transformers' ``Seq2SeqLMOutput``); the recorded fields are None unless
    ``output_attentions`` / ``output_hidden_states`` asked for them."""

    logits: jax.Array  # [batch, tgt_len, vocab] float32
    encoder_last_hidden_state: jax.Array  # [batch, src_len, D_enc]
    loss: jax.Array | None = None  # scalar float32
    encoder_hidden_states: Layers | None = None  # encoder layers + 1 x [batch, src_len, D_enc]
    encoder_attentions: Layers | None = None  # encoder layers x [batch, heads, src_len, src_len]
    decoder_hidden_states: Layers | None = None  # decoder layers + 1 x [batch, tgt_len, D_dec]
    decoder_attentions: Layers | None = None  # decoder layers x [batch, heads, tgt_len, tgt_len]
    cross_attentions: Layers | None = None  # decoder layers x [batch, heads, tgt_len, src_len]

    # transformers' Seq2SeqLMOutput order (its past_key_values: none here)
    TUPLE_ORDER = ("loss", "logits", "decoder_hidden_states", "decoder_attentions", "cross_attentions",
                   "encoder_last_hidden_state", "encoder_hidden_states", "encoder_attentions")

    def to_tuple(self) -> tuple:
        """The fields that are set, in transformers' order: what its ``return_dict=False`` returns."""
        return tuple(getattr(self, name) for name in self.TUPLE_ORDER if getattr(self, name) is not None)


class EncoderDecoderModule(nn.Module):
    """Encoder + cross-attending decoder. Methods: ``encode``, ``cross_kv``, ``decode``, ``decode_states``,
    ``__call__``."""

    config: EncoderDecoderConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        # One spelling per dtype: jnp.float32 and np.dtype("float32") compare equal but hash apart, and the jitted
        # programs with the module static (forward, init, generate) are shared by modules that hash alike.
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, jnp.dtype(getattr(self, name)))
        super().__post_init__()

    def setup(self):
        c = self.config
        self.encoder = TransformerStack(c.encoder_spec, self.dtype, self.param_dtype, c.remat, c.scan_layers)
        decoder = TransformerStack
        if c.tie_encoder_decoder:
            decoder = nn.map_variables(TransformerStack, "params", trans_in_fn=self._with_tied_params,
                                       trans_out_fn=_without_tied_params, init=self.is_initializing(),
                                       methods=["decode", "cross_kv"])
        self.decoder = decoder(c.decoder_spec, self.dtype, self.param_dtype, c.remat, c.scan_layers)
        if self.config.needs_projection:
            self.enc_to_dec_proj = dense(self.config.decoder.hidden, ("hidden", "embed"),
                                         self.config.decoder_spec.initializer_range, self.dtype, self.param_dtype)

    def _with_tied_params(self, variables: dict[str, Any]) -> dict[str, Any]:
        """The decoder's variables with the tied parameters read from the encoder's (see the module docstring)."""
        encoder = self.encoder.variables["params"]
        tied = {"embeddings": encoder["embeddings"]}
        num_layers = self.config.decoder_spec.num_layers
        if self.config.scan_layers:  # the decoder's layers are the encoder's first num_layers
            tied[SCANNED_KEY] = jax.tree.map(lambda x: x[:num_layers],
                                             {block: encoder[SCANNED_KEY][block] for block in TIED_LAYER_BLOCKS})
        for i in range(0 if self.config.scan_layers else num_layers):
            tied[f"layers_{i}"] = {block: encoder[f"layers_{i}"][block] for block in TIED_LAYER_BLOCKS}
        own = variables.get("params", {})
        merged = {**own, **{name: {**own.get(name, {}), **subtree} for name, subtree in tied.items()}}
        return {**variables, "params": merged}

    def encode(self, input_ids: jax.Array, attention_mask: jax.Array, deterministic: bool = True,
               segment_ids: jax.Array | None = None, positions: jax.Array | None = None) -> jax.Array:
        """``input_ids``/``attention_mask [batch, src_len]`` -> encoder states ``[batch, src_len, D_enc]``; packed
        rows with ``segment_ids``/``positions`` (see ``TransformerStack.encode``)."""
        return self.encoder.encode(input_ids, attention_mask, deterministic, segment_ids, positions)[0]

    def cross_kv(self, encoder_hidden: jax.Array) -> tuple[KeyValue, ...]:
        """Encoder states -> per decoder layer cross-attention keys/values ``[batch, heads, src_len, head_dim]``."""
        if self.config.needs_projection:
            encoder_hidden = self.enc_to_dec_proj(encoder_hidden)
        return self.decoder.cross_kv(encoder_hidden)

    def decode(self, decoder_input_ids, cross_kv, encoder_attention_mask, decoder_attention_mask=None, cache=None,
               cache_index=0, cache_slots=None, deterministic: bool = True, encoder_hidden=None, segment_ids=None,
               encoder_segment_ids=None, positions=None):
        """See ``TransformerStack.decode`` (``encoder_hidden`` already projected by ``enc_to_dec_proj``): returns
        ``(logits [batch, q_len, vocab] float32, cache)``."""
        return self.decoder.decode(decoder_input_ids, cross_kv, encoder_attention_mask, decoder_attention_mask,
                                   cache, cache_index, cache_slots, deterministic, encoder_hidden, segment_ids,
                                   encoder_segment_ids, positions)

    def decode_states(self, decoder_input_ids: jax.Array, encoder_hidden: jax.Array,
                      encoder_attention_mask: jax.Array, decoder_attention_mask: jax.Array | None = None,
                      cache: DecoderCache | None = None, deterministic: bool = True,
                      segment_ids: jax.Array | None = None, encoder_segment_ids: jax.Array | None = None,
                      positions: jax.Array | None = None):
        """Decodes ``decoder_input_ids [batch, q_len]`` against encoder states ``[enc_batch, src_len, D_enc]``.

        ``batch`` may be a multiple of ``enc_batch`` (rows ``b * k ... b * k + k - 1`` read input ``b``): many
        candidates scored against one encoded input share its cross-attention keys/values. With ``cache`` the
        tokens sit at positions ``cache.index ...`` and ``decoder_attention_mask`` covers the cache's
        ``max_length`` keys (else the ``q_len`` inputs). Packed rows (no cache): ``segment_ids``,
        ``encoder_segment_ids``, ``positions`` as ``TransformerStack.decode`` takes them.
        Returns ``(logits [batch, q_len, vocab] float32, the cache advanced by q_len or None)``.
        """
        layers, index = (None, 0) if cache is None else (cache.layers, cache.index)
        if self.config.needs_projection:
            encoder_hidden = self.enc_to_dec_proj(encoder_hidden)
        logits, layers = self.decode(decoder_input_ids, None, encoder_attention_mask, decoder_attention_mask, layers,
                                     index, deterministic=deterministic, encoder_hidden=encoder_hidden,
                                     segment_ids=segment_ids, encoder_segment_ids=encoder_segment_ids,
                                     positions=positions)
        return logits, None if cache is None else DecoderCache(layers, index + decoder_input_ids.shape[1])

    def __call__(self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask=None,
                 deterministic: bool = True, encoder_hidden_states: jax.Array | None = None,
                 encoder_segment_ids: jax.Array | None = None, encoder_positions: jax.Array | None = None,
                 decoder_segment_ids: jax.Array | None = None,
                 decoder_positions: jax.Array | None = None) -> Seq2SeqOutput:
        """Teacher-forced forward pass: ``[batch, src_len]`` sources, ``[batch, tgt_len]`` decoder inputs.

        With ``encoder_hidden_states [batch, src_len, D_enc]`` the encoder is skipped (``input_ids`` is not read)
        and ``attention_mask`` masks those states.

        Packed rows (T5X's and MaxText's names): int32 ``encoder_segment_ids``/``encoder_positions [batch,
        src_len]`` and ``decoder_segment_ids``/``decoder_positions [batch, tgt_len]``. The decoder sequence with
        id ``k`` reads the source sequence with id ``k``, each sequence's positions count from 0, and a token sees
        only its own sequence: each sequence gets the logits it has alone in a row.
        """
        chex.assert_rank(decoder_input_ids, 2)
        hidden = encoder_hidden_states
        if hidden is None:
            chex.assert_rank(input_ids, 2)
            hidden = self.encoder.encode(input_ids, attention_mask, deterministic, encoder_segment_ids,
                                         encoder_positions)[0]
        chex.assert_equal(hidden.shape[0], decoder_input_ids.shape[0])
        logits, _ = self.decode_states(decoder_input_ids, hidden, attention_mask, decoder_attention_mask,
                                       deterministic=deterministic, segment_ids=decoder_segment_ids,
                                       encoder_segment_ids=encoder_segment_ids, positions=decoder_positions)
        return Seq2SeqOutput(logits=logits, encoder_last_hidden_state=hidden)


def init_variables(module: EncoderDecoderModule, rng: jax.Array) -> dict[str, Any]:
    """``module.init`` on a one-token pair: the variable tree, parameters boxed with their logical axes
    (``nn.Partitioned``). Shapes depend on ``module`` alone, values on ``rng``."""
    ids = jnp.ones((1, 1), jnp.int32)
    return module.init(rng, ids, ids, ids)


@partial(jax.jit, static_argnums=0)
def fresh_params(module: EncoderDecoderModule, rng: jax.Array) -> dict[str, Any]:
    """Fresh parameters (unboxed), jitted with ``module`` static: models of equal config and dtypes share one
    trace and one compilation in a process."""
    return nn.unbox(init_variables(module, rng))["params"]


@lru_cache(maxsize=64)
def abstract_variables(module: EncoderDecoderModule) -> dict[str, Any]:
    """``init_variables``' tree as ``jax.ShapeDtypeStruct`` leaves (boxed with their logical axes), traced once per
    distinct ``module`` in a process. Shared between callers: derive new trees from it, never change it."""
    return jax.eval_shape(partial(init_variables, module), jax.random.key(0))


def abstract_params(module: EncoderDecoderModule) -> dict[str, Any]:
    """The parameter tree of ``abstract_variables(module)``, unboxed: ``jax.ShapeDtypeStruct`` leaves."""
    return nn.unbox(abstract_variables(module))["params"]


def _without_tied_params(variables: dict[str, Any]) -> dict[str, Any]:
    """The decoder's variables without the parameters it reads from the encoder (what its tree stores)."""
    params = variables.get("params", {})
    kept = {name: {block: value for block, value in subtree.items() if block not in TIED_LAYER_BLOCKS}
            if name.startswith("layers_") or name == SCANNED_KEY else subtree
            for name, subtree in params.items() if name != "embeddings"}
    return {**variables, "params": kept}


def empty_cache(config: EncoderDecoderConfig, batch: int, max_length: int, dtype: Dtype) -> DecoderCache:
    """A ``DecoderCache`` of zeros for ``batch`` rows and ``max_length`` positions, at index 0."""
    return DecoderCache(init_cache(config.decoder_spec, batch, max_length, dtype, scanned=config.scan_layers),
                        jnp.zeros((), jnp.int32))


def apply_recording(module: nn.Module, variables, *args, output_attentions: bool = False,
                    output_hidden_states: bool = False, **kwargs) -> tuple[Any, dict[str, Any]]:
    """``module.apply(variables, *args, **kwargs)`` and the sown collections asked for: ``(result, records)``.

    With both flags off this is the plain ``apply`` (``records`` is empty): nothing is stored or kept alive.
    """
    mutable = [name for name, wanted in ((ATTENTIONS, output_attentions), (HIDDEN_STATES, output_hidden_states))
               if wanted]
    if not mutable:
        return module.apply(variables, *args, **kwargs), {}
    return module.apply(variables, *args, mutable=mutable, **kwargs)


def stack_records(records: dict[str, Any], stack: str, spec: TransformerSpec) -> dict[str, Layers | None]:
    """The recorded ``hidden_states`` / ``attentions`` / ``cross_attentions`` of the stack ``"encoder"`` or
    ``"decoder"`` (built from ``spec``), layer by layer; None for what was not recorded."""
    attentions = records.get(ATTENTIONS, {}).get(stack)
    states = records.get(HIDDEN_STATES, {}).get(stack)
    # scanned shared layers (ALBERT) record [groups, layers per group, ...]: one tuple entry per group's layer
    nested = attentions is not None and SCANNED_KEY in attentions and bool(spec.layer_groups)

    if attentions is not None:
        attentions = unstack_layers(attentions)
    if states is not None and SCANNED_KEY in states:
        # the unrolled layers' inputs, then the scanned layers' inputs (stacked), then the final output
        scanned = states[SCANNED_KEY]["states"][0]
        scanned = scanned.reshape(-1, *scanned.shape[-3:])
        states = {"states": tuple(states["states"][:-1]) + tuple(scanned) + tuple(states["states"][-1:])}

    def per_layer(block: str) -> Layers | None:
        if attentions is None or block not in attentions["layers_0"]:
            return None
        weights = lambda g: attentions[f"layers_{g}"][block]["weights"]
        return tuple(weights(g)[0][k] if nested else weights(g)[k]
                     for g, k in map(spec.layer_params, range(spec.num_layers)))

    return {"hidden_states": None if states is None else tuple(states["states"]),
            "attentions": per_layer("self_attention"), "cross_attentions": per_layer("cross_attention")}


def shift_tokens_right(labels: jax.Array, pad_token_id: int, decoder_start_token_id: int) -> jax.Array:
    """Decoder inputs from labels ``[batch, tgt_len]``: prepend the start token, drop the last, -100 -> pad."""
    shifted = jnp.concatenate(
        [jnp.full((labels.shape[0], 1), decoder_start_token_id, labels.dtype), labels[:, :-1]], axis=1)
    return jnp.where(shifted == -100, pad_token_id, shifted)


def token_loss_sum(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """Summed token cross-entropy and the number of counted tokens (labels != -100), float32 scalars.

    ``logits [batch, tgt_len, vocab]`` (any float dtype; computed in float32), ``labels [batch, tgt_len]`` int.
    With smoothing ``a`` the target is ``(1 - a) * one_hot + a / vocab`` (optax.smooth_labels, PyTorch's
    ``label_smoothing``), computed without materializing the one-hot.
    """
    chex.assert_equal(logits.shape[:-1], labels.shape)
    valid = labels != -100
    total = _masked_cross_entropy(logits.astype(jnp.float32), jnp.where(valid, labels, 0), valid, label_smoothing)
    return total, counted_tokens(labels)


def counted_tokens(labels: jax.Array) -> jax.Array:
    """float32 scalar: the label positions the loss counts (labels != -100)."""
    return jnp.sum(labels != -100).astype(jnp.float32)


def cross_entropy_loss(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Mean token cross-entropy over labels != -100, as ``torch.nn.CrossEntropyLoss`` (float32 scalar; 0 when no
    label counts). Shapes as ``token_loss_sum``."""
    total, count = token_loss_sum(logits, labels, label_smoothing)
    return total / jnp.maximum(count, 1.0)


@partial(jax.custom_jvp, nondiff_argnums=(3,))
def _masked_cross_entropy(logits, labels, valid, label_smoothing):
    """``sum over valid tokens of CE(logits, labels)``: float32 scalar from float32 ``[..., vocab]`` logits.

    Its own derivative, ``softmax - target`` in one pass over the logits from the exponentials of the forward pass
    (a JVP rule, so that forward mode works too and reverse mode is its transpose). Autodiff of log_softmax +
    gather took several passes, exponentials twice, a scatter into a zero array, and the gradient built twice
    (once transposed for the LM head's weight gradient): 20% of a bert2gpt2-small train step (50257-word
    vocabulary) on CPU.
    """
    return _masked_cross_entropy_parts(logits, labels, valid, label_smoothing)[0]


def _masked_cross_entropy_parts(logits, labels, valid, label_smoothing):
    """The summed loss, and its gradient with respect to ``logits`` (``[..., vocab]``)."""
    shift = jnp.max(logits, axis=-1, keepdims=True)  # [..., 1]
    exps = jnp.exp(logits - shift)  # [..., vocab]
    sums = jnp.sum(exps, axis=-1)  # [...]
    log_normalizer = jnp.log(sums) + shift[..., 0]
    losses = log_normalizer - jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    if label_smoothing:
        losses = (1.0 - label_smoothing) * losses + label_smoothing * (log_normalizer - jnp.mean(logits, axis=-1))
    vocab = logits.shape[-1]
    is_label = jnp.arange(vocab, dtype=labels.dtype) == labels[..., None]
    target = jnp.where(is_label, 1.0 - label_smoothing + label_smoothing / vocab, label_smoothing / vocab)
    gradient = jnp.where(valid[..., None], exps / sums[..., None] - target, 0.0)
    return jnp.sum(jnp.where(valid, losses, 0.0)), gradient


@_masked_cross_entropy.defjvp
def _masked_cross_entropy_jvp(label_smoothing, primals, tangents):
    logits, labels, valid = primals
    total, gradient = _masked_cross_entropy_parts(logits, labels, valid, label_smoothing)
    return total, jnp.sum(gradient * tangents[0])
