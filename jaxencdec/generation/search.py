"""The decoding loops: greedy / sampling, and beam search / beam sampling; one ``lax.while_loop`` each.

The loops know nothing about the model. They call a ``DecodeFn``::

    decode(ids [rows, 1] int32, cache, index int32 scalar, slots) -> (logits [rows, vocab] float32, cache, records)

that runs one decoder step at position ``index`` and returns the updated self-attention cache. ``slots`` is None
for greedy / sampling (one cache row per row). Beam search shares one cache among the beams of an input, one
slot per beam, and never reorders it: ``slots`` (int32 ``[rows, max_length]``) says, for each beam and position,
which slot holds that position's key (the slot of the ancestor that wrote it); each beam writes its new key into
its own slot. Cross-attention keys/values live inside the closure, projected once per input.

``records`` is None (nothing more is kept: the loop is the plain one), or a pytree of arrays that the step
computed (attention probabilities, hidden states) for its ``rows``: the loops store step ``t``'s records at index
``t`` of buffers with a leading ``[max_length - 1]`` axis (``SearchOutput.records``; steps not run stay zero).

Sequences include the decoder start token at position 0, so ``cur_len`` (the tokens so far) starts at 1 and
``max_length`` counts the start token, as in transformers. Both loops stop as soon as every row is done.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxencdec.generation.processors import LogitsProcessor, exact_divide, fast_top_k

DecodeFn = Callable[[jax.Array, Any, jax.Array, jax.Array | None], tuple[jax.Array, Any, Any]]

# transformers' beam search marks impossible candidates by adding this (not -inf), and so do we: the float32
# rounding of "score + -1e9" is part of which candidate wins.
BIG_NEGATIVE = -1.0e9


@struct.dataclass
class SearchOutput:
    sequences: jax.Array  # [rows_out, max_length] int32, filler after the end
    length: jax.Array  # [] int32: columns transformers would return (the rest is filler in every row)
    steps: jax.Array  # [] int32: decoder steps run (the records of steps >= this are zeros)
    scores: jax.Array | None = None  # [rows_out] float32: beam search's length-penalised sequence scores
    records: Any = None  # what decode recorded: each leaf [max_length - 1, ...], step t at index t (rows of step t)


def _record_buffers(decode: DecodeFn, ids: jax.Array, cache: Any, slots: jax.Array | None, max_length: int) -> Any:
    """Zeroed buffers for what ``decode`` records, each leaf ``[max_length - 1, *leaf shape]`` (None when it
    records nothing: the loop state then holds nothing more). Found by tracing ``decode`` abstractly."""
    shapes = jax.eval_shape(decode, ids, cache, jnp.int32(0), slots)[2]
    return jax.tree.map(lambda leaf: jnp.zeros((max_length - 1,) + leaf.shape, leaf.dtype), shapes)


def _store(buffers: Any, records: Any, step: jax.Array) -> Any:
    """``buffers`` with ``records`` written at index ``step`` (int32 scalar) of their leading axis."""
    return jax.tree.map(lambda buffer, record: jax.lax.dynamic_update_index_in_dim(buffer, record, step, 0),
                        buffers, records)


# ----------------------------------------------------------------------------------------------- greedy / sampling


def _first_argmax(scores: jax.Array) -> jax.Array:
    """``argmax`` over the last axis (the first index on ties, as torch.argmax): int32 ``[rows]``.

    XLA's TopK with k=1 runs several times faster on CPU than the variadic reduce behind ``jnp.argmax``.
    """
    return fast_top_k(scores, 1)[1][:, 0].astype(jnp.int32)


@struct.dataclass
class SampleState:
    cur_len: jax.Array  # [] int32, tokens so far (start token included)
    sequences: jax.Array  # [rows, max_length] int32
    finished: jax.Array  # [rows] bool: the row has produced an EOS
    cache: Any  # self-attention cache, one row per row
    rng: jax.Array | None  # PRNG key (sampling only)
    records: Any  # decode's records per step (see _record_buffers), or None


def sample_search(decode: DecodeFn, cache: Any, start_ids: jax.Array, *, max_length: int,
                  process: LogitsProcessor, eos_ids: tuple[int, ...], pad_id: int | None, do_sample: bool,
                  rng: jax.Array | None = None) -> SearchOutput:
    """Greedy decoding (argmax) or multinomial sampling, as transformers' ``_sample``.

    Args:
      start_ids: int32 ``[rows]``, the decoder start token of each row.
      process: the logits processors (with the sampling warpers when ``do_sample``), applied to the raw logits.
      eos_ids: a row that emits one of these is finished; finished rows are padded with ``pad_id``.
      rng: PRNG key, split once per step (sampling only).
    Returns:
      ``SearchOutput`` with ``[rows, max_length]`` sequences; the records of every step cover all ``rows``.
    """
    rows = start_ids.shape[0]
    fill = pad_id if pad_id is not None else 0
    sequences = jnp.full((rows, max_length), fill, jnp.int32).at[:, 0].set(start_ids)
    eos = jnp.asarray(eos_ids, jnp.int32)

    def cond(s: SampleState):
        return (s.cur_len < max_length) & ~jnp.all(s.finished)

    def body(s: SampleState) -> SampleState:
        ids = jax.lax.dynamic_slice_in_dim(s.sequences, s.cur_len - 1, 1, axis=1)  # [rows, 1]
        logits, cache, records = decode(ids, s.cache, s.cur_len - 1, None)
        scores = process(s.sequences, s.cur_len, logits)
        rng = s.rng
        if do_sample:  # Gumbel-max: a draw from softmax(scores)
            rng, key = jax.random.split(rng)
            scores = scores + jax.random.gumbel(key, scores.shape, scores.dtype)
        tokens = _first_argmax(scores)
        finished = s.finished
        if eos_ids:
            tokens = jnp.where(finished, jnp.int32(pad_id), tokens)
            finished = finished | jnp.any(tokens[:, None] == eos[None, :], axis=-1)
        sequences = jax.lax.dynamic_update_slice(s.sequences, tokens[:, None], (0, s.cur_len))
        records = _store(s.records, records, s.cur_len - 1)
        return SampleState(s.cur_len + 1, sequences, finished, cache, rng, records)

    buffers = _record_buffers(decode, sequences[:, :1], cache, None, max_length)
    state = SampleState(jnp.int32(1), sequences, jnp.zeros((rows,), bool), cache, rng, buffers)
    state = jax.lax.while_loop(cond, body, state)
    return SearchOutput(sequences=state.sequences, length=state.cur_len, steps=state.cur_len - 1,
                        records=state.records)


# --------------------------------------------------------------------------------------------------- beam search


@struct.dataclass
class BeamState:
    cur_len: jax.Array  # [] int32, tokens so far (start token included)
    running_sequences: jax.Array  # [batch, beams, max_length] int32, the live hypotheses
    running_scores: jax.Array  # [batch, beams] float32, their summed log-probabilities
    sequences: jax.Array  # [batch, beams, max_length] int32, the best finished hypotheses
    scores: jax.Array  # [batch, beams] float32, their length-penalised scores (-1e9: empty slot)
    lengths: jax.Array  # [batch, beams] int32, their generated tokens (0: empty slot)
    is_finished: jax.Array  # [batch, beams] bool, the slot holds a finished hypothesis
    improvable: jax.Array  # [batch, 1] bool, a live beam may still beat the worst finished one
    done: jax.Array  # [] bool
    slots: jax.Array  # [batch, beams, max_length] int32: the cache slot holding each live beam's key per position
    cache: Any  # self-attention cache shared by the beams of an input, one slot per beam (never reordered)
    rng: jax.Array | None  # PRNG key (beam sampling only)
    records: Any  # decode's records per step, rows = the live beams of that step (see _record_buffers), or None


def _gather_beams(x: jax.Array, indices: jax.Array) -> jax.Array:
    """``x [batch, n, ...]``, ``indices [batch, m]`` -> ``[batch, m, ...]``."""
    return jnp.take_along_axis(x, indices.reshape(indices.shape + (1,) * (x.ndim - 2)), axis=1)


def _length_table(max_length: int, length_penalty: float) -> jax.Array:
    """``table[n] = n ** length_penalty`` computed in float64 then rounded to float32, as transformers divides a
    float32 tensor by a Python float."""
    return jnp.asarray(np.array([float(n) ** length_penalty if n else 1.0 for n in range(max_length + 1)],
                                np.float64).astype(np.float32))


def beam_search(decode: DecodeFn, cache: Any, start_ids: jax.Array, *, num_beams: int, max_length: int,
                process: LogitsProcessor, eos_ids: tuple[int, ...], fill_id: int, length_penalty: float,
                early_stopping: bool | str, num_return_sequences: int, do_sample: bool = False,
                rng: jax.Array | None = None) -> SearchOutput:
    """Beam search (or beam sampling), step for step transformers 5's vectorised ``_beam_search``.

    Each step keeps the top ``2 * beams`` candidates (more with several EOS ids) over all beams: the best
    ``beams`` that did not end continue; those among the first ``beams`` that ended (EOS or max length) compete
    for the ``beams`` finished slots with score ``sum_logprobs / generated_len ** length_penalty``.
    ``early_stopping``: True stops once every input has ``beams`` finished hypotheses; False stops when the best
    live beam, at its current length, cannot beat the worst finished one; "never" uses the most favourable length.

    Args:
      start_ids: int32 ``[batch * beams]`` (beams of one input contiguous), the decoder start tokens.
      process: applied to the log-softmax of the logits (with the warpers when sampling).
      fill_id: the token after the end of a hypothesis (transformers: ``pad_token_id or eos_token_id[0]``).
      rng: PRNG key, split once per step (beam sampling only).
    Returns:
      ``SearchOutput`` with ``[batch * num_return_sequences, max_length]`` sequences, best first per input; the
      records of step ``t`` are those of the ``batch * beams`` beams live at that step, in their order then (before
      the step's selection), as transformers records them.
    """
    rows = start_ids.shape[0]
    batch, beams = rows // num_beams, num_beams
    keep = max(2, 1 + len(eos_ids)) * beams
    eos = jnp.asarray(eos_ids, jnp.int32)
    table = _length_table(max_length, length_penalty)
    early_true = early_stopping is True
    best_len_is_max = early_stopping == "never" and length_penalty > 0.0

    running = jnp.full((batch, beams, max_length), fill_id, jnp.int32)
    running = running.at[:, :, 0].set(start_ids.reshape(batch, beams))
    # Only beam 0 starts live, so the first step does not pick the same token in every beam.
    running_scores = jnp.zeros((batch, beams), jnp.float32).at[:, 1:].set(BIG_NEGATIVE)
    own_slot = jnp.broadcast_to(jnp.arange(beams, dtype=jnp.int32)[None, :, None], (batch, beams, max_length))

    def cond(s: BeamState):
        return ~s.done & (s.cur_len < max_length)

    def body(s: BeamState) -> BeamState:
        cur_len = s.cur_len
        flat_running = s.running_sequences.reshape(rows, max_length)
        ids = jax.lax.dynamic_slice_in_dim(flat_running, cur_len - 1, 1, axis=1)  # [rows, 1]
        logits, cache, records = decode(ids, s.cache, cur_len - 1, s.slots.reshape(rows, max_length))
        log_probs = process(flat_running, cur_len, jax.nn.log_softmax(logits, axis=-1))  # [rows, vocab]
        vocab = log_probs.shape[-1]
        log_probs = log_probs.reshape(batch, beams, vocab) + s.running_scores[:, :, None]
        log_probs = log_probs.reshape(batch, beams * vocab)

        rng = s.rng
        if do_sample:
            # Sampling `keep` candidates without replacement from softmax(log_probs) = Gumbel top-k.
            rng, key = jax.random.split(rng)
            _, top_indices = fast_top_k(log_probs + jax.random.gumbel(key, log_probs.shape), keep)
            top_scores = jnp.take_along_axis(log_probs, top_indices, axis=-1)
            order = jnp.argsort(-top_scores, axis=-1)
            top_scores = jnp.take_along_axis(top_scores, order, axis=-1)
            top_indices = jnp.take_along_axis(top_indices, order, axis=-1)
        else:
            top_scores, top_indices = fast_top_k(log_probs, keep)  # [batch, keep]
        source_beam = top_indices // vocab
        tokens = (top_indices % vocab).astype(jnp.int32)
        candidates = _gather_beams(s.running_sequences, source_beam)  # [batch, keep, max_length]
        candidates = jax.lax.dynamic_update_slice(candidates, tokens[:, :, None], (0, 0, cur_len))
        hits = jnp.any(tokens[:, :, None] == eos, axis=-1) | (cur_len + 1 >= max_length)  # [batch, keep]

        # The live beams: the best candidates that did not just end.
        live_scores = top_scores + hits.astype(jnp.float32) * BIG_NEGATIVE
        _, next_live = fast_top_k(live_scores, beams)  # [batch, beams]
        running_sequences = _gather_beams(candidates, next_live)
        running_scores = _gather_beams(live_scores, next_live)
        parent = _gather_beams(source_beam, next_live)  # [batch, beams]

        # The finished hypotheses: merge the ones that just ended (among the first `beams` candidates).
        just_finished = hits & (jnp.arange(keep) < beams)[None, :]
        finished_scores = exact_divide(top_scores, table[cur_len])  # generated length = cur_len + 1 - 1
        if early_true:
            full = jnp.all(s.is_finished, axis=-1, keepdims=True)
            finished_scores = finished_scores + full.astype(jnp.float32) * BIG_NEGATIVE
        finished_scores = finished_scores + (~s.improvable).astype(jnp.float32) * BIG_NEGATIVE
        finished_scores = finished_scores + (~just_finished).astype(jnp.float32) * BIG_NEGATIVE
        merged_scores = jnp.concatenate([s.scores, finished_scores], axis=1)  # [batch, beams + keep]
        _, best = fast_top_k(merged_scores, beams)
        sequences = _gather_beams(jnp.concatenate([s.sequences, candidates], axis=1), best)
        scores = _gather_beams(merged_scores, best)
        lengths = _gather_beams(jnp.concatenate([s.lengths, jnp.broadcast_to(cur_len, hits.shape)], axis=1), best)
        is_finished = _gather_beams(jnp.concatenate([s.is_finished, just_finished], axis=1), best)

        # A live beam sees its parent's keys; from the next position on, it writes into its own slot.
        slots = jnp.where(jnp.arange(max_length) >= cur_len, own_slot, _gather_beams(s.slots, parent))

        cur_len = cur_len + 1
        best_len = (max_length - 1) if best_len_is_max else cur_len - 1
        best_possible = exact_divide(running_scores[:, :1], table[best_len])
        worst_finished = jnp.where(is_finished, jnp.min(scores, axis=1, keepdims=True), BIG_NEGATIVE)
        improvable = s.improvable & jnp.any(best_possible > worst_finished, axis=-1, keepdims=True)
        keep_going = jnp.any(improvable) & ~(jnp.all(is_finished) & early_true) & ~jnp.all(hits)
        return BeamState(cur_len, running_sequences, running_scores, sequences, scores, lengths, is_finished,
                         improvable, ~keep_going, slots, cache, rng, _store(s.records, records, s.cur_len - 1))

    state = BeamState(
        cur_len=jnp.int32(1), running_sequences=running, running_scores=running_scores,
        sequences=running, scores=jnp.full((batch, beams), BIG_NEGATIVE, jnp.float32),
        lengths=jnp.zeros((batch, beams), jnp.int32), is_finished=jnp.zeros((batch, beams), bool),
        improvable=jnp.ones((batch, 1), bool), done=jnp.bool_(False), slots=own_slot, cache=cache, rng=rng,
        records=_record_buffers(decode, start_ids[:, None], cache, own_slot.reshape(rows, max_length), max_length),
    )
    state = jax.lax.while_loop(cond, body, state)
    n = num_return_sequences
    return SearchOutput(
        sequences=state.sequences[:, :n].reshape(batch * n, max_length),
        length=1 + jnp.max(state.lengths[:, :n]),
        steps=state.cur_len - 1,
        scores=state.scores[:, :n].reshape(batch * n),
        records=state.records,
    )
