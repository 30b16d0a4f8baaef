"""Host-side checks of model inputs, before anything reaches a jitted function (JAX clamps out-of-range gathers
silently, so a bad token id would otherwise give wrong results instead of an error).

Inside ``jax.jit``, ``jax.grad`` or another transformation the inputs are tracers, whose values are not known:
then shapes and dtypes are checked, and the arrays are passed on as traced ``jax.Array``s.

Every check raises ``ValueError`` naming the argument, its shape or the offending value, and the fix. Nothing is
cast silently: token ids and labels must already be integers (as transformers, whose embedding lookup and loss
refuse float tensors), and masks must hold only 0 and 1.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

# Labels equal to this are left out of the loss (transformers' ``ignore_index``).
IGNORE_INDEX = -100


def traced(value: Any) -> bool:
    """Whether ``value`` is a tracer (inside ``jax.jit``, ``jax.grad``, ...): its values cannot be checked."""
    return isinstance(value, jax.core.Tracer)


def validate_token_ids(ids: Any, vocab_size: int, max_length: int, name: str) -> np.ndarray:
    """``ids [batch, length]`` (numpy, jax or nested lists) as int32, checked: JAX would silently clamp an
    out-of-range gather. The array must be non-empty, of an integer dtype, inside the vocabulary (not checked on
    tracers) and no longer than the ``max_length`` positions the model embeds."""
    ids = ids if traced(ids) else np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"{name} must have shape [batch, length], got {ids.shape}")
    if ids.size == 0:
        raise ValueError(f"{name} has shape {ids.shape}: it needs at least one row and at least one token per row")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name} must hold integer token ids, got dtype {ids.dtype}; token ids are never rounded "
                         f"here: convert them yourself (e.g. {name}.astype(np.int32)) if the values are whole")
    if ids.shape[1] > max_length:
        raise ValueError(f"{name} has length {ids.shape[1]}, longer than the {max_length} positions the model can "
                         "embed; truncate the inputs")
    if traced(ids):
        return ids.astype(jnp.int32)
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.size:
        raise ValueError(f"{name} holds token id {int(bad[0])} outside the vocabulary [0, {vocab_size}) "
                         f"({bad.size} such id(s))")
    return ids.astype(np.int32)


def validate_labels(labels: Any, vocab_size: int, max_length: int) -> np.ndarray:
    """``labels [batch, tgt_len]`` as int32: token ids of the decoder vocabulary, or ``IGNORE_INDEX`` (-100) for
    positions the loss leaves out; otherwise checked as ``validate_token_ids`` checks ids."""
    labels = labels if traced(labels) else np.asarray(labels)
    # astype keeps the caller's dtype: np.where would promote bool labels to integers and let them through.
    ids = (jnp if traced(labels) else np).where(labels == IGNORE_INDEX, 0, labels).astype(labels.dtype)
    validate_token_ids(ids, vocab_size, max_length, "labels")
    return labels.astype(jnp.int32 if traced(labels) else np.int32)


def mask_or_ones(mask: Any, ids: np.ndarray, name: str) -> np.ndarray:
    """``mask`` as int32 of the shape of ``ids`` (all ones when None): 1 for a token, 0 for padding.

    Bool, integer and float masks are accepted when they hold only 0 and 1 (``1.0`` attends, ``0.0`` masks).
    Any other value (``0.5``, ``2``, NaN) is a ValueError: transformers turns every nonzero value into "attend",
    while a fractional value suggests a soft weighting that neither library applies.
    """
    if mask is None:
        return jnp.ones_like(ids) if traced(ids) else np.ones_like(ids)
    mask = mask if traced(mask) else np.asarray(mask)
    if mask.shape != ids.shape:
        raise ValueError(f"{name} has shape {mask.shape}, but its ids have shape {ids.shape}")
    if not (mask.dtype == np.bool_ or np.issubdtype(mask.dtype, np.integer) or np.issubdtype(mask.dtype, np.floating)):
        raise ValueError(f"{name} must be a bool, integer or float array of 0 and 1, got dtype {mask.dtype}")
    if traced(mask):
        return mask.astype(jnp.int32)
    bad = mask[(mask != 0) & (mask != 1)]
    if bad.size:
        raise ValueError(f"{name} must hold only 0 (padding) and 1 (token), got {bad[0].item()!r} ({bad.size} such "
                         f"value(s)); build it as (ids != pad_token_id)")
    return mask.astype(np.int32)


def check_pair_shapes(input_ids: np.ndarray, decoder_input_ids: np.ndarray | None,
                      labels: np.ndarray | None) -> None:
    """Raises ValueError, naming the arguments and their shapes, when the decoder side (``decoder_input_ids``,
    ``labels``) has a different batch size than ``input_ids``, or ``labels`` and ``decoder_input_ids`` differ
    in shape (the loss scores each decoder position against the label at that position, as transformers)."""
    for name, array in (("decoder_input_ids", decoder_input_ids), ("labels", labels)):
        if array is not None and array.shape[0] != input_ids.shape[0]:
            raise ValueError(f"{name} has shape {array.shape} but input_ids has shape {input_ids.shape}: row i of "
                             f"{name} belongs to row i of input_ids, so both need the same batch size")
    if decoder_input_ids is not None and labels is not None and labels.shape != decoder_input_ids.shape:
        raise ValueError(f"labels has shape {labels.shape} but decoder_input_ids has shape {decoder_input_ids.shape}: "
                         "the loss compares them position by position; pass labels of the same shape, or labels "
                         "alone (the decoder inputs are then the labels shifted right)")


def check_dropout_rng(train: bool, dropout_rng) -> None:
    """ValueError when ``train`` asks for dropout without a ``dropout_rng``."""
    if train and dropout_rng is None:
        raise ValueError("train=True needs a dropout_rng")


def check_decoder_batch(encoder_hidden, arrays: Mapping[str, Any], multiple: bool = False) -> None:
    """ValueError unless each of ``arrays`` (name -> ``[batch, ...]`` or None) has as many rows as the encoder
    states, or with ``multiple`` a multiple ``k`` of them (row ``i`` then reads source ``i // k``)."""
    encoder_batch = encoder_hidden.shape[0]
    for name, array in arrays.items():
        rows = None if array is None else np.shape(array)[0]
        if rows is not None and (rows % encoder_batch if multiple else rows != encoder_batch):
            need = "equal it, or be a multiple k of it (rows b*k ... b*k+k-1 read source b)" if multiple else "equal it"
            raise ValueError(f"{name} has {rows} rows but encoder_outputs has batch {encoder_batch}: the decoder "
                             f"batch must {need}")
