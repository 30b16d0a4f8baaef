"""Counter-based dropout: the 64-bit element index (as two uint32 words), the mask's hash, and the layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxencdec.nn.layers import Dropout, dropout_keep_mask, element_index_words

# Shapes of 2**32 elements and more, never materialized: the index words are evaluated at chosen coordinates.
LARGE_SHAPES = [
    (3, 2**31 + 5),  # the leading term fits 32 bits, the sum does not: a carry
    (256, 16, 1024, 1024),  # exactly 2**32 elements: the last index is 2**32 - 1
    (2048, 16, 512, 512),  # 2**33 attention probabilities: a wide product with a power-of-two stride
    (5, 3, 2**31 + 1),  # a stride above 2**32 (its high word used) and a wide product with an odd stride
    (2, 2**32),  # a dimension at the limit: the leading stride is exactly 2**32
    (1_000_003, 999_983),  # a wide product whose factors both fill their two 16-bit halves
]


def _row_major(shape, coordinate):
    index = 0
    for size, c in zip(shape, coordinate):
        index = index * size + c
    return index


def _words_at(shape, coordinates):
    """``element_index_words`` at the coordinates ``[n, ndim]`` (Python ints), as Python ints ``hi, lo`` of ``[n]``."""
    columns = tuple(jnp.asarray(np.array([c[k] for c in coordinates], np.uint32)) for k in range(len(shape)))
    hi, lo = element_index_words(shape, columns)
    return [int(v) for v in np.asarray(hi)], [int(v) for v in np.asarray(lo)]


def _np_mix32(x):
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x85EBCA6B)
    x = x ^ (x >> np.uint32(13))
    x = x * np.uint32(0xC2B2AE35)
    return x ^ (x >> np.uint32(16))


@pytest.mark.parametrize("shape", [(), (7,), (3, 4, 5), (2, 1, 7, 3), (1, 1)])
def test_index_words_are_the_row_major_index_of_a_small_array(shape):
    hi, lo = element_index_words(shape)
    assert hi.shape == lo.shape == shape and hi.dtype == lo.dtype == jnp.uint32
    np.testing.assert_array_equal(np.asarray(hi), np.zeros(shape, np.uint32))
    np.testing.assert_array_equal(np.asarray(lo), np.arange(np.prod(shape, dtype=int)).reshape(shape))
    # explicit coordinates go through the same formula
    grid = tuple(jnp.asarray(c, jnp.uint32) for c in np.indices(shape))
    hi2, lo2 = element_index_words(shape, grid)
    np.testing.assert_array_equal(np.asarray(hi2), np.asarray(hi))
    np.testing.assert_array_equal(np.asarray(lo2), np.asarray(lo))


@pytest.mark.parametrize("shape", LARGE_SHAPES)
def test_index_words_are_exact_past_2_32_elements(shape):
    rng = np.random.default_rng(0)
    coordinates = [tuple(0 for _ in shape), tuple(size - 1 for size in shape), tuple(size // 2 for size in shape)]
    coordinates += [tuple(int(rng.integers(size)) for size in shape) for _ in range(64)]
    coordinates += [tuple(size - 1 if k == len(shape) - 1 else 0 for k, size in enumerate(shape)),
                    tuple(1 if k == 0 else 0 for k in range(len(shape)))]  # just before and at a carry
    hi, lo = _words_at(shape, coordinates)
    for c, h, l in zip(coordinates, hi, lo):
        index = _row_major(shape, c)
        assert (h, l) == (index >> 32, index & 0xFFFFFFFF), (shape, c)
    assert max(_row_major(shape, c) for c in coordinates) >= 2**32 - 1
    # the whole-array formula traces at this size without materializing it
    words = jax.eval_shape(lambda: element_index_words(shape))
    assert [(w.shape, w.dtype) for w in words] == [(shape, jnp.uint32)] * 2


def test_indices_2_32_apart_have_different_words():
    shape = (3, 2**31 + 5)
    # (0, 14) and (2, 4): 14 and 2 * (2**31 + 5) + 4 = 2**32 + 14 (the old uint32 iota gave both 14)
    coordinates = [(0, 14), (2, 4), (1, 0), (0, 2**31 + 4), (2, 2**31 + 4)]
    hi, lo = _words_at(shape, coordinates)
    assert (hi[0], lo[0]) == (0, 14) and (hi[1], lo[1]) == (1, 14)
    assert (hi[2], lo[2]) == (0, 2**31 + 5)
    assert (hi[3], lo[3]) == (0, 2**31 + 4)
    assert (hi[4], lo[4]) == divmod(3 * (2**31 + 5) - 1, 2**32)


def test_a_dimension_over_2_32_is_refused():
    with pytest.raises(ValueError, match="at most 2\\*\\*32"):
        element_index_words((2, 2**32 + 1))


def test_keep_mask_is_the_documented_hash():
    seed = jnp.asarray([0x12345678, 0x9ABCDEF0], jnp.uint32)
    rng = np.random.default_rng(1)
    hi = rng.integers(0, 2**32, 4096, dtype=np.uint32)
    hi[:2048] = 0
    lo = rng.integers(0, 2**32, 4096, dtype=np.uint32)
    threshold = np.uint32(round(0.3 * 2**32))
    expected = _np_mix32(_np_mix32(lo ^ np.uint32(0x12345678)) + (_np_mix32(hi) ^ np.uint32(0x9ABCDEF0))) >= threshold
    got = dropout_keep_mask((jnp.asarray(hi), jnp.asarray(lo)), seed, 0.3)
    np.testing.assert_array_equal(np.asarray(got), expected)


def test_elements_2_32_apart_get_independent_bits():
    """Elements ``i`` and ``i + 2**32`` (once the same bit) are kept independently, each with ``1 - rate``, and
    likewise across the next rows of ``2**32``."""
    seed = jax.random.bits(jax.random.key(0), (2,), jnp.uint32)
    lo = jax.lax.iota(jnp.uint32, 2**20)
    keep = np.stack([np.asarray(dropout_keep_mask((jnp.full_like(lo, h), lo), seed, 0.1)) for h in range(4)])
    assert np.abs(keep.mean(axis=1) - 0.9).max() < 0.003  # 1M draws each: ~10 standard deviations
    for a, b in [(0, 1), (1, 2), (0, 3)]:
        assert abs((keep[a] == keep[b]).mean() - (0.9**2 + 0.1**2)) < 0.003


@pytest.mark.parametrize("shape", LARGE_SHAPES)
def test_the_index_not_the_shape_decides_the_mask(shape):
    """The first elements of an array too large to materialize get the mask of a small array's same elements."""
    seed = jax.random.bits(jax.random.key(5), (2,), jnp.uint32)
    n = 1000
    flat = dropout_keep_mask(element_index_words((n,)), seed, 0.2)
    coordinates = [np.unravel_index(i, shape[-2:]) for i in range(n)]
    columns = tuple(jnp.zeros(n, jnp.uint32) for _ in shape[:-2])
    columns += tuple(jnp.asarray(np.array([c[k] for c in coordinates], np.uint32)) for k in range(2))
    large = dropout_keep_mask(element_index_words(shape, columns), seed, 0.2)
    np.testing.assert_array_equal(np.asarray(large), np.asarray(flat))
    assert 0.7 < float(flat.mean()) < 0.9


def test_dropout_keeps_one_minus_rate_and_rescales():
    x = jnp.arange(1, 1 + 32 * 48 * 64, dtype=jnp.float32).reshape(32, 48, 64)
    drop = Dropout(0.25)
    out = np.asarray(drop.apply({}, x, False, rngs={"dropout": jax.random.key(0)}))
    keep = out != 0
    assert abs(keep.mean() - 0.75) < 0.005  # 98k draws: ~4 standard deviations
    np.testing.assert_allclose(out[keep], np.asarray(x)[keep] / 0.75, rtol=1e-6)  # inverted dropout
    np.testing.assert_array_equal(np.asarray(drop.apply({}, x, True)), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(Dropout(1.0).apply({}, x, False, rngs={"dropout": jax.random.key(0)})), 0)


def test_dropout_mask_depends_on_seed_and_flat_index_only():
    key = jax.random.key(7)
    drop = Dropout(0.5)
    ones = jnp.ones(24 * 35, jnp.float32)
    flat = np.asarray(drop.apply({}, ones, False, rngs={"dropout": key}))
    np.testing.assert_array_equal(np.asarray(drop.apply({}, ones, False, rngs={"dropout": key})), flat)  # same seed
    for shape in [(24, 35), (4, 6, 35), (2, 1, 12, 5, 7)]:  # same elements in row-major order: same mask
        shaped = np.asarray(drop.apply({}, ones.reshape(shape), False, rngs={"dropout": key}))
        np.testing.assert_array_equal(shaped.reshape(-1), flat)
    other = np.asarray(drop.apply({}, ones, False, rngs={"dropout": jax.random.key(8)}))
    assert 0.35 < ((flat != 0) == (other != 0)).mean() < 0.65  # another seed: another mask


def test_dropout_traces_for_more_than_2_32_elements():
    """The layer lowers for an input of ``3 * (2**31 + 5)`` elements, counting them per axis: no flat iota, which in
    uint32 would wrap past ``2**32``."""
    x = jax.ShapeDtypeStruct((3, 2**31 + 5), jnp.bfloat16)
    lowered = jax.jit(lambda x: Dropout(0.1).apply({}, x, False, rngs={"dropout": jax.random.key(0)})).lower(x)
    assert (lowered.out_info.shape, lowered.out_info.dtype) == (x.shape, x.dtype)
    assert "tensor<3x2147483653xui32>" in lowered.as_text() and f"tensor<{3 * (2**31 + 5)}x" not in lowered.as_text()
