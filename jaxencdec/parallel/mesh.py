"""The device mesh, the logical-axis rules table, and multi-host start-up.

The mesh has three named axes:

    data   pure data parallelism: params replicated, batch split
    fsdp   data parallelism whose params (and optimizer state) are also split along ``embed``
    model  Megatron-style tensor parallelism: attention heads, MLP width and vocabulary split

Every parameter carries logical axis names (see ``jaxencdec.nn.layers``); ``DEFAULT_RULES`` maps them to mesh
axes. A rules table is a short list of ``(logical name, mesh axis or axes or None)``; a logical name not in the
table is replicated.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

logger = logging.getLogger("jaxencdec")

MESH_AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both data-parallel axes

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# logical name -> mesh axes. Params: weights of the attention (heads) and the MLP (mlp) and the vocabulary
# are split Megatron-style on `model`; their `embed` side is split on `fsdp` (ZeRO-3 style).
DEFAULT_RULES: Rules = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("vocab", "model"),
    ("heads", "model"),
    ("mlp", "model"),
    ("hidden", "model"),
    ("embed", "fsdp"),
    ("kv", None),
    ("positions", None),
    ("norm", None),
    ("layers", None),  # the stacked layer axis of scanned layers: each chip holds its shard of every layer
)


class MeshError(ValueError):
    """The mesh shape does not fit the devices, or a rule names an unknown axis."""


@dataclass(frozen=True)
class MeshConfig:
    """Sizes of the ``data``, ``fsdp`` and ``model`` axes; at most one may be -1 (= whatever is left).

    ``rules``: optional logical-axis rules replacing ``DEFAULT_RULES`` (a list of ``[name, axis]`` pairs, where
    axis is a mesh axis name, a list of them, or null).
    """

    data: int = -1
    fsdp: int = 1
    model: int = 1
    rules: Rules | None = None

    def __post_init__(self):
        sizes = (self.data, self.fsdp, self.model)
        if sum(s == -1 for s in sizes) > 1:
            raise MeshError(f"at most one mesh axis may be -1, got data={self.data} fsdp={self.fsdp} "
                            f"model={self.model}")
        if any(s == 0 or s < -1 for s in sizes):
            raise MeshError(f"mesh axis sizes must be positive or -1, got data={self.data} fsdp={self.fsdp} "
                            f"model={self.model}")
        if self.rules is not None:
            object.__setattr__(self, "rules", normalize_rules(self.rules))

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        """The concrete ``(data, fsdp, model)`` for ``num_devices``; raises ``MeshError`` if it does not fit."""
        sizes = [self.data, self.fsdp, self.model]
        known = int(np.prod([s for s in sizes if s != -1]))
        if -1 in sizes:
            if num_devices % known:
                raise MeshError(f"mesh {self.describe()} does not divide the {num_devices} devices "
                                f"({num_devices} is not a multiple of {known})")
            sizes[sizes.index(-1)] = num_devices // known
        if int(np.prod(sizes)) != num_devices:
            raise MeshError(f"mesh {self.describe()} needs {int(np.prod(sizes))} devices, but there are {num_devices}")
        return tuple(sizes)

    def describe(self) -> str:
        return f"data={self.data} fsdp={self.fsdp} model={self.model}"

    def replace(self, **changes) -> "MeshConfig":
        return dataclasses.replace(self, **changes)

    @property
    def logical_rules(self) -> Rules:
        return self.rules if self.rules is not None else DEFAULT_RULES


def normalize_rules(rules) -> Rules:
    """JSON-style ``[[name, axis-or-list-or-null], ...]`` -> a hashable rules tuple, checked against the axes."""
    out = []
    for rule in rules:
        if len(rule) != 2 or not isinstance(rule[0], str):
            raise MeshError(f"a sharding rule is [logical_name, mesh_axis], got {rule!r}")
        name, axes = rule
        axes = tuple(axes) if isinstance(axes, (list, tuple)) else axes
        for axis in (axes if isinstance(axes, tuple) else (axes,)):
            if axis is not None and axis not in MESH_AXES:
                raise MeshError(f"sharding rule for {name!r} names mesh axis {axis!r}; the axes are {MESH_AXES}")
        out.append((name, axes))
    return tuple(out)


def make_mesh(config: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``Mesh`` over ``devices`` (default: all devices of all processes) with axes ``data, fsdp, model``.

    Axis types are ``Auto`` so that ``NamedSharding`` + ``with_sharding_constraint`` behave as pjit did: the
    compiler propagates shardings and inserts the collectives.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = config.resolve(len(devices))
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        # make_mesh insists on topology-friendly shapes on TPU; any shape works in plain device order.
        return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


@dataclass(frozen=True)
class DistributedConfig:
    """Where the ``jax.distributed`` coordinator is. Unset fields come from the environment
    (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``) and, on TPU/SLURM/MPI, from JAX's
    own cluster detection. ``enabled=False`` (the default when nothing is set anywhere) runs single-process."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    enabled: bool | None = None


def initialize_distributed(config: DistributedConfig = DistributedConfig()) -> bool:
    """Calls ``jax.distributed.initialize`` once, before any other JAX call touches the devices.

    Returns whether the process is part of a multi-process run.
    """
    env = os.environ
    address = config.coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    num = config.num_processes if config.num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    pid = config.process_id if config.process_id is not None else _env_int("JAX_PROCESS_ID")
    enabled = config.enabled if config.enabled is not None else bool(address or num)
    if not enabled:
        return False
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    kwargs = {}
    if address:
        kwargs["coordinator_address"] = address
    if num is not None:
        kwargs["num_processes"] = num
    if pid is not None:
        kwargs["process_id"] = pid
    if config.local_device_ids is not None:
        kwargs["local_device_ids"] = list(config.local_device_ids)
    jax.distributed.initialize(**kwargs)
    logger.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
                jax.process_count(), jax.local_device_count(), jax.device_count())
    return jax.process_count() > 1


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise MeshError(f"environment variable {name}={value!r} is not an integer") from None
