"""Hugging Face state dicts <-> our flat parameter dicts, with a report of what did not fit.

Flat parameter dicts are keyed by ``/``-joined paths of our tree (``flax.traverse_util.flatten_dict(sep="/")``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
from flax import traverse_util

from jaxencdec.errors import CheckpointError
from jaxencdec.checkpoint.names import IGNORED_SUFFIXES, Rule


@dataclass
class LoadReport:
    """What a conversion used, left out and could not fit, by name."""

    missing: list[str] = field(default_factory=list)  # our parameter paths with no HF tensor (left as initialized)
    unexpected: list[str] = field(default_factory=list)  # HF tensors no rule used
    mismatched: list[str] = field(default_factory=list)  # "name: checkpoint shape vs expected shape"

    def raise_for_mismatch(self, source: str) -> None:
        if self.mismatched:
            raise CheckpointError(f"{source}: {len(self.mismatched)} tensor(s) do not fit the model's shapes: "
                                  + "; ".join(self.mismatched))

    def raise_for_missing(self, source: str) -> None:
        if self.missing:
            raise CheckpointError(f"{source}: {len(self.missing)} parameter(s) missing from the checkpoint: "
                                  + ", ".join(self.missing))


def state_dict_to_params(
    rules: list[Rule],
    state_dict: Mapping[str, np.ndarray],
    shapes: Mapping[str, tuple[int, ...]],
    alternatives: Callable[[str], list[str]] = lambda name: [],
) -> tuple[dict[str, np.ndarray], LoadReport]:
    """Converts the HF tensors that ``rules`` name into our flat params of the given ``shapes``.

    ``alternatives(name)`` lists other HF names under which a tensor may be stored (base-model prefixes).
    Params with no tensor are reported as missing and absent from the result; shape mismatches are
    reported, not raised (the caller decides). A tensor stored under several of a rule's names (a tied
    encoder-decoder saved with both copies) is read from the first; the other copies count as used when
    they are equal, and are reported as unexpected when they differ.
    """
    params: dict[str, np.ndarray] = {}
    report = LoadReport()
    used: set[str] = set()
    for rule in rules:
        present = [n for n in [*rule.names, *alternatives(rule.hf)] if n in state_dict]
        if not present:
            report.missing += list(rule.ours)
            continue
        name = present[0]
        tensor = np.asarray(state_dict[name])
        used.add(name)
        used.update(n for n in present[1:] if np.array_equal(np.asarray(state_dict[n]), tensor))
        our_shapes = [tuple(shapes[o]) for o in rule.ours]
        expected = rule.hf_shape(our_shapes)
        if tuple(tensor.shape) != expected:
            report.mismatched.append(f"{name} {tuple(tensor.shape)} vs expected {expected}")
            continue
        if rule.layout == "sinusoidal" and not np.allclose(tensor, rule.to_hf([]), rtol=0, atol=1e-5):
            report.mismatched.append(f"{name} is not the fixed sinusoidal position table the model computes")
            continue
        params.update(zip(rule.ours, rule.to_ours(tensor, our_shapes)))
    report.unexpected = sorted(k for k in state_dict if k not in used and not k.endswith(IGNORED_SUFFIXES))
    return params, report


def float32_flat_params(params: Mapping) -> dict[str, np.ndarray]:
    """Our (unrolled) parameter tree as a flat dict of float32 numpy arrays, the input of ``params_to_state_dict``
    for an export."""
    return {path: np.asarray(x, np.float32) for path, x in traverse_util.flatten_dict(params, sep="/").items()}


def params_to_state_dict(rules: list[Rule], params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our flat params -> a Hugging Face PyTorch-named state dict (contiguous float arrays); a tensor with
    aliases is written under each of its names."""
    tensors = {r: np.ascontiguousarray(r.to_hf([np.asarray(params[o]) for o in r.ours])) for r in rules}
    return {name: tensor for r, tensor in tensors.items() for name in r.names}
