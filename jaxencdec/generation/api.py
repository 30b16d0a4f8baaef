"""The jitted generate: ``make_generate_fn`` (pure, for serving loops and TPUs) and ``generate`` (the
transformers-style method behind ``EncoderDecoderModel.generate``)."""

from __future__ import annotations

import dataclasses
import functools
import secrets
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxencdec.config import EncoderDecoderConfig
from jaxencdec.generation.config import GenerationConfig, GenerationConfigError
from jaxencdec.generation.processors import NEG_INF, LogitsProcessor, build_logits_processor
from jaxencdec.generation.search import SearchOutput, beam_search, sample_search
from jaxencdec.inputs import mask_or_ones, validate_token_ids
from jaxencdec.models.encoder_decoder import EncoderDecoderModule, ModelOutput, apply_recording, stack_records
from jaxencdec.models.transformer import init_cache
from jaxencdec.spec import TransformerSpec

# Source lengths are padded up to a multiple of this, so that inputs of similar length share one compilation.
SOURCE_BUCKET = 32
# Batches of more than one input are padded up to a multiple of this (2..8 inputs run as 8, 9..16 as 16, ...), so
# that batch sizes share compilations too; a single input runs alone (the interactive case pays no extra rows).
BATCH_BUCKET = 8

_traces = 0


def trace_count() -> int:
    """How many times a generate function has been traced (compiled) in this process; tests use it."""
    return _traces


Layers = tuple[np.ndarray, ...]


@struct.dataclass
class GenerateOutput(ModelOutput):
    """What ``generate`` returns with ``return_dict_in_generate`` (transformers' ``GenerateEncoderDecoderOutput``
    / ``GenerateBeamEncoderDecoderOutput`` fields). ``rows``: ``batch * num_beams`` for beam search, else
    ``batch * num_return_sequences``; ``steps``: the decoder steps run (``t`` counts from 0). The recorded fields
    are numpy arrays (float32 probabilities; hidden states in the compute dtype), None unless asked for."""

    sequences: jax.Array  # [batch * num_return_sequences, length] int32
    sequences_scores: jax.Array | None = None  # [batch * num_return_sequences] float32 (beam search only)
    encoder_attentions: Layers | None = None  # encoder layers x [batch, heads, src_len, src_len]
    encoder_hidden_states: Layers | None = None  # encoder layers + 1 x [batch, src_len, D_enc]
    decoder_attentions: tuple[Layers, ...] | None = None  # steps x decoder layers x [rows, heads, 1, t + 1]
    cross_attentions: tuple[Layers, ...] | None = None  # steps x decoder layers x [rows, heads, 1, src_len]
    decoder_hidden_states: tuple[Layers, ...] | None = None  # steps x (decoder layers + 1) x [rows, 1, D_dec]


def beam_fill_id(config: GenerationConfig) -> int:
    """The token transformers writes after the end of a beam hypothesis: ``pad_token_id or eos_token_id[0]`` when
    there is an EOS id, else -1. (A pad id of 0 is falsy there, so BERT-style models get the EOS id.)"""
    eos = config.eos_token_ids
    if not eos:
        return -1
    return config.pad_token_id if config.pad_token_id else eos[0]


def _end_padding_rows(process: LogitsProcessor, padding_rows: jax.Array, eos_id: int) -> LogitsProcessor:
    """``process`` plus a last step: the rows flagged in ``padding_rows [rows]`` (batch bucket padding) score every
    token but ``eos_id`` -inf, so they end at the first step, their beams leave the search at once, and they never
    keep the loop running. The other rows' scores are untouched (rows never mix)."""
    def end_padding_rows(sequences, cur_len, scores):  # scores [rows, vocab]
        eos_only = jnp.where(jnp.arange(scores.shape[-1]) == eos_id, 0.0, NEG_INF).astype(scores.dtype)
        return jnp.where(padding_rows[:, None], eos_only[None, :], scores)

    return LogitsProcessor(process.steps + (("end_padding_rows", end_padding_rows),))


def _rows_per_input(config: GenerationConfig) -> int:
    """The decoder rows the search runs per input: its beams, or its samples (``num_return_sequences``)."""
    return max(config.num_beams, config.num_return_sequences)


def _encoder_records(records: dict[str, Any], spec: TransformerSpec) -> dict[str, jax.Array] | None:
    """The encoder's recorded values stacked over layers: ``encoder_attentions [layers, batch, heads, src, src]``,
    ``encoder_hidden_states [layers + 1, batch, src, D_enc]`` (those recorded); None when nothing was."""
    if not records:
        return None
    encoder = stack_records(records, "encoder", spec)
    return {name: jnp.stack(encoder[key]) for name, key in (("encoder_attentions", "attentions"),
                                                           ("encoder_hidden_states", "hidden_states"))
            if encoder[key] is not None}


def _step_records(records: dict[str, Any], spec: TransformerSpec, cache_slots: jax.Array | None):
    """One decoder step's recorded values stacked over layers (None when nothing was recorded):
    ``decoder_attentions [layers, rows, heads, cache_length]`` float32 over the key positions in order,
    ``cross_attentions [layers, rows, heads, src_len]`` float32, ``decoder_hidden_states [layers + 1, rows, D]``.

    With beams sharing a cache (``cache_slots`` int32 ``[rows, cache_length]``, see ``search``) the probabilities
    come over ``slots * cache_length`` keys, slot-major; row ``r``'s key of position ``j`` is the one in slot
    ``cache_slots[r, j]`` (the other slots' keys are masked out, probability 0), so those are gathered back.
    """
    if not records:
        return None
    decoder = stack_records(records, "decoder", spec)
    step = {}
    if decoder["attentions"] is not None:
        probs = jnp.stack(decoder["attentions"])[:, :, :, 0]  # [layers, rows, heads, keys]: one query per row
        if cache_slots is not None:
            positions = cache_slots.shape[1]
            keys = cache_slots * positions + jnp.arange(positions)  # [rows, cache_length]
            probs = jnp.take_along_axis(probs, keys[None, :, None, :], axis=-1)
        step["decoder_attentions"] = probs
        step["cross_attentions"] = jnp.stack(decoder["cross_attentions"])[:, :, :, 0]
    if decoder["hidden_states"] is not None:
        step["decoder_hidden_states"] = jnp.stack(decoder["hidden_states"])[:, :, 0]  # [layers + 1, rows, D]
    return step


def _search_fn(model_config: EncoderDecoderConfig, config: GenerationConfig, dtype, param_dtype):
    """``(params, input_ids, attention_mask, prng_key, source_length=None, num_inputs=None) -> (SearchOutput,
    encoder_records)``, not yet jitted. ``config`` resolved. ``source_length`` (int32 scalar, traced): the columns
    of ``input_ids`` that are the caller's input, the rest being bucket padding (None: all of them). ``num_inputs``
    (int32 scalar, traced): the rows of ``input_ids`` that are the caller's, the rest being batch bucket padding
    (None: all of them); with an EOS id, padding rows end at once so that the search runs, and its ``length`` comes
    out, as without them.

    With ``config.output_attentions`` / ``output_hidden_states`` the encoder's values are recorded
    (``encoder_records``, see ``_encoder_records``) and every decoder step's (``SearchOutput.records``, see
    ``_step_records``); otherwise ``encoder_records`` is None and the loop records nothing."""
    module = EncoderDecoderModule(model_config, dtype=dtype, param_dtype=param_dtype)
    per_input = _rows_per_input(config)
    cache_length = config.max_length - 1  # the last token is never fed back
    record = dict(output_attentions=config.output_attentions, output_hidden_states=config.output_hidden_states)

    def run(params, input_ids, attention_mask, prng_key, source_length=None, num_inputs=None):
        global _traces
        _traces += 1  # Python side effect: runs once per trace, never per call
        variables = {"params": params}
        encoded, encoder_records = apply_recording(module, variables, input_ids, attention_mask, method="encode",
                                                   **record)  # [batch, src, D_enc]
        cross_kv = module.apply(variables, encoded, method="cross_kv")  # per layer [batch, src, h, d], once
        rows = input_ids.shape[0] * per_input  # row = b * per_input + k
        source_ids = jnp.repeat(input_ids, per_input, axis=0)  # [rows, src]
        source_valid = None if source_length is None else jnp.broadcast_to(
            jnp.arange(input_ids.shape[1])[None, :] < source_length, source_ids.shape)
        process = build_logits_processor(config, source_ids, source_valid)
        if num_inputs is not None and config.eos_token_ids:  # without an EOS id every row runs to max_length anyway
            process = _end_padding_rows(process, jnp.arange(rows) >= num_inputs * per_input,
                                        config.eos_token_ids[0])

        def decode(ids, cache, index, slots):
            # cross_kv and the source mask keep batch `batch`: attention folds the rows of one input together.
            cache_slots = None if slots is None else slots[:, :cache_length]
            (logits, cache), records = apply_recording(module, variables, ids, cross_kv, attention_mask, None, cache,
                                                       index, cache_slots, method="decode", **record)
            return logits[:, -1], cache, _step_records(records, model_config.decoder_spec, cache_slots)

        # The beams of an input share one cache, a slot each (one slot per row without beams).
        cache = init_cache(model_config.decoder_spec, rows // config.num_beams, cache_length, dtype,
                           slots=config.num_beams, scanned=model_config.scan_layers)
        start_ids = jnp.full((rows,), config.decoder_start_token_id, jnp.int32)
        rng = prng_key if config.do_sample else None
        if config.num_beams == 1:
            out = sample_search(decode, cache, start_ids, max_length=config.max_length, process=process,
                                eos_ids=config.eos_token_ids, pad_id=config.pad_token_id, do_sample=config.do_sample,
                                rng=rng)
        else:
            out = beam_search(decode, cache, start_ids, num_beams=config.num_beams, max_length=config.max_length,
                              process=process, eos_ids=config.eos_token_ids, fill_id=beam_fill_id(config),
                              length_penalty=float(config.length_penalty), early_stopping=config.early_stopping,
                              num_return_sequences=config.num_return_sequences, do_sample=config.do_sample, rng=rng)
        return out, _encoder_records(encoder_records, model_config.encoder_spec)

    return run


def _search_key(config: GenerationConfig) -> GenerationConfig:
    """The fields that change the computation. Recording attentions / hidden states does (only when they are
    returned: with ``return_dict_in_generate``); the other output options do not (one compilation serves both)."""
    attentions, states = (bool(config.return_dict_in_generate and wanted)
                          for wanted in (config.output_attentions, config.output_hidden_states))
    return dataclasses.replace(config, output_scores=False, return_dict_in_generate=attentions or states,
                               output_attentions=attentions, output_hidden_states=states)


@functools.lru_cache(maxsize=64)
def _jitted_search(model_config, config, dtype, param_dtype):
    return jax.jit(_search_fn(model_config, config, dtype, param_dtype))


def make_generate_fn(model_config: EncoderDecoderConfig, generation_config: GenerationConfig, *,
                     dtype=jnp.float32, param_dtype=jnp.float32):
    """A jitted, pure ``fn(params, input_ids, attention_mask, prng_key)`` for ``generation_config``'s mode.

    Args of ``fn``:
      params: the parameter tree (``model.params``), possibly sharded.
      input_ids: int32 ``[batch, src_len]``; attention_mask: ``[batch, src_len]``, nonzero = real token.
        Token ids must already be valid (``EncoderDecoderModel.generate`` checks them; here an out-of-range
        id would be clamped silently). ``encoder_repetition_penalty`` favours every id of ``input_ids``,
        padding included, as transformers does.
      prng_key: a PRNG key for sampling modes; ignored (may be None) otherwise.
    Returns:
      ``sequences`` int32 ``[batch * num_return_sequences, max_length]`` (``max_length`` counts the start token),
      padded after the end as transformers pads (greedy/sampling: ``pad_token_id``; beams: ``beam_fill_id``).
      With ``return_dict_in_generate``: a ``GenerateOutput`` whose ``sequences_scores [batch * n]`` are the
      beam scores when ``output_scores`` and ``num_beams > 1``. Attentions and hidden states are not returned
      here (``output_attentions`` / ``output_hidden_states`` with ``return_dict_in_generate`` are an error):
      ``generate`` returns them.

    Traced (new values reuse the compiled code): ``params``, ``input_ids``, ``attention_mask``, ``prng_key``.
    Static (a new value compiles again): ``model_config``, every field of ``generation_config`` (lengths, beams,
    penalties, temperature, top-k/p, token ids), ``dtype``/``param_dtype``, and the shapes ``batch`` and
    ``src_len``. Pad both to a few buckets to bound compilations, as ``generate`` does: ``src_len`` with masked
    pad tokens (multiples of ``SOURCE_BUCKET``), ``batch`` by repeating an input and dropping its output rows
    (multiples of ``BATCH_BUCKET``; rows never mix, so the other rows' results do not change).
    Called on sharded params and inputs under a ``Mesh``, ``jit`` propagates their shardings.
    """
    config = generation_config.resolve()
    check_against_model(config, model_config)
    key = _search_key(config)
    if key.output_attentions or key.output_hidden_states:
        raise GenerationConfigError(
            "make_generate_fn does not return attentions or hidden states (output_attentions / "
            "output_hidden_states with return_dict_in_generate); model.generate(..., return_dict_in_generate=True, "
            "output_attentions=True, output_hidden_states=True) returns them, or unset those options here")
    search = _search_fn(model_config, key, dtype, param_dtype)
    beams = config.num_beams > 1

    def generate_fn(params, input_ids, attention_mask, prng_key=None):
        if config.do_sample and prng_key is None:
            raise ValueError("sampling (do_sample=True) needs a prng_key, e.g. jax.random.key(0)")
        out, _ = search(params, input_ids, attention_mask, prng_key if config.do_sample else None)
        if not config.return_dict_in_generate:
            return out.sequences
        return GenerateOutput(out.sequences, out.scores if beams and config.output_scores else None)

    generate_fn.__doc__ = make_generate_fn.__doc__
    return jax.jit(generate_fn)


def _check_token(value, vocab_size: int, name: str) -> None:
    ids = value if isinstance(value, tuple) else (value,)
    for token in ids:
        if token is not None and not 0 <= token < vocab_size:
            raise GenerationConfigError(f"{name}={value!r} is outside the decoder vocabulary [0, {vocab_size})")


def check_against_model(config: GenerationConfig, model_config: EncoderDecoderConfig) -> None:
    """Raises GenerationConfigError if a resolved config does not fit the model (token ids, length)."""
    spec = model_config.decoder_spec
    vocab = spec.vocab_size
    _check_token(config.decoder_start_token_id, vocab, "decoder_start_token_id")
    _check_token(config.eos_token_ids, vocab, "eos_token_id")
    _check_token(config.forced_bos_token_id, vocab, "forced_bos_token_id")
    _check_token(config.forced_eos_token_id, vocab, "forced_eos_token_id")
    if config.eos_token_ids:  # finished rows feed the pad token back into the decoder
        _check_token(config.pad_token_id, vocab, "pad_token_id")
    for word in config.bad_words_ids or ():
        _check_token(word, vocab, "a bad_words_ids entry")
    if config.max_length - 1 > spec.max_length:
        raise GenerationConfigError(
            f"max_length {config.max_length} (start token included) needs {config.max_length - 1} decoder "
            f"positions, but the decoder embeds at most {spec.max_length}")
    if config.min_length > config.max_length:  # transformers warns and generates up to the maximum
        warnings.warn(f"unfeasible length constraints: min_new_tokens / min_length ask for {config.min_length - 1} "
                      f"new tokens, more than the {config.max_length - 1} that max_new_tokens / max_length allow; "
                      "generation stops at the maximum length. Decrease min_new_tokens or increase max_new_tokens.",
                      UserWarning, stacklevel=3)


# The token ids a model's config holds for generation.
MODEL_CONFIG_TOKENS = ("decoder_start_token_id", "pad_token_id", "eos_token_id")


def model_defaults(model) -> GenerationConfig:
    """``model.generation_config``, the ``MODEL_CONFIG_TOKENS`` it leaves unset taken from ``model.config`` as it
    is now: a config replaced after loading (``model.config = model.config.replace(decoder_start_token_id=101)``)
    counts, as transformers' generate reads the token ids of the model's config."""
    unset = {name: getattr(model.config, name) for name in MODEL_CONFIG_TOKENS
             if getattr(model.generation_config, name) is None and getattr(model.config, name) is not None}
    return model.generation_config.replace(**unset) if unset else model.generation_config


def merge_config(model_default: GenerationConfig, generation_config: GenerationConfig | None,
                 kwargs: dict[str, Any]) -> GenerationConfig:
    """transformers' precedence: keyword arguments > ``generation_config`` > the model's ``generation_config``."""
    config = model_default if generation_config is None else generation_config.fill_unset_from(model_default)
    return config.replace(**kwargs) if kwargs else config


def bucket_length(length: int, limit: int) -> int:
    """``length`` rounded up to a multiple of ``SOURCE_BUCKET``, at most ``limit`` (but never below ``length``)."""
    return max(length, min(-(-length // SOURCE_BUCKET) * SOURCE_BUCKET, limit))


def bucket_batch(batch: int) -> int:
    """``batch`` rounded up to a multiple of ``BATCH_BUCKET``; a single input stays alone."""
    return batch if batch == 1 else -(-batch // BATCH_BUCKET) * BATCH_BUCKET


def fresh_prng_key() -> jax.Array:
    """A new PRNG key from the operating system's entropy (64 bits), independent of any global state."""
    return jax.random.fold_in(jax.random.key(secrets.randbits(32)), secrets.randbits(32))


def _refuse_tracers(**arguments) -> None:
    """TypeError naming the first traced argument: ``generate`` checks its inputs on the host and trims its output
    to the longest sequence, so it cannot run under ``jax.jit`` / ``vmap`` / ``grad``."""
    for name, value in arguments.items():
        if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(value)):
            raise TypeError(
                f"model.generate got a traced {name}: it is being called inside jax.jit, vmap or grad. generate "
                "checks its inputs on the host and returns sequences trimmed to the longest one, so it cannot be "
                "traced. For a jitted pure function use fn = jaxencdec.make_generate_fn(model.config, "
                "model.generation_config.replace(max_new_tokens=...)), called as fn(model.params, input_ids, "
                "attention_mask, prng_key) (fixed-length sequences); or call model.generate outside the transform.")


def generate(model, input_ids, attention_mask=None, generation_config: GenerationConfig | None = None,
             prng_key: jax.Array | None = None, *, params=None, **kwargs):
    """Generates as transformers' ``EncoderDecoderModel.generate`` does, on one compiled function per mode/bucket.

    Args:
      model: an ``EncoderDecoderModel``.
      input_ids: ``[batch, src_len]`` token ids (numpy, jax or nested lists); attention_mask: same shape or None.
      generation_config: overrides ``model.generation_config`` (its unset fields are taken from the model's).
      prng_key: PRNG key for sampling; unused otherwise. Without one, every call draws a fresh key, so that two
        calls sample differently (as unseeded sampling in transformers); pass a key (``jax.random.key(0)``) to
        make the samples reproducible.
      params: parameters to use instead of ``model.params``.
      **kwargs: any ``GenerationConfig`` field (``max_new_tokens=...``, ``num_beams=...``); others are an error.
    Returns:
      int32 ``[batch * num_return_sequences, length]`` sequences starting with the decoder start token, in
      transformers' layout (padded after each end, columns past the longest returned sequence dropped). With
      ``return_dict_in_generate``: a ``GenerateOutput`` with ``sequences_scores [batch * num_return_sequences]``
      (beams with ``output_scores``) and, as transformers returns them (numpy arrays, see ``GenerateOutput``):
      with ``output_attentions``, ``encoder_attentions`` (per encoder layer ``[batch, heads, src_len, src_len]``),
      ``decoder_attentions`` and ``cross_attentions`` (per decoder step ``t``, per layer ``[rows, heads, 1, t + 1]``
      and ``[rows, heads, 1, src_len]``); with ``output_hidden_states``, ``encoder_hidden_states`` (layers + 1 x
      ``[batch, src_len, D_enc]``) and ``decoder_hidden_states`` (per step, layers + 1 x ``[rows, 1, D_dec]``).
      ``rows`` are ``batch * num_beams`` for beam search (step ``t``: the beams live at that step, before its
      selection, in their order then), else ``batch * num_return_sequences``; the encoder's are not repeated.
      Probabilities are float32, after the softmax (generation runs without dropout). There is one entry per decoder
      step run (beam search may run past the longest returned sequence, as transformers does; greedy and sampling
      record finished rows too, fed the pad token); the source's and the batch's bucket padding is cut off. Recording
      is compiled into the search: asking for it compiles once more per mode and bucket; without it the search
      is unchanged.

    One compilation serves each (mode, batch bucket, source bucket): a batch of more than one input is padded to a
    multiple of ``BATCH_BUCKET`` (8) with copies of its first input, which end at once and are dropped; the source
    to a multiple of ``SOURCE_BUCKET`` (32) with masked pad tokens, unless a row's mask is all zeros (such a row
    attends over all its positions). Neither changes the results. ``generate`` runs
    on the host side of JAX: under ``jax.jit`` / ``vmap`` it is a TypeError; jit ``make_generate_fn`` instead.
    """
    _refuse_tracers(input_ids=input_ids, attention_mask=attention_mask, prng_key=prng_key, params=params, **kwargs)
    config = merge_config(model_defaults(model), generation_config, kwargs).resolve()
    check_against_model(config, model.config)
    spec = model.config.encoder_spec
    ids = validate_token_ids(input_ids, spec.vocab_size, spec.max_length, "input_ids")
    mask = mask_or_ones(attention_mask, ids, "attention_mask")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must hold at least one token per row, got shape {ids.shape}")
    batch, length = ids.shape
    # A row with no real token attends uniformly over every position it has, so padding would change its output:
    # such a batch runs at its own length (one more compilation).
    bucket = bucket_length(length, spec.max_length) if np.asarray(mask).any(axis=1).all() else length
    if bucket > length:  # padded positions are masked out: the results do not change
        pad = spec.pad_token_id if spec.pad_token_id is not None else 0
        ids = np.pad(ids, ((0, 0), (0, bucket - length)), constant_values=pad)
        mask = np.pad(mask, ((0, 0), (0, bucket - length)))
    rows = bucket_batch(batch)
    if rows > batch:  # copies of the first input, ended at once by the search and dropped below
        ids = np.concatenate([ids, np.repeat(ids[:1], rows - batch, axis=0)])
        mask = np.concatenate([mask, np.repeat(mask[:1], rows - batch, axis=0)])
    if config.do_sample and prng_key is None:
        prng_key = fresh_prng_key()
    search = _jitted_search(model.config, _search_key(config), model.module.dtype, model.module.param_dtype)
    out, encoder_records = search(model.params if params is None else params, ids, mask,
                                  prng_key if config.do_sample else None, np.int32(length), np.int32(batch))
    kept = batch * config.num_return_sequences  # row b * num_return_sequences + j belongs to input b
    sequences = out.sequences[:kept, :int(out.length)]
    if not config.return_dict_in_generate:
        return sequences
    return GenerateOutput(sequences, out.scores[:kept] if config.num_beams > 1 and config.output_scores else None,
                          **_recorded_fields(encoder_records, out, batch, batch * _rows_per_input(config), length))


def _recorded_fields(encoder_records: dict[str, jax.Array] | None, out: SearchOutput, batch: int, rows: int,
                     length: int) -> dict[str, Any]:
    """``GenerateOutput``'s recorded fields in transformers' nesting, numpy on the host: the first ``batch``
    inputs and ``rows`` decoder rows (the rest is batch bucket padding), the first ``length`` source columns (the
    rest is source bucket padding), ``out.steps`` steps, step ``t``'s self-attention over its ``t + 1`` keys.
    Empty when nothing was recorded."""
    if encoder_records is None:
        return {}
    encoder, steps = jax.device_get(encoder_records), int(out.steps)
    decoder = jax.device_get(out.records)  # leaves [max_length - 1, layers (+ 1), rows_bucket, ...]
    fields = {}
    if "encoder_attentions" in encoder:
        fields["encoder_attentions"] = tuple(a[:batch, :, :length, :length] for a in encoder["encoder_attentions"])
        fields["decoder_attentions"] = tuple(tuple(a[:rows, :, None, :t + 1] for a in decoder["decoder_attentions"][t])
                                             for t in range(steps))
        fields["cross_attentions"] = tuple(tuple(a[:rows, :, None, :length] for a in decoder["cross_attentions"][t])
                                           for t in range(steps))
    if "encoder_hidden_states" in encoder:
        fields["encoder_hidden_states"] = tuple(h[:batch, :length] for h in encoder["encoder_hidden_states"])
        fields["decoder_hidden_states"] = tuple(tuple(h[:rows, None] for h in decoder["decoder_hidden_states"][t])
                                                for t in range(steps))
    return fields
