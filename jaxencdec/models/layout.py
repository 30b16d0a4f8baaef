"""The two layouts of a stack's layers, and the conversion between them.

Unrolled (the default, and the layout of every file written): one subtree per layer, ``layers_0/...``,
``layers_1/...``. Scanned (``EncoderDecoderConfig.scan_layers``): one subtree ``layers/...`` whose leaves carry a
leading ``[num_layers]`` axis (logical name ``layers``), run by one ``nn.scan``; leading layers whose subtree is
shaped unlike the others stay unrolled beside it (ModernBERT's first layer has no attention norm: ``layers_0``
and a ``layers`` of the rest). ALBERT's stacks hold one subtree per group of layers sharing parameters, so their
axis is ``[layer_groups]``. The same holds for everything shaped like the parameters (optimizer moments,
gradients) and for a decoder cache (a tuple of per-layer ``KeyValue`` unrolled, one ``KeyValue`` with a leading
layer axis scanned).

The conversions work on any pytree of dicts, tuples, namedtuples and lists whose leaves are arrays (numpy or jax)
or ``jax.ShapeDtypeStruct`` (whose named shardings gain or lose an unsplit layer axis): every dict holding
``layers_0 ... layers_{n-1}`` is stacked, every dict holding ``layers`` is split.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

# The logical axis name of the stacked layer axis (replicated by the sharding rules: each chip holds every
# layer's shard).
LAYER_AXIS = "layers"
SCANNED_KEY = "layers"
_UNROLLED_KEY = re.compile(r"^layers_(\d+)$")


def _stack(*leaves):
    first = leaves[0]
    if isinstance(first, jax.ShapeDtypeStruct):  # a named sharding gains an unsplit layer axis
        sharding = first.sharding
        if isinstance(sharding, NamedSharding):
            sharding = NamedSharding(sharding.mesh, PartitionSpec(None, *sharding.spec))
        return jax.ShapeDtypeStruct((len(leaves),) + tuple(first.shape), first.dtype, sharding=sharding)
    if all(isinstance(leaf, np.ndarray) for leaf in leaves):
        return np.stack(leaves)
    return jnp.stack(leaves)


def _index(leaf, i: int):
    if isinstance(leaf, jax.ShapeDtypeStruct):  # a named sharding loses the layer axis
        sharding = leaf.sharding
        if isinstance(sharding, NamedSharding):
            sharding = NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[1:]))
        return jax.ShapeDtypeStruct(tuple(leaf.shape[1:]), leaf.dtype, sharding=sharding)
    return leaf[i]


def _map_containers(tree: Any, convert_dict) -> Any:
    """Rebuilds ``tree`` bottom-up, passing every dict (its children already rebuilt) through ``convert_dict``."""
    if isinstance(tree, Mapping):
        return convert_dict({key: _map_containers(value, convert_dict) for key, value in tree.items()})
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # a namedtuple (optax states)
        return type(tree)(*(_map_containers(value, convert_dict) for value in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(_map_containers(value, convert_dict) for value in tree)
    return tree


def stack_layers(tree: Any) -> Any:
    """Unrolled -> scanned: each dict's ``layers_{i}`` subtrees (numbered ``0 ... n-1``) become one ``layers``
    subtree with a leading layer axis on every leaf, but for the leading ones structured unlike the last, kept."""

    def convert(node: dict) -> dict:
        indices = sorted(int(match.group(1)) for key in node if (match := _UNROLLED_KEY.match(key)))
        if not indices:
            return node
        if indices != list(range(len(indices))):
            raise ValueError(f"layers are not numbered 0 ... {len(indices) - 1}: {indices}")
        layers = [node[f"layers_{i}"] for i in indices]
        shape, first = jax.tree.structure(layers[-1]), len(layers) - 1
        while first > 0 and jax.tree.structure(layers[first - 1]) == shape:
            first -= 1
        kept = {key: value for key, value in node.items()
                if not (match := _UNROLLED_KEY.match(key)) or int(match.group(1)) < first}
        return {**kept, SCANNED_KEY: jax.tree.map(_stack, *layers[first:])}

    return _map_containers(tree, convert)


def unstack_layers(tree: Any) -> Any:
    """Scanned -> unrolled: each dict's ``layers`` subtree (leaves ``[n, ...]``) becomes ``layers_{k}`` ...
    ``layers_{k+n-1}`` after the ``k`` layers kept unrolled beside it."""

    def convert(node: dict) -> dict:
        if SCANNED_KEY not in node:
            return node
        stacked = node[SCANNED_KEY]
        num_layers = jax.tree.leaves(stacked)[0].shape[0]
        kept = {key: value for key, value in node.items() if key != SCANNED_KEY}
        first = sum(1 for key in kept if _UNROLLED_KEY.match(key))
        return {**kept, **{f"layers_{first + i}": jax.tree.map(lambda leaf: _index(leaf, i), stacked)
                           for i in range(num_layers)}}

    return _map_containers(tree, convert)


def is_scanned(tree: Any) -> bool:
    """Whether ``tree`` (a parameter-shaped tree) holds a scanned ``layers`` subtree anywhere."""
    found = []
    _map_containers(tree, lambda node: found.append(SCANNED_KEY in node) or node)
    return any(found)


def to_layout(tree: Any, scanned: bool) -> Any:
    """``tree`` in the scanned or the unrolled layout, whichever it is in now."""
    if is_scanned(tree) == scanned:
        return tree
    return stack_layers(tree) if scanned else unstack_layers(tree)
