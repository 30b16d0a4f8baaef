"""MLP, embeddings, norms, rotary positions, dropout and initializers, shared by every architecture.

Every parameter is created with logical axis names (``vocab``, ``embed``, ``heads``, ``kv``, ``mlp``,
``positions``, ``norm``, ``hidden``) so that sharding rules can place it without knowing the architecture;
activations that need pinning go through ``constrain`` with names of their own (``batch``, ``length``).
"""

from __future__ import annotations

import contextlib
import contextvars
from functools import partial
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import errors as flax_errors
from flax import linen as nn
from flax.core import meta

Dtype = jnp.dtype

# Activation sharding: modules name the axes of the activations that matter; whoever runs them under a mesh
# (the train step) decides what those names mean by installing a constraint function.
HIDDEN_AXES = ("batch", "length", None)  # hidden states [batch, length, D]: split by batch only
Constraint = Callable[[jax.Array, tuple[str | None, ...]], jax.Array]
_constraint: contextvars.ContextVar[Constraint | None] = contextvars.ContextVar("jaxencdec_constraint", default=None)


@contextlib.contextmanager
def activation_constraints(constrain_fn: Constraint | None) -> Iterator[None]:
    """While active (at trace time), ``constrain(x, axes)`` calls ``constrain_fn(x, axes)``."""
    token = _constraint.set(constrain_fn)
    try:
        yield
    finally:
        _constraint.reset(token)


def constrain(x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
    """Pins ``x``'s sharding by logical axis names (one per dimension); a no-op unless a caller installed
    ``activation_constraints``."""
    constrain_fn = _constraint.get()
    return x if constrain_fn is None else constrain_fn(x, logical_axes)


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU as PyTorch computes it, ``x * (1 + erf(x / sqrt 2)) / 2``. (``jax.nn.gelu`` uses ``erfc``,
    which XLA:CPU evaluates with two branches: ~3x the cost in a train step's MLPs.)"""
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(0.5 ** 0.5, x.dtype)))


ACTIVATION_FNS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": gelu,
    "gelu_new": partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": partial(jax.nn.gelu, approximate=True),
    "gelu_fast": partial(jax.nn.gelu, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def _mix32(x: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finalizer: a bijection of uint32 with full avalanche (and ``_mix32(0) == 0``)."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def _mul_hi32(a: jax.Array, b: int) -> jax.Array:
    """The high word of the 64-bit product ``a * b`` (``a`` uint32, ``b`` an int below ``2**32``), from 16-bit
    halves so that no uint64 is needed (jax's x64 mode is off by default); no partial sum below overflows."""
    a0, a1 = a & jnp.uint32(0xFFFF), a >> 16
    b0, b1 = jnp.uint32(b & 0xFFFF), jnp.uint32(b >> 16)
    m1 = a1 * b0 + ((a0 * b0) >> 16)
    m2 = a0 * b1 + (m1 & jnp.uint32(0xFFFF))
    return a1 * b1 + (m1 >> 16) + (m2 >> 16)


def element_index_words(
    shape: tuple[int, ...], coordinates: tuple[jax.Array, ...] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The row-major index of elements of an array of ``shape``, as two uint32 words ``(hi, lo)``:
    ``index = hi * 2**32 + lo`` (exact up to ``2**64`` elements; each dimension must hold at most ``2**32``).

    ``coordinates`` (one uint32 array per dimension, broadcasting together) names the elements; by default every
    element, each word then of ``shape``. The index is ``sum(coordinate[k] * stride[k])`` over the dimensions, added
    from the last (stride 1) with 64-bit words as pairs of uint32: an addition carries into ``hi`` only once the
    trailing dimensions hold more than ``2**32`` elements, and a term takes a wide product only when it can exceed
    ``2**32``, so for a smaller array ``hi`` is zero and ``lo`` costs a multiply-add per dimension. Passing a few
    coordinates evaluates the same formula for an array too large to materialize.
    """
    if any(size > 2**32 for size in shape):
        raise ValueError(f"element_index_words: every dimension must be at most 2**32, got shape {shape}")
    if coordinates is None:
        coordinates = tuple(jax.lax.broadcasted_iota(jnp.uint32, shape, axis) for axis in range(len(shape)))
        out_shape = tuple(shape)
    else:
        out_shape = jnp.broadcast_shapes(*(jnp.shape(c) for c in coordinates))
    hi = lo = jnp.zeros(out_shape, jnp.uint32)
    largest = 0  # the largest index the dimensions added so far can make (a Python int: exact)
    stride = 1
    for size, coordinate in zip(reversed(shape), reversed(coordinates)):
        if size > 1:
            term = (size - 1) * stride
            stride_lo, stride_hi = stride & 0xFFFFFFFF, (stride >> 32) & 0xFFFFFFFF
            coordinate = jnp.asarray(coordinate, jnp.uint32)
            term_lo = coordinate * jnp.uint32(stride_lo)
            lo = lo + term_lo
            if largest + term >= 2**32:  # the sum may pass 2**32: carry, and the term's own high word
                hi = hi + (lo < term_lo).astype(jnp.uint32)
                if term >= 2**32:
                    hi = hi + _mul_hi32(coordinate, stride_lo) + coordinate * jnp.uint32(stride_hi)
            largest += term
        stride *= size
    return hi, lo


def dropout_keep_mask(index_words: tuple[jax.Array, jax.Array], seed: jax.Array, rate: float) -> jax.Array:
    """Which elements inverted dropout keeps: ``mix(mix(lo ^ seed[0]) + (mix(hi) ^ seed[1])) >= rate * 2**32``.

    ``index_words`` are the elements' ``(hi, lo)`` index words (``element_index_words``), ``seed`` is uint32
    ``[2]``; returns a bool array of the words' shape, each element kept with probability ``1 - rate``. ``mix`` is
    MurmurHash3's finalizer. The high word is mixed before it is added, so that rows of ``2**32`` elements differ by
    a pseudo-random offset rather than a small one; as ``mix(0) == 0``, below ``2**32`` elements this is
    ``mix(mix(index ^ seed[0]) + seed[1])``. The hash state is 32 bits, so beyond ``2**32`` elements some pairs of
    elements necessarily share a hash, but scattered pseudo-randomly, not element ``i`` with ``i + 2**32``.
    """
    hi, lo = index_words
    threshold = jnp.uint32(min(round(rate * 2**32), 2**32 - 1))
    return _mix32(_mix32(lo ^ seed[0]) + (_mix32(hi) ^ seed[1])) >= threshold


class Dropout(nn.Module):
    """Inverted dropout (``flax.linen.Dropout``'s interface) with counter-based masks.

    Each call draws one 64-bit seed from the ``"dropout"`` stream and keeps an element according to a hash of the
    seed and the element's row-major index (``dropout_keep_mask``), computed as two 32-bit words so that it stays
    distinct past ``2**32`` elements (``element_index_words``). XLA fuses this into the layer: on CPU it costs a few
    integer operations per element, where threefry or RngBitGenerator masks took ~13% of a train step. The mask
    depends only on the seed and the element's index, not on the array's shape or its split across devices, so a
    sharded run draws the same masks.
    """

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        if self.rate == 1.0:
            return jnp.zeros_like(x)
        seed = jax.random.bits(self.make_rng("dropout"), (2,), jnp.uint32)
        keep = dropout_keep_mask(element_index_words(x.shape), seed, self.rate)
        return jnp.where(keep, x / jnp.asarray(1.0 - self.rate, x.dtype), jnp.zeros_like(x))


class DirectParams(nn.Module):
    """The base of the library's modules: ``param`` reads a parameter that exists (apply) directly, checking its
    shape against the shape its initializer is given (``init_args[0]``). Flax's ``param`` learns that shape by
    tracing the initializer under ``jax.eval_shape``, for every parameter at every trace: about 0.4 ms each, a
    tenth of the time tracing a small model takes. Creating a parameter (init), and an initializer whose first
    argument is not a shape, go through flax's ``param``."""

    @nn.nowrap
    def param(self, name, init_fn, *init_args, unbox: bool = True, **init_kwargs):
        shape = init_args[0] if init_args else None
        is_shape = isinstance(shape, tuple) and all(isinstance(d, (int, np.integer)) for d in shape)
        if not is_shape or not self.has_variable("params", name):
            return super().param(name, init_fn, *init_args, unbox=unbox, **init_kwargs)
        value = self.get_variable("params", name)
        unboxed = meta.unbox(value)
        if np.shape(unboxed) != tuple(shape):
            raise flax_errors.ScopeParamShapeError(name, self.scope.path_text, np.shape(unboxed), tuple(shape))
        return unboxed if unbox else value


class Dense(DirectParams, nn.Dense):
    """``nn.Dense`` with ``DirectParams``' parameter reads."""


class Embed(DirectParams, nn.Embed):
    """``nn.Embed`` with ``DirectParams``' parameter reads."""


class LayerNorm(DirectParams, nn.LayerNorm):
    """``nn.LayerNorm`` with ``DirectParams``' parameter reads."""


class RMSNorm(DirectParams, nn.RMSNorm):
    """``nn.RMSNorm`` with ``DirectParams``' parameter reads."""


def normal_init(std: float, axes: tuple[str | None, ...]):
    """A normal(0, std) initializer that tags the parameter with logical axis names."""
    return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def zeros_init(axes: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def ones_init(axes: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.ones_init(), axes)


def layer_norm(epsilon: float, dtype: Dtype, param_dtype: Dtype, name: str | None = None,
               use_bias: bool = True) -> LayerNorm:
    """A layer norm over the last axis with ``scale``/``bias`` of shape ``[D]`` (statistics in float32); without
    ``use_bias``, a scale only (ModernBERT's)."""
    return LayerNorm(
        epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, use_bias=use_bias,
        scale_init=ones_init(("norm",)), bias_init=zeros_init(("norm",)), name=name,
    )


class UnitOffsetRMSNorm(DirectParams):
    """Gemma's RMS norm over the last axis: ``x / rms(x) * (1 + scale)`` computed wholly in float32, then cast to
    ``dtype``; ``scale [D]`` starts at 0."""

    epsilon: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", zeros_init(("norm",)), (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
        return (normed * (1.0 + scale.astype(jnp.float32))).astype(self.dtype)


def norm_layer(kind: str, epsilon: float, dtype: Dtype, param_dtype: Dtype, name: str | None = None,
               use_bias: bool = True) -> nn.Module:
    """A norm over the last axis, statistics in float32: ``"layer"`` (``layer_norm``, its bias as ``use_bias``
    says), ``"rms"`` (an RMS norm with a ``scale [D]`` and no bias: Llama's) or ``"rms_unit_offset"``
    (``UnitOffsetRMSNorm``: Gemma's)."""
    if kind == "layer":
        return layer_norm(epsilon, dtype, param_dtype, name, use_bias)
    if kind == "rms_unit_offset":
        return UnitOffsetRMSNorm(epsilon, dtype, param_dtype, name=name)
    return RMSNorm(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, scale_init=ones_init(("norm",)),
                   name=name)


Rotary = tuple[jax.Array, jax.Array]  # (cos, sin), float32 [batch, length, 1, head_dim]


def rotary_angles(positions: jax.Array, theta: float, head_dim: int) -> Rotary:
    """The rotary position embedding (RoPE, as transformers' Llama computes it) of int ``positions [batch, length]``:
    ``(cos, sin)`` of ``position * theta ** (-2i / head_dim)`` for each of the ``head_dim / 2`` frequencies, the
    halves repeated, float32 ``[batch, length, 1, head_dim]``."""
    inverse_frequency = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions.astype(jnp.float32)[..., None] * inverse_frequency  # [batch, length, d / 2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    return jnp.cos(angles), jnp.sin(angles)


def rotary(x: jax.Array, angles: Rotary) -> jax.Array:
    """``x [batch, length, heads, d]`` rotated by ``angles`` (``rotary_angles``): each head's two halves turn by the
    token's angles, in ``x``'s dtype (the angles cast to it, as transformers does)."""
    cos, sin = (a.astype(x.dtype) for a in angles)
    half = x.shape[-1] // 2
    rotated_half = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated_half * sin


def dense(
    features: int, axes: tuple[str | None, str | None], std: float, dtype: Dtype, param_dtype: Dtype,
    use_bias: bool = True, name: str | None = None, dot_general: Callable = jax.lax.dot_general,
) -> Dense:
    """``y = x @ kernel + bias`` with ``kernel [in, out]`` tagged with the logical ``axes``; ``dot_general`` may set
    the product's ``preferred_element_type``."""
    return Dense(
        features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
        kernel_init=normal_init(std, axes), bias_init=zeros_init(axes[1:]), name=name, dot_general=dot_general,
    )


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def einsum_float32(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """``jnp.einsum(spec, a, b)`` accumulated into a float32 result, whatever the operands' (compute) dtype.

    The backward pass casts the float32 result's gradient back to the operands' dtype before its two products:
    under plain autodiff a float32 result makes both backward matmuls run in float32 (for the LM head, the
    largest matmul of a step, and for attention scores). In float32 this is exactly autodiff's result.
    """
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _einsum_float32_fwd(spec, a, b):
    return einsum_float32(spec, a, b), (a, b)


def _einsum_float32_bwd(spec, residuals, cotangent):
    a, b = residuals
    _, vjp = jax.vjp(partial(jnp.einsum, spec), a, b)
    return vjp(cotangent.astype(jnp.result_type(a, b)))


einsum_float32.defvjp(_einsum_float32_fwd, _einsum_float32_bwd)


def logits_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """Float32 logits ``lhs [..., D] @ rhs [D, vocab]`` (``einsum_float32``) behind ``lax.dot_general``'s
    signature, for ``Dense(dot_general=...)``."""
    assert dimension_numbers == (((lhs.ndim - 1,), (0,)), ((), ())), dimension_numbers
    return einsum_float32("...d,dv->...v", lhs, rhs)


class MLP(nn.Module):
    """Position-wise feed-forward block: ``wo(dropout(act(wi(x))))``, or, ``gated``, ``wo(dropout(act(wi_gate(x))
    * wi(x)))`` (SwiGLU / GeGLU); ``[..., D] -> [..., D]``."""

    hidden_size: int
    intermediate_size: int
    activation: str
    std: float
    activation_dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    gated: bool = False
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        make = partial(dense, std=self.std, dtype=self.dtype, param_dtype=self.param_dtype, use_bias=self.use_bias)
        h = make(self.intermediate_size, ("embed", "mlp"), name="wi")(x)
        if self.gated:
            h = ACTIVATION_FNS[self.activation](make(self.intermediate_size, ("embed", "mlp"), name="wi_gate")(x)) * h
        else:
            h = ACTIVATION_FNS[self.activation](h)
        h = Dropout(self.activation_dropout)(h, deterministic=deterministic)
        return make(self.hidden_size, ("mlp", "embed"), name="wo")(h)


def _lookup(embed: Embed, ids: jax.Array, rows: str | None) -> jax.Array:
    """Rows ``ids`` of ``embed``'s table in the table's own dtype (the parameter dtype), pinned to the batch split.

    The rows are gathered before any cast: casting the whole table to a bfloat16 compute dtype first would make
    the backward pass scatter-add the rows' gradients into a bfloat16 copy of the table (low precision, and on
    GPUs many colliding rows become slow compare-and-swap loops). The table's ``embed`` side is gathered first (a
    table split on ``embed`` across the batch's own data-parallel axis leaves the SPMD partitioner to reconcile
    the two, badly)."""
    table = constrain(embed.embedding, (rows, None))
    return constrain(jnp.take(table, ids, axis=0), HIDDEN_AXES)


def sinusoidal_positions(num_positions: int, width: int) -> np.ndarray:
    """Marian's fixed position table, float32 ``[num_positions, width]``: row ``p`` holds ``sin(p / 10000 **
    (2i / width))`` in its first half and ``cos`` of the same angles in its second (for an odd width the sines
    take one column more), computed in float64 as transformers does."""
    columns = np.arange(width)
    angles = np.arange(num_positions)[:, None] / np.power(10000, 2 * (columns // 2) / width)[None, :]
    return np.concatenate([np.sin(angles[:, 0::2]), np.cos(angles[:, 1::2])], axis=1).astype(np.float32)


class Embeddings(nn.Module):
    """Word (+ position) (+ token type 0) embeddings, scaled, optionally normalized, with dropout.

    ``input_ids [batch, length] int`` and ``positions [batch, length] int`` (already offset) give
    ``[batch, length, hidden_size]`` in ``dtype`` (the table width: ``E`` of ELECTRA's factorized embeddings).
    ``add_positions=False`` (relative attention) keeps the position table, which checkpoints hold, without adding
    it; ``positions`` is then not read. ``sinusoidal``: the position table is ``sinusoidal_positions``, a constant.
    """

    vocab_size: int
    hidden_size: int
    max_positions: int
    type_vocab_size: int
    embed_scale: float
    layer_norm_eps: float | None
    dropout: float
    std: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    add_positions: bool = True
    sinusoidal: bool = False
    norm_bias: bool = True

    def setup(self):
        embed = partial(Embed, features=self.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype)
        self.word = embed(self.vocab_size, embedding_init=normal_init(self.std, ("vocab", "embed")))
        if self.max_positions and not self.sinusoidal:
            self.position = embed(self.max_positions, embedding_init=normal_init(self.std, ("positions", "embed")))
        if self.type_vocab_size:
            self.token_type = embed(self.type_vocab_size, embedding_init=normal_init(self.std, (None, "embed")))
        if self.layer_norm_eps is not None:
            self.norm = layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, use_bias=self.norm_bias)
        self.drop = Dropout(self.dropout)

    def __call__(self, input_ids: jax.Array, positions: jax.Array, deterministic: bool) -> jax.Array:
        # Summed in the parameters' dtype and cast to the compute dtype once (the norm does that cast itself), so
        # that the tables' gradients are accumulated in the parameters' dtype too.
        x = _lookup(self.word, input_ids, "vocab")
        if self.embed_scale != 1.0:
            x = x * jnp.asarray(self.embed_scale, x.dtype)
        if self.sinusoidal:
            table = jnp.asarray(sinusoidal_positions(self.max_positions, self.hidden_size), x.dtype)
            x = x + constrain(jnp.take(table, positions, axis=0), HIDDEN_AXES)
        elif self.max_positions and self.add_positions:
            x = x + _lookup(self.position, positions, "positions")
        elif self.max_positions:
            self.position.embedding  # not added, but checkpoints hold the table: reading it creates it at init
        if self.type_vocab_size:
            # every token has type 0: one broadcast row (a reduction in the backward pass, not a scatter)
            x = x + self.token_type.embedding[0]
        if self.layer_norm_eps is not None:
            x = constrain(self.norm(x), HIDDEN_AXES)
        x = x.astype(self.dtype)
        return self.drop(x, deterministic=deterministic)

    def attend(self, hidden: jax.Array) -> jax.Array:
        """Float32 logits against the word table (tied output embeddings): ``[..., D] -> [..., vocab]``; the
        product runs in the compute dtype (see ``einsum_float32``)."""
        return einsum_float32("...d,vd->...v", hidden.astype(self.dtype), self.word.embedding.astype(self.dtype))
