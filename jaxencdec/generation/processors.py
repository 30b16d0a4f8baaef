"""Logits processors with transformers' semantics, applied in transformers' order.

Every processor is a pure function ``(sequences, cur_len, scores) -> scores`` where

* ``sequences``: int32 ``[rows, max_length]``, the tokens so far in positions ``< cur_len`` (the decoder start
  token is position 0, as in transformers' ``input_ids`` for encoder-decoders); later positions hold filler.
* ``cur_len``: int32 scalar (traced), the number of tokens so far.
* ``scores``: float32 ``[rows, vocab]``: raw logits (greedy, sampling) or log-probabilities (beam search), exactly
  what transformers hands its processors in each mode.

Shapes are static; every length-dependent decision is a ``jnp.where`` on the traced ``cur_len``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxencdec.generation.config import GenerationConfig

Processor = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]

NEG_INF = -jnp.inf


def exact_divide(x: jax.Array, divisor) -> jax.Array:
    """``x / divisor`` correctly rounded, as PyTorch divides.

    XLA rewrites a division by a broadcast scalar into a multiplication by its reciprocal, which is off by one ulp
    for about a fifth of the values; enough to flip a near-tie against transformers. Dividing by a full array
    behind an optimization barrier keeps the true division.
    """
    divisor = jnp.broadcast_to(jnp.asarray(divisor, x.dtype), x.shape)
    return x / jax.lax.optimization_barrier(divisor)


TOP_K_BLOCK = 256


def _plain_top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    # When only the values are used, XLA:CPU rewrites TopK into a full sort of the row (100x slower on a 30k
    # vocabulary); an optimization barrier on both outputs keeps the TopK.
    return jax.lax.optimization_barrier(jax.lax.top_k(x, k))


def fast_top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Exactly ``lax.top_k`` over the last axis (ties: the lower index first), 3x faster on long rows on CPU.

    Long rows are cut into blocks of ``TOP_K_BLOCK``; the ``k`` best elements lie in the ``k`` blocks with the
    best maxima (ties between blocks go to the lower block, whose indices are lower), so one vectorised max per
    block and two small TopKs replace a TopK over the whole row.
    """
    n = x.shape[-1]
    if 8 * k * TOP_K_BLOCK > n:  # the k candidate blocks would be over an eighth of the row
        return _plain_top_k(x, k)
    num_blocks = -(-n // TOP_K_BLOCK)
    padded = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, num_blocks * TOP_K_BLOCK - n)], constant_values=-jnp.inf)
    blocks = padded.reshape(x.shape[:-1] + (num_blocks, TOP_K_BLOCK))
    best_blocks = jnp.sort(_plain_top_k(blocks.max(axis=-1), k)[1], axis=-1)  # [..., k], ascending
    candidates = jnp.take_along_axis(blocks, best_blocks[..., None], axis=-2)  # [..., k, block]
    values, within = _plain_top_k(candidates.reshape(x.shape[:-1] + (k * TOP_K_BLOCK,)), k)
    block = jnp.take_along_axis(best_blocks, within // TOP_K_BLOCK, axis=-1)
    return values, block * TOP_K_BLOCK + within % TOP_K_BLOCK


def _scatter_rows(rows: int, vocab_size: int, token_ids: jax.Array, keep: jax.Array) -> jax.Array:
    """Bool ``[rows, vocab]``: True at ``token_ids [rows, n]`` where ``keep [rows, n]``.

    Entries not kept go to a spare column past the vocabulary, which is dropped (as transformers does).
    """
    ids = jnp.where(keep, token_ids, vocab_size)
    hit = jnp.zeros((rows, vocab_size + 1), bool).at[jnp.arange(rows)[:, None], ids].set(True)
    return hit[:, :vocab_size]


def encoder_repetition_penalty(sequences, cur_len, scores, *, penalty: float, source_ids: jax.Array,
                               source_valid: jax.Array):
    """Every token of the encoder input: score * (1 / penalty) if < 0, else score / (1 / penalty), so a penalty
    above 1 favours copying from the source (transformers' ``EncoderRepetitionPenaltyLogitsProcessor``).

    ``source_ids``: int32 ``[rows, src_len]``, each row's encoder input (padding included, as transformers takes
    the whole ``input_ids``); ``source_valid``: bool ``[rows, src_len]``, False for bucket padding added after the
    caller's input.
    """
    seen = _scatter_rows(scores.shape[0], scores.shape[-1], source_ids, source_valid)
    inverse = 1 / penalty
    favoured = jnp.where(scores < 0, scores * inverse, exact_divide(scores, inverse))
    return jnp.where(seen, favoured, scores)


def repetition_penalty(sequences, cur_len, scores, *, penalty: float):
    """Every token already in the sequence (start token included): score / penalty if > 0, else * penalty."""
    rows, length = sequences.shape
    seen = _scatter_rows(rows, scores.shape[-1], sequences, jnp.arange(length)[None, :] < cur_len)
    penalised = jnp.where(scores < 0, scores * penalty, exact_divide(scores, penalty))
    return jnp.where(seen, penalised, scores)


def _ngram_windows(ids: jax.Array, n: int) -> jax.Array:
    """Every n-gram of each row: int32 ``[rows, length - n + 1, n]``."""
    return jnp.stack([ids[:, j:j + ids.shape[1] - n + 1] for j in range(n)], axis=-1)


def _ban_completions(sequences, cur_len, scores, windows, counted, n: int):
    """-inf at the last token of every counted window (``[rows, windows, n]``, ``counted [rows, windows]``) whose
    first n-1 tokens equal the sequence's last n-1 tokens."""
    prefix = jax.lax.dynamic_slice_in_dim(sequences, jnp.maximum(cur_len - (n - 1), 0), n - 1, axis=1)
    matches = jnp.all(windows[..., :-1] == prefix[:, None, :], axis=-1) & counted
    banned = _scatter_rows(scores.shape[0], scores.shape[-1], windows[..., -1], matches)
    return jnp.where(banned, NEG_INF, scores)


def no_repeat_ngram(sequences, cur_len, scores, *, ngram_size: int):
    """Bans every token that would complete an n-gram already present in the sequence."""
    n = ngram_size
    num_windows = sequences.shape[1] - n + 1
    if num_windows <= 0:  # no n-gram fits in max_length: nothing can ever be banned
        return scores
    complete = jnp.arange(num_windows) + n <= cur_len  # [windows]: the window lies inside the sequence
    counted = jnp.broadcast_to(complete[None, :] & (cur_len >= n), (sequences.shape[0], num_windows))
    return _ban_completions(sequences, cur_len, scores, _ngram_windows(sequences, n), counted, n)


def encoder_no_repeat_ngram(sequences, cur_len, scores, *, ngram_size: int, source_ids: jax.Array,
                            source_valid: jax.Array):
    """Bans every token that would complete an n-gram of the row's encoder input (transformers'
    ``EncoderNoRepeatNGramLogitsProcessor``), once the sequence holds n-1 tokens (start token included).
    ``source_ids`` / ``source_valid`` as in ``encoder_repetition_penalty``: an n-gram counts only if all its
    columns are valid."""
    n = ngram_size
    if source_ids.shape[1] < n:
        return scores
    counted = jnp.all(_ngram_windows(source_valid, n), axis=-1) & (cur_len >= n - 1)
    return _ban_completions(sequences, cur_len, scores, _ngram_windows(source_ids, n), counted, n)


def bad_words(sequences, cur_len, scores, *, single: tuple[int, ...], multi: tuple[tuple[int, ...], ...]):
    """Adds -inf to banned single tokens, and to the last token of a banned sequence whose prefix ends the input."""
    vocab_size = scores.shape[-1]
    single_bias = np.zeros((vocab_size,), np.float32)
    single_bias[list(single)] = -np.inf
    bias = jnp.broadcast_to(jnp.asarray(single_bias), scores.shape)
    length = sequences.shape[1]
    for word in multi:
        prefix_len = len(word) - 1
        if prefix_len >= length:  # the prefix cannot fit before the last position: it never matches
            continue
        tail = jax.lax.dynamic_slice_in_dim(sequences, jnp.maximum(cur_len - prefix_len, 0), prefix_len, axis=1)
        match = jnp.all(tail == jnp.asarray(word[:-1], sequences.dtype)[None, :], axis=-1) & (cur_len >= prefix_len)
        bias = bias.at[:, word[-1]].add(jnp.where(match, NEG_INF, 0.0))
    return scores + bias


def min_length(sequences, cur_len, scores, *, min_len: int, eos: tuple[int, ...]):
    """EOS is impossible while the sequence is shorter than ``min_len`` (start token included)."""
    is_eos = np.isin(np.arange(scores.shape[-1]), eos)
    return jnp.where((cur_len < min_len) & is_eos[None, :], NEG_INF, scores)


def _force(scores, token_ids: tuple[int, ...], when):
    forced = np.full(scores.shape[-1], -np.inf, np.float32)
    forced[list(token_ids)] = 0.0
    return jnp.where(when, jnp.broadcast_to(jnp.asarray(forced), scores.shape), scores)


def forced_bos(sequences, cur_len, scores, *, token_id: int):
    """The first generated token is ``token_id``."""
    return _force(scores, (token_id,), cur_len == 1)


def forced_eos(sequences, cur_len, scores, *, token_ids: tuple[int, ...], max_len: int):
    """The last token (at position ``max_len - 1``) is an EOS id."""
    return _force(scores, token_ids, cur_len == max_len - 1)


def remove_invalid_values(sequences, cur_len, scores):
    """transformers' ``InfNanRemoveLogitsProcessor``: NaN -> 0, +inf -> the largest float, -inf -> the smallest."""
    limits = jnp.finfo(scores.dtype)
    scores = jnp.where(jnp.isnan(scores), 0.0, scores)
    return jnp.where(jnp.isposinf(scores), limits.max, jnp.where(jnp.isneginf(scores), limits.min, scores))


def temperature(sequences, cur_len, scores, *, value: float):
    return exact_divide(scores, value)


def top_k(sequences, cur_len, scores, *, k: int):
    """Keeps the ``k`` best scores (and any tied with the k-th)."""
    k = min(k, scores.shape[-1])
    kth = fast_top_k(scores, k)[0][..., -1:]
    return jnp.where(scores < kth, NEG_INF, scores)


def top_p(sequences, cur_len, scores, *, p: float, min_keep: int):
    """Keeps the smallest set of best tokens whose probability mass exceeds ``p`` (at least ``min_keep``)."""
    rows = scores.shape[0]
    order = jnp.argsort(scores, axis=-1)  # ascending, as transformers sorts
    sorted_scores = jnp.take_along_axis(scores, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_scores, axis=-1), axis=-1)
    remove_sorted = cumulative <= 1 - p
    remove_sorted = remove_sorted.at[:, -min_keep:].set(False)
    remove = jnp.zeros_like(remove_sorted).at[jnp.arange(rows)[:, None], order].set(remove_sorted)
    return jnp.where(remove, NEG_INF, scores)


@dataclass(frozen=True)
class LogitsProcessor:
    """An ordered list of named processors; calling it applies them in order."""

    steps: tuple[tuple[str, Processor], ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.steps)

    def __call__(self, sequences: jax.Array, cur_len: jax.Array, scores: jax.Array) -> jax.Array:
        for _, step in self.steps:
            scores = step(sequences, cur_len, scores)
        return scores


def build_logits_processor(config: GenerationConfig, source_ids: jax.Array | None = None,
                           source_valid: jax.Array | None = None) -> LogitsProcessor:
    """The processors transformers' ``_get_logits_processor`` would build for ``config``, in its order:

    encoder repetition penalty (on ``source_ids [rows, src_len]``, each row's encoder input, and ``source_valid``,
    default all True: see ``encoder_repetition_penalty``), repetition penalty, no-repeat n-gram, encoder no-repeat
    n-gram (same inputs), bad words, min length (``min_new_tokens`` folded in by ``resolve``), forced BOS, forced
    EOS, invalid-value removal, then with sampling the warpers temperature, top-k, top-p.
    """
    c = config.resolve()
    eos = c.eos_token_ids
    steps: list[tuple[str, Processor]] = []
    if c.encoder_repetition_penalty != 1.0 or c.encoder_no_repeat_ngram_size > 0:
        if source_ids is None:
            raise ValueError("encoder_repetition_penalty and encoder_no_repeat_ngram_size need the encoder input "
                             "ids (source_ids)")
        if source_valid is None:
            source_valid = jnp.ones(source_ids.shape, bool)
    if c.encoder_repetition_penalty != 1.0:
        steps.append(("encoder_repetition_penalty",
                      partial(encoder_repetition_penalty, penalty=float(c.encoder_repetition_penalty),
                              source_ids=source_ids, source_valid=source_valid)))
    if c.repetition_penalty != 1.0:
        steps.append(("repetition_penalty", partial(repetition_penalty, penalty=float(c.repetition_penalty))))
    if c.no_repeat_ngram_size > 0:
        steps.append(("no_repeat_ngram", partial(no_repeat_ngram, ngram_size=c.no_repeat_ngram_size)))
    if c.encoder_no_repeat_ngram_size > 0:
        steps.append(("encoder_no_repeat_ngram",
                      partial(encoder_no_repeat_ngram, ngram_size=c.encoder_no_repeat_ngram_size,
                              source_ids=source_ids, source_valid=source_valid)))
    if c.bad_words_ids is not None:
        # transformers drops a bad word that is exactly one EOS id.
        words = [w for w in c.bad_words_ids if not (len(w) == 1 and w[0] in eos)]
        if words:
            steps.append(("bad_words", partial(bad_words, single=tuple(w[0] for w in words if len(w) == 1),
                                               multi=tuple(w for w in words if len(w) > 1))))
    if c.min_length > 0 and eos:
        steps.append(("min_length", partial(min_length, min_len=c.min_length, eos=eos)))
    if c.forced_bos_token_id is not None:
        steps.append(("forced_bos", partial(forced_bos, token_id=c.forced_bos_token_id)))
    if c.forced_eos_token_id is not None:
        forced = c.forced_eos_token_id if isinstance(c.forced_eos_token_id, tuple) else (c.forced_eos_token_id,)
        steps.append(("forced_eos", partial(forced_eos, token_ids=forced, max_len=c.max_length)))
    if c.remove_invalid_values:
        steps.append(("remove_invalid_values", remove_invalid_values))
    if c.do_sample:
        # Beam sampling keeps one non-EOS candidate more than there are EOS ids (transformers' min_tokens_to_keep).
        min_keep = (len(eos) + 1 if eos else 2) if c.num_beams > 1 else 1
        if c.temperature != 1.0:
            steps.append(("temperature", partial(temperature, value=float(c.temperature))))
        if c.top_k != 0:
            steps.append(("top_k", partial(top_k, k=max(c.top_k, min_keep))))
        if c.top_p < 1.0:
            steps.append(("top_p", partial(top_p, p=float(c.top_p), min_keep=min_keep)))
    return LogitsProcessor(tuple(steps))


def processor_names(config: GenerationConfig) -> Sequence[str]:
    """The names of the processors ``config`` enables, in application order."""
    return build_logits_processor(config, source_ids=jnp.zeros((1, 1), jnp.int32)).names
