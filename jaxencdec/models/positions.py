"""Where each token of a stack sits and what it may see: position-table rows, query-key distances, segment
and causal masks (with or without a cache shared by beams)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from jaxencdec.spec import TransformerSpec


def positions_for(spec: TransformerSpec, input_ids: jax.Array, offset: jax.Array | int,
                  positions: jax.Array | None = None) -> jax.Array:
    """Position-table rows for ``input_ids [batch, length]`` whose first token sits at ``offset``; or, for packed
    rows, at ``positions`` (int32 ``[batch, length]``: each token's position in its own sequence, counting from 0
    in every segment; ``offset`` unused)."""
    if positions is not None:
        chex.assert_equal_shape([input_ids, positions])
        if spec.positions_from_padding:
            return (positions + 1) * (input_ids != spec.pad_token_id) + spec.pad_token_id
        return positions + spec.position_offset
    length = input_ids.shape[1]
    if spec.positions_from_padding:
        # RoBERTa: non-pad tokens count up from pad_token_id + 1; pads sit on pad_token_id.
        not_pad = (input_ids != spec.pad_token_id).astype(jnp.int32)
        return (jnp.cumsum(not_pad, axis=1) + offset) * not_pad + spec.pad_token_id
    positions = offset + jnp.arange(length, dtype=jnp.int32)[None, :]
    return jnp.broadcast_to(positions + spec.position_offset, input_ids.shape)


def relative_distances(query_pos: jax.Array, num_keys: int, cache_slots: jax.Array | None) -> jax.Array:
    """int32 ``[q_len, num_keys]``: each query's position minus each key's, for relative attention.

    ``query_pos`` and ``cache_slots`` as in ``self_attention_mask``: key ``s * max_length + j`` of a cache shared
    by slots sits at position ``j``, whichever beam wrote it (a distance depends on positions only).
    """
    max_length = num_keys if cache_slots is None else cache_slots.shape[1]
    key_pos = jnp.arange(num_keys, dtype=jnp.int32) % max_length
    return query_pos.astype(jnp.int32)[:, None] - key_pos[None, :]


def same_segment(query_segments: jax.Array, key_segments: jax.Array) -> jax.Array:
    """Bool ``[batch, 1, q_len, kv_len]``: which keys share each query's segment (packed rows: int32 segment ids
    ``[batch, q_len]`` and ``[batch, kv_len]``, one id per packed sequence)."""
    chex.assert_equal(query_segments.shape[0], key_segments.shape[0])
    return (query_segments[:, :, None] == key_segments[:, None, :])[:, None]


def self_attention_mask(query_pos: jax.Array, num_keys: int, cache_slots: jax.Array | None,
                        window: int | None = None) -> jax.Array:
    """Bool causal mask of decoder queries over ``num_keys`` keys (the inputs, or a cache); with ``window``, over
    the last ``window`` positions only (a query at ``q`` sees keys at ``q - window < k <= q``).

    Args:
      query_pos: int32 ``[q_len]``, the positions of the queries.
      cache_slots: None (key ``j`` is position ``j``), or int32 ``[rows, max_length]`` for a cache shared by
        ``slots = num_keys // max_length`` rows per input: for each row and position, the slot that holds the
        row's key at that position. Beam search follows each hypothesis's ancestors this way instead of
        reordering the cache.
    Returns:
      ``[1, 1, q_len, num_keys]`` without slots, else ``[rows // slots, 1, slots * q_len, num_keys]`` (the
      grouped layout of ``dot_product_attention``).
    """
    def causal(key_pos):  # [q_len, num_keys]
        seen = key_pos[None, :] <= query_pos[:, None]
        return seen if window is None else seen & (key_pos[None, :] > query_pos[:, None] - window)

    if cache_slots is None:
        return causal(jnp.arange(num_keys))[None, None]
    rows, max_length = cache_slots.shape
    chex.assert_is_divisible(num_keys, max_length)
    slots = num_keys // max_length
    key_slot, key_pos = jnp.divmod(jnp.arange(num_keys), max_length)  # key s * max_length + j is (s, j)
    causal = causal(key_pos)
    own = jnp.tile(cache_slots, (1, slots)) == key_slot[None, :]  # [rows, num_keys]
    mask = causal[None, :, :] & own[:, None, :]  # [rows, q_len, num_keys]
    return mask.reshape(rows // slots, 1, slots * query_pos.shape[0], num_keys)
