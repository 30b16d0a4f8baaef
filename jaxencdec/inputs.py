"""Host-side checks of model inputs, before anything reaches a jitted function (JAX clamps out-of-range gathers
silently, so a bad token id would otherwise give wrong results instead of an error)."""

from __future__ import annotations

from typing import Any

import numpy as np


def validate_token_ids(ids: Any, vocab_size: int, max_length: int, name: str) -> np.ndarray:
    """Host-side check of ``ids [batch, length]``: JAX would silently clamp an out-of-range gather."""
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"{name} must have shape [batch, length], got {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.size:
        raise ValueError(f"{name} holds token id {int(bad[0])} outside the vocabulary [0, {vocab_size}) "
                         f"({bad.size} such id(s))")
    if ids.shape[1] > max_length:
        raise ValueError(f"{name} has length {ids.shape[1]}, longer than the {max_length} positions the model can "
                         "embed; truncate the inputs")
    return ids.astype(np.int32)


def mask_or_ones(mask: Any, ids: np.ndarray, name: str) -> np.ndarray:
    """``mask`` as int32 of the shape of ``ids`` (all ones when None); a shape mismatch is a ValueError."""
    if mask is None:
        return np.ones_like(ids)
    mask = np.asarray(mask).astype(np.int32)
    if mask.shape != ids.shape:
        raise ValueError(f"{name} has shape {mask.shape}, but its ids have shape {ids.shape}")
    return mask
