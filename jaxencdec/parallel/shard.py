"""Parameter and batch shardings from logical axis names, and the check that they are what was meant.

``param_specs`` turns the model's logical ``PartitionSpec`` tree (``EncoderDecoderModel.logical_axes()``) into
mesh ``PartitionSpec``s through a rules table; a mesh axis that does not divide a dimension (GPT-2's vocabulary
of 50257 over ``model=2``, 12 heads over ``model=8``) is dropped for that parameter, which then shows up in
``sharding_report``. ``check_sharding`` compares live arrays' ``.sharding`` with the intended specs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import jax
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxencdec.parallel.mesh import BATCH_AXES, DEFAULT_RULES, Rules

PyTree = Any


def _axes_of(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def logical_to_mesh(logical: P, rules: Rules) -> P:
    """One logical ``PartitionSpec`` -> mesh ``PartitionSpec`` (first matching rule wins; a mesh axis is used
    at most once per array, later dimensions that want it again stay unsplit)."""
    table = dict(reversed(rules))  # first occurrence wins
    used: set[str] = set()
    out = []
    for name in logical:
        axes = tuple(a for a in _axes_of(table.get(name)) if a not in used) if name is not None else ()
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Drops mesh axes that do not divide their dimension (trailing ones first)."""
    out = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        axes = list(_axes_of(entry))
        while axes and dim % math.prod(mesh.shape[a] for a in axes):
            axes.pop()
        out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return P(*out)


def param_specs(logical_tree: PyTree, shapes: PyTree, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> PyTree:
    """Mesh ``PartitionSpec`` per parameter.

    Args:
      logical_tree: the param tree of logical specs (``EncoderDecoderModel.logical_axes()``).
      shapes: the same tree with anything that has ``.shape`` (arrays, ``ShapeDtypeStruct``).
    """
    return jax.tree.map(lambda logical, x: fit_spec(logical_to_mesh(logical, rules), x.shape, mesh),
                        logical_tree, shapes, is_leaf=lambda x: isinstance(x, P))


def named(mesh: Mesh, specs: PyTree) -> PyTree:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """``[batch, ...]`` arrays: batch split over ``data`` x ``fsdp``, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_shards(mesh: Mesh) -> int:
    """How many ways the batch is split."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def init_sharded(init_fn: Callable[[jax.Array], PyTree], rng: jax.Array, logical_tree: PyTree, mesh: Mesh,
                 rules: Rules = DEFAULT_RULES) -> tuple[PyTree, PyTree]:
    """Initializes params *born sharded*: ``jax.jit(init, out_shardings=...)``, never whole on one device.

    ``init_fn(rng)`` returns the (unboxed) param tree. Returns ``(params, specs)``.
    """
    shapes = jax.eval_shape(init_fn, rng)
    specs = param_specs(logical_tree, shapes, mesh, rules)
    params = jax.jit(init_fn, out_shardings=named(mesh, specs))(rng)
    return params, specs


def put_sharded(tree: PyTree, mesh: Mesh, specs: PyTree) -> PyTree:
    """Host arrays (identical on every process) -> global arrays with the given specs.

    Works across processes: each process materializes only the shards its devices hold.
    """
    def put(x, spec):
        x = np.asarray(x)
        sharding = NamedSharding(mesh, spec)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree, specs, is_leaf=lambda x: isinstance(x, P))


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows ``[local_batch, ...]`` -> global arrays ``[global_batch, ...]`` split on data+fsdp.

    Process ``p`` must pass rows ``p * local_batch ... (p + 1) * local_batch`` of the global batch (see
    ``jaxencdec.train.batches``), which is the order ``make_array_from_process_local_data`` assembles.
    """
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def to_host(tree: PyTree) -> PyTree:
    """Global (possibly multi-process) arrays -> full numpy arrays on every process."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    from jax.experimental import multihost_utils

    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


# ---------------------------------------------------------------------- checking


@dataclass
class ShardingReport:
    """What ``check_sharding`` found.

    mismatched: ``path: intended vs actual`` for arrays whose sharding is not the intended one.
    replicated: ``path (bytes)`` for arrays above the size threshold held whole on every device.
    unfitted: ``path: wanted -> got`` where a rule was dropped because the mesh axis does not divide the dim.
    """

    mismatched: list[str] = field(default_factory=list)
    replicated: list[str] = field(default_factory=list)
    unfitted: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatched

    def summary(self) -> str:
        lines = []
        if self.mismatched:
            lines.append(f"{len(self.mismatched)} param(s) not sharded as intended: " + "; ".join(self.mismatched))
        if self.replicated:
            lines.append(f"{len(self.replicated)} large param(s) replicated on every device: "
                         + "; ".join(self.replicated))
        if self.unfitted:
            lines.append(f"{len(self.unfitted)} param(s) with a rule dropped (mesh axis does not divide the dim): "
                         + "; ".join(self.unfitted))
        return "\n".join(lines) or "all params sharded as the rules say"


def check_sharding(params: PyTree, specs: PyTree, mesh: Mesh, logical_tree: PyTree | None = None,
                   rules: Rules = DEFAULT_RULES, replicated_bytes: int = 1 << 20) -> ShardingReport:
    """Compares each array's ``.sharding`` with its intended spec, and lists large replicated params.

    Two shardings count as equal when they place every shard on the same devices (``is_equivalent_to``), so
    ``P(None, 'model')`` and ``P(None, ('model',))`` match.
    """
    report = ShardingReport()
    flat_p = traverse_util.flatten_dict(params, sep="/")
    flat_s = traverse_util.flatten_dict(specs, sep="/")
    flat_l = traverse_util.flatten_dict(logical_tree, sep="/") if logical_tree is not None else {}
    many = mesh.size > 1
    for path, x in flat_p.items():
        want = NamedSharding(mesh, flat_s[path])
        got = getattr(x, "sharding", None)
        if got is None or not got.is_equivalent_to(want, x.ndim):
            report.mismatched.append(f"{path}: want {flat_s[path]}, got {getattr(got, 'spec', got)}")
        nbytes = x.size * x.dtype.itemsize
        if many and nbytes >= replicated_bytes and got is not None and got.is_fully_replicated:
            report.replicated.append(f"{path} {tuple(x.shape)} ({nbytes / 2**20:.1f} MiB)")
        if path in flat_l:
            wanted = logical_to_mesh(flat_l[path], rules)
            if tuple(wanted) != tuple(flat_s[path]) and any(e is not None for e in wanted):
                report.unfitted.append(f"{path} {tuple(x.shape)}: {wanted} -> {flat_s[path]}")
    return report


def constrain(x: jax.Array, mesh: Mesh | None, spec: P) -> jax.Array:
    """Inside jit: pins an activation's sharding (``spec`` is fitted to its shape); a no-op without a mesh."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, fit_spec(spec, x.shape, mesh)))


def activation_constraint(mesh: Mesh | None, rules: Rules = DEFAULT_RULES):
    """What the model's ``nn.layers.constrain(x, logical_axes)`` does under ``nn.layers.activation_constraints``:
    the logical names through ``rules``, fitted to ``x``'s shape, as a ``with_sharding_constraint`` on ``mesh``.
    None (no constraints) without a mesh or on one device.

    The model pins hidden states ``[batch, length, D]`` leaving every norm, attention block and MLP to the
    batch split, and gathers embedding tables over their ``embed`` side before a lookup. Without these pins the
    SPMD partitioner must reconcile ``fsdp`` on the batch with ``fsdp`` on ``embed`` by itself; on a
    data x fsdp x model mesh it falls back to "involuntary full rematerialization" around the lookups, and
    (XLA:CPU, jax 0.10) the gradients of the decoder came out wrong while the loss was right.
    ``tests/test_sharding.py`` guards both.
    """
    if mesh is None or mesh.size == 1:
        return None
    return lambda x, logical_axes: constrain(x, mesh, logical_to_mesh(P(*logical_axes), rules))
