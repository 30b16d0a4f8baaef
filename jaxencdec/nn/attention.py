"""One multi-head attention for self, causal and cross attention, with a static-shape KV cache."""

from __future__ import annotations

from functools import partial

import chex
import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct

from jaxencdec.nn.layers import (DirectParams, Dropout, Dtype, Embed, Rotary, einsum_float32, norm_layer, normal_init,
                                 rotary, zeros_init)


# The variable collection that attention probabilities are sown into (``Module.sow``): make it mutable in
# ``apply`` to record them; otherwise nothing is stored and the probabilities cost nothing beyond the attention.
ATTENTIONS = "attentions"


@struct.dataclass
class KeyValue:
    """Projected keys and values of one attention layer."""

    # Heads-major, so a decoding step reads each head's keys contiguously (no re-layout per step).
    key: jax.Array  # [batch, heads, kv_length, head_dim]
    value: jax.Array  # [batch, heads, kv_length, head_dim]


def write_cache(cache: KeyValue, new: KeyValue, index: jax.Array, layer: jax.Array | None = None) -> KeyValue:
    """Writes ``new`` (``[rows, heads, q_len, head_dim]``) into ``cache`` at position ``index`` (int32 scalar).

    ``cache`` is ``[batch, heads, slots * max_length, head_dim]`` with ``rows = batch * slots``: the rows of one
    input (its beams) share one cache, row ``b * slots + s`` writing the positions of slot ``s``. With one slot
    per input this is a plain per-row cache. With ``layer`` (int32 scalar) the cache holds every layer,
    ``[layers, batch, heads, slots * max_length, head_dim]`` (scanned layers), and ``new`` goes into that layer's:
    only the new positions are written, so the stacked cache is updated in place.
    """
    batch, heads, total, head_dim = cache.key.shape[-4:]
    chex.assert_is_divisible(new.key.shape[0], batch)
    slots = new.key.shape[0] // batch
    q_len = new.key.shape[2]
    lead = cache.key.shape[:-4]  # () or (layers,)
    start = (() if layer is None else (layer,)) + (0, 0, 0, index, 0)

    def write(stored, fresh):
        fresh = fresh.reshape(batch, slots, heads, q_len, head_dim).transpose(0, 2, 1, 3, 4)
        fresh = fresh.reshape((1,) * len(lead) + fresh.shape)
        stored = stored.reshape(*lead, batch, heads, slots, total // slots, head_dim)
        stored = jax.lax.dynamic_update_slice(stored, fresh.astype(stored.dtype), start)
        return stored.reshape(*lead, batch, heads, total, head_dim)

    return KeyValue(key=write(cache.key, new.key), value=write(cache.value, new.value))


def layer_of(cache: KeyValue, layer: jax.Array) -> KeyValue:
    """Layer ``layer``'s part (``[batch, heads, length, head_dim]``) of a cache stacked over layers."""
    return KeyValue(key=jax.lax.dynamic_index_in_dim(cache.key, layer, keepdims=False),
                    value=jax.lax.dynamic_index_in_dim(cache.value, layer, keepdims=False))


def dot_product_attention(
    query: jax.Array, kv: KeyValue, mask: jax.Array, dropout: Dropout, deterministic: bool,
    bias: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Softmax attention; softmax in float32 whatever the compute dtype.

    Args:
      query: ``[batch, q_len, heads, head_dim]``, already scaled by ``head_dim ** -0.5``.
      kv: keys/values ``[kv_batch, kv_heads, kv_len, head_dim]``. ``batch`` may be a multiple of ``kv_batch``
        (beam search: each input's keys serve all its beams, which are folded into the query length); ``heads`` a
        multiple of ``kv_heads`` (grouped-query attention: key/value head ``j`` serves query heads
        ``j * heads // kv_heads ...``).
      mask: bool, broadcastable to ``[batch, 1, q_len, kv_len]``; when grouped, to
        ``[kv_batch, 1, groups * q_len, kv_len]`` (query row ``b * groups + g``, position ``t`` at ``g * q_len + t``).
      bias: None, or float32 ``[kv_batch, heads, groups * q_len, kv_len]`` (the grouped layout) added to the
        scores before the mask (relative position scores, already scaled).
    Returns:
      ``(out [batch, q_len, heads, head_dim], probs [batch, heads, q_len, kv_len] float32)``: ``probs`` are the
      attention weights applied to the values, float32: the softmax, after dropout when it is active, as
      transformers returns them (unused, they cost nothing: XLA drops them).
    """
    batch, q_len, heads, head_dim = query.shape
    kv_batch = kv.key.shape[0]
    chex.assert_is_divisible(batch, kv_batch)
    groups = batch // kv_batch
    if kv.key.shape[1] != heads:
        chex.assert_is_divisible(heads, kv.key.shape[1])
        kv = jax.tree.map(lambda a: jnp.repeat(a, heads // a.shape[1], axis=1), kv)
    # Heads-major queries: XLA:CPU runs the two batched matmuls 2-4x faster than with "bqhd" operands.
    query = query.reshape(kv_batch, groups * q_len, heads, head_dim).transpose(0, 2, 1, 3)  # [kv_b, h, g*q, d]
    scores = einsum_float32("bhqd,bhkd->bhqk", query, kv.key)
    if bias is not None:
        scores = scores + bias
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = dropout(jax.nn.softmax(scores, axis=-1), deterministic=deterministic)
    out = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(kv.value.dtype), kv.value)
    probs = probs.reshape(kv_batch, heads, groups, q_len, -1).transpose(0, 2, 1, 3, 4)  # query row b * groups + g
    return out.transpose(0, 2, 1, 3).reshape(batch, q_len, heads, head_dim), probs.reshape(batch, heads, q_len, -1)


class HeadsProjection(DirectParams):
    """``y = x @ kernel + bias`` between a width and attention heads: ``split`` maps ``[..., D_in]`` to
    ``[..., heads, head_dim]`` (kernel ``[D_in, heads, head_dim]``, bias ``[heads, head_dim]``), otherwise
    ``[..., heads, head_dim]`` to ``[..., features]`` (kernel ``[heads, head_dim, features]``, bias
    ``[features]``); without ``use_bias``, no bias. Inputs, kernel and bias are cast to ``dtype`` (the compute
    dtype) first.

    The kernel is stored 3-D (logical axes ``embed``, ``heads``, ``kv``) and multiplied as a 2-D matrix over
    flattened heads. For query, key and value that keeps ``embed`` the major dimension of the kernel's gradient,
    which XLA:TPU then reduce-scatters over ``fsdp``; the 3-D contraction's gradient gets ``embed`` as its
    minor-most dimension and is all-reduced at full size instead (``tests/test_tpu_programs.py``). The out
    kernel's gradient has ``embed`` minor-most either way: libtpu reduce-scatters it with the layout flags of
    ``jaxencdec.parallel.libtpu_flags``. ``split``
    also flattens the inputs' leading dimensions into rows: with them kept, libtpu 0.0.42 overflows its stack
    compiling the scanned, rematerialized backward pass.
    """

    split: bool
    num_heads: int
    head_dim: int
    features: int
    std: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True

    def _bias(self, axes: tuple[str, ...], shape: tuple[int, ...]) -> jax.Array | int:
        if not self.use_bias:
            return 0
        return self.param("bias", zeros_init(axes), shape, self.param_dtype).reshape(-1).astype(self.dtype)

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        heads = (self.num_heads, self.head_dim)
        width = self.num_heads * self.head_dim
        if self.split:
            kernel = self.param("kernel", normal_init(self.std, ("embed", "heads", "kv")), (inputs.shape[-1], *heads),
                                self.param_dtype).reshape(-1, width)
            rows = inputs.reshape(-1, inputs.shape[-1]).astype(self.dtype)
            out = rows @ kernel.astype(self.dtype) + self._bias(("heads", "kv"), heads)
            return out.reshape(*inputs.shape[:-1], *heads)
        chex.assert_shape(inputs, (..., *heads))
        kernel = self.param("kernel", normal_init(self.std, ("heads", "kv", "embed")), (*heads, self.features),
                            self.param_dtype).reshape(width, self.features)
        merged = inputs.reshape(*inputs.shape[:-2], width).astype(self.dtype)
        return merged @ kernel.astype(self.dtype) + self._bias(("embed",), (self.features,))


class Attention(nn.Module):
    """Multi-head attention ``[batch, q_len, D] -> [batch, q_len, D]``.

    Parameters: ``query``/``key``/``value`` kernels ``[D_in, heads, head_dim]`` with biases ``[heads, head_dim]``
    (``key``/``value``: ``num_kv_heads`` heads when set, grouped-query attention) and ``out`` kernel
    ``[heads, head_dim, features]`` with bias ``[features]`` (``features``: the output width, ``heads * head_dim``
    when 0); ``qkv_bias`` / ``out_bias`` False drop those biases. Masks are built by the caller; this module only
    projects, attends and mixes heads. The caller may pass rotary angles (RoPE): queries and keys are rotated by
    them. ``qk_norm`` (a ``norm_layer`` kind, or None): each query and key head is normalized over its width
    (``query_norm``, ``key_norm``, ``[head_dim]``; Gemma 3) before the rotation. Queries are scaled by
    ``query_scale`` (0: ``head_dim ** -0.5``).

    ``relative`` ("key" or "key_query", transformers 4's ``relative_key`` / ``relative_key_query``) adds a
    ``distance/embedding`` table ``[2 * max_distance - 1, head_dim]``: with ``E`` its row for a query-key
    distance, the score of that pair gains ``query . E`` (and ``key . E`` for "key_query"), scaled by
    ``head_dim ** -0.5`` like the dot product. The caller passes the distances.
    """

    num_heads: int
    head_dim: int
    std: float
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    relative: str | None = None
    max_distance: int = 0
    num_kv_heads: int | None = None
    features: int = 0
    qkv_bias: bool = True
    out_bias: bool = True
    qk_norm: str | None = None
    norm_eps: float = 1e-6
    query_scale: float = 0.0

    def setup(self):
        project = partial(HeadsProjection, head_dim=self.head_dim, std=self.std, dtype=self.dtype,
                          param_dtype=self.param_dtype, features=self.features or self.num_heads * self.head_dim)
        kv_heads = self.num_kv_heads or self.num_heads
        self.query = project(split=True, num_heads=self.num_heads, use_bias=self.qkv_bias)
        self.key = project(split=True, num_heads=kv_heads, use_bias=self.qkv_bias)
        self.value = project(split=True, num_heads=kv_heads, use_bias=self.qkv_bias)
        self.out = project(split=False, num_heads=self.num_heads, use_bias=self.out_bias)
        if self.qk_norm:
            self.query_norm = norm_layer(self.qk_norm, self.norm_eps, self.dtype, self.param_dtype)
            self.key_norm = norm_layer(self.qk_norm, self.norm_eps, self.dtype, self.param_dtype)
        self.dropout = Dropout(self.dropout_rate)
        if self.relative:
            self.distance = Embed(2 * self.max_distance - 1, self.head_dim, dtype=self.dtype,
                                  param_dtype=self.param_dtype,
                                  embedding_init=normal_init(self.std, ("positions", "kv")))

    def project_kv(self, inputs: jax.Array, angles: Rotary | None = None) -> KeyValue:
        """``[batch, kv_len, D_in] -> KeyValue`` of ``[batch, kv_heads, kv_len, head_dim]``; the keys normalized
        (``qk_norm``) and rotated by ``angles`` (``nn.layers.rotary_angles`` of the keys' positions) when given."""
        key = self.key(inputs)
        if self.qk_norm:
            key = self.key_norm(key)
        if angles is not None:
            key = rotary(key, angles)
        return KeyValue(key=key.transpose(0, 2, 1, 3), value=self.value(inputs).transpose(0, 2, 1, 3))

    def relative_scores(self, query: jax.Array, key: jax.Array, distance: jax.Array) -> jax.Array:
        """The relative position scores of ``query [batch, q_len, heads, head_dim]`` (scaled) against
        ``key [kv_batch, heads, kv_len, head_dim]``, for int32 ``distance [q_len, kv_len]`` (query position minus
        key position): float32 ``[kv_batch, heads, groups * q_len, kv_len]``, the grouped layout of
        ``dot_product_attention`` (``groups = batch // kv_batch``)."""
        batch, q_len, heads, head_dim = query.shape
        kv_batch, _, kv_len, _ = key.shape
        chex.assert_shape(distance, (q_len, kv_len))
        groups = batch // kv_batch
        # Distances beyond the table are clipped: only masked keys of a cache longer than the table have them.
        rows = jnp.take(self.distance.embedding, distance + self.max_distance - 1, axis=0, mode="clip")
        rows = rows.astype(self.dtype)  # [q_len, kv_len, head_dim]
        query = query.reshape(kv_batch, groups, q_len, heads, head_dim)
        scores = einsum_float32("bgqhd,qkd->bhgqk", query, rows)
        if self.relative == "key_query":
            key_scores = einsum_float32("bhkd,qkd->bhqk", key, rows) * jnp.float32(self.head_dim ** -0.5)
            scores = scores + key_scores[:, :, None]
        return scores.reshape(kv_batch, heads, groups * q_len, kv_len)

    def __call__(self, inputs: jax.Array, kv: KeyValue, mask: jax.Array, deterministic: bool,
                 distance: jax.Array | None = None, angles: Rotary | None = None) -> jax.Array:
        """Attends ``inputs [batch, q_len, D]`` to ``kv`` under ``mask`` (see ``dot_product_attention``).

        ``distance``: int32 ``[q_len, kv_len]``, each query's position minus each key's; required (and only read)
        with ``relative``. ``angles``: the rotary angles of the queries' positions, or None.
        Sows the probabilities ``[batch, heads, q_len, kv_len]`` (float32, after dropout when active) as
        ``("attentions", "weights")``: recorded only when the caller makes the ``ATTENTIONS`` collection mutable.
        """
        query = self.query(inputs)
        if self.qk_norm:
            query = self.query_norm(query)
        if angles is not None:
            query = rotary(query, angles)
        query = query * jnp.asarray(self.query_scale or self.head_dim ** -0.5, self.dtype)
        bias = None
        if self.relative:
            if distance is None:
                raise ValueError("relative attention needs the query-key distances")
            bias = self.relative_scores(query, kv.key, distance)
        out, probs = dot_product_attention(query, kv, mask, self.dropout, deterministic, bias)
        self.sow(ATTENTIONS, "weights", probs)
        return self.out(out)
