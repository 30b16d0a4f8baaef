"""TPU slices without the slice: Cloud TPU names as jax's compile-only topologies, and what a device's HBM holds.

``resolve_topology("v5e-64")`` gives jax's topology (``v5e:8x8``), ``topology_devices`` its compile-only devices
(libtpu, ``pip install "jax[tpu]"`` at jax's version, compiles for them on any machine; run with
``JAX_PLATFORMS=cpu`` where no TPU is attached, and ``ALLOW_MULTIPLE_LIBTPU_LOAD=1`` to let two processes load
libtpu). ``device_memory`` finds the HBM one device can use; ``parse_out_of_memory`` reads XLA:TPU's
out-of-memory compile error.

A device is one chip, except on v2 and v3, where it is one TensorCore with its own HBM. v4 and v5p run one device
per chip (megacore), as JAX does on them.
"""

from __future__ import annotations

import importlib.metadata
import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

GiB = 2**30

# HBM per device where XLA does not say (see ``device_memory``): the chips' data-sheet sizes.
HBM_GIB = {"v2": 8, "v3": 16, "v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}

# Cloud TPU name prefix -> (jax's prefix, what the number counts, shape rank). v2, v3, v4 and v5p names count
# TensorCores (two per chip), v5e and v6e names count chips.
_FAMILIES = {"v2": ("v2", "cores", 2), "v3": ("v3", "cores", 2), "v4": ("v4", "cores", 3),
             "v5p": ("v5p", "cores", 3), "v5e": ("v5e", "chips", 2), "v5litepod": ("v5e", "chips", 2),
             "v6e": ("v6e", "chips", 2)}
# The smallest and largest slice of each family, in chips; sizes in between are powers of two.
_CHIP_RANGE = {"v2": (4, 256), "v3": (4, 1024), "v4": (4, 2048), "v5p": (4, 4096), "v5e": (1, 256),
               "v6e": (1, 256)}


class TopologyError(ValueError):
    """The topology name is not one this module knows, or libtpu rejects it."""


class TPUCompilerUnavailable(RuntimeError):
    """libtpu, which compiles for TPU, is not installed (or another process holds it)."""


# ---------------------------------------------------------------------- topologies


@dataclass(frozen=True)
class Topology:
    """A TPU slice as ``jax.experimental.topologies.get_topology_desc`` takes it.

    name: as asked (``v5e-64`` or ``v5e:8x8``); jax_name: jax's string (``v5e:8x8``); family: ``v5e``, ``v4``...;
    chips: the slice's chips; options: further ``get_topology_desc`` keywords (``chip_config_name``,
    ``chips_per_host_bounds``).
    """

    name: str
    jax_name: str
    family: str
    chips: int
    options: tuple[tuple[str, Any], ...] = ()

    def describe(self) -> str:
        return self.name if self.name == self.jax_name else f"{self.name} ({self.jax_name})"


def supported_names() -> dict[str, list[int]]:
    """The Cloud TPU names ``resolve_topology`` maps: ``{"v5e": [1, 4, 8, ...], ...}`` (``v5e-64``...;
    ``v5litepod-N`` is ``v5e-N``)."""
    names = {}
    for prefix, (family, counts, _) in _FAMILIES.items():
        if prefix == "v5litepod":
            continue
        low, high = _CHIP_RANGE[family]
        chips = [c for c in (2**k for k in range(13)) if low <= c <= high and c != 2]
        names[prefix] = [c * (2 if counts == "cores" else 1) for c in chips]
    return names


def _listing(families=None) -> str:
    return ", ".join(f"{prefix}-{'/'.join(map(str, sizes))}" for prefix, sizes in supported_names().items()
                     if families is None or prefix in families)


def _shape(chips: int, rank: int) -> tuple[int, ...]:
    """The slice shape of ``chips`` (a power of two) as Cloud TPU lays slices out: 2x2 (2x2x1) first, then the
    smallest side doubles, the last of equal sides first: 2x4, 4x4, 4x8 ... / 2x2x2, 2x2x4, 2x4x4, 4x4x4 ..."""
    if chips == 1:
        return (1,) * rank
    dims = [2, 2] + [1] * (rank - 2)
    while math.prod(dims) < chips:
        smallest = min(dims)
        i = max(j for j, d in enumerate(dims) if d == smallest)
        dims[i] *= 2
    return tuple(dims)


def _host_bounds(dims: Sequence[int]) -> tuple[tuple[str, Any], ...]:
    """libtpu's default host is 2x2x1 chips; a slice smaller than that (one chip) says how many its host has."""
    if len(dims) >= 2 and (dims[0] < 2 or dims[1] < 2):
        return (("chips_per_host_bounds", (min(dims[0], 2), min(dims[1], 2), 1)),)
    return ()


def resolve_topology(name: str) -> Topology:
    """A Cloud TPU name (``v4-32``, ``v5e-64``, ``v5litepod-64``, ``v5p-128``, ``v6e-256``, ``v2-8``, ``v3-8``...)
    or a jax topology string (``v5e:2x2``, ``v4:2x2x4``; passed to libtpu as is) -> ``Topology``.

    Raises ``TopologyError`` listing the supported names for anything else. v4-N and v5p-N are N/2 chips in 3D
    (v4-32: ``v4:2x2x4``, megacore: one device per chip), v2-N and v3-N N/2 chips in 2D, each with two devices
    (TensorCores). A jax string is what jax makes of it: ``v4:2x2x4`` without megacore is 32 devices of one
    TensorCore and half a chip's HBM each.
    """
    name = name.strip()
    raw = re.fullmatch(r"(v\d+[a-z]*):(\d+(?:x\d+){1,2})", name)
    if raw:
        family = {"v5": "v5p", "v5litepod": "v5e"}.get(raw.group(1), raw.group(1))
        dims = tuple(int(d) for d in raw.group(2).split("x"))
        return Topology(name, name, family, math.prod(dims), _host_bounds(dims))
    cloud = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name)
    if not cloud or cloud.group(1) not in _FAMILIES:
        raise TopologyError(f"unknown topology {name!r}: use a Cloud TPU name ({_listing()}; v5litepod-N is v5e-N) "
                            f"or a jax topology string such as v5e:2x2 or v4:2x2x4")
    family, counts, rank = _FAMILIES[cloud.group(1)]
    number = int(cloud.group(2))
    chips = number // 2 if counts == "cores" else number
    low, high = _CHIP_RANGE[family]
    if (counts == "cores" and number % 2) or not low <= chips <= high or chips & (chips - 1) or chips == 2:
        example = f"{family}:4x4x12" if rank == 3 else f"{family}:4x8"
        raise TopologyError(f"{name}: not a {family} slice this maps ({_listing([family])}; other shapes: a jax "
                            f"topology string such as {example})")
    dims = _shape(chips, rank)
    options = (("chip_config_name", "megacore"),) if family in ("v4", "v5p") else ()
    if family in ("v5e", "v6e") and chips == 8:  # one host of 2x4 chips, not two of 2x2
        options += (("chips_per_host_bounds", (2, 4, 1)),)
    return Topology(name, f"{family}:{'x'.join(map(str, dims))}", family, chips, options + _host_bounds(dims))


def install_line() -> str:
    """The pip command that installs the libtpu matching the installed jax."""
    try:
        return f'pip install "jax[tpu]=={importlib.metadata.version("jax")}"'
    except importlib.metadata.PackageNotFoundError:
        return 'pip install "jaxencdec[tpu]"'


def topology_devices(topology: Topology) -> list:
    """The slice's devices, compile-only (nothing runs on them); libtpu is loaded on first use.

    Raises ``TPUCompilerUnavailable`` without libtpu (or when another process holds it), ``TopologyError`` when
    libtpu rejects the topology."""
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(topology_name=topology.jax_name, platform="tpu",
                                                 **dict(topology.options)).devices)
    except RuntimeError as error:  # JaxRuntimeError is a RuntimeError too
        text = str(error)
        if "TPU support not installed" in text:
            raise TPUCompilerUnavailable(f"compiling for TPU needs libtpu, which is not installed: {install_line()} "
                                         f'(or pip install "jaxencdec[tpu]")') from None
        if "lockfile" in text:
            raise TPUCompilerUnavailable("another process holds libtpu; set ALLOW_MULTIPLE_LIBTPU_LOAD=1 to compile "
                                         "beside it") from None
        raise TopologyError(f"libtpu rejects topology {topology.describe()}: {text.strip().splitlines()[0]}") from None


# ---------------------------------------------------------------------- memory


@dataclass(frozen=True)
class OutOfMemory:
    """What a RESOURCE_EXHAUSTED compile error says: ``needed`` bytes of ``what`` against ``available``."""

    what: str
    needed: int | None
    available: int | None
    message: str


_SIZE = r"([\d.]+)([KMGT]?)i?B?"
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _bytes(number: str, unit: str) -> int:
    return int(float(number) * _UNITS[unit])


def parse_out_of_memory(message: str) -> OutOfMemory | None:
    """The figures of XLA:TPU's out-of-memory compile error, or None if ``message`` is not one."""
    if "RESOURCE_EXHAUSTED" not in message and "Ran out of memory" not in message:
        return None
    first = next((line.strip() for line in message.splitlines() if "memory" in line.lower()), message.strip())
    found = re.search(rf"required for ([^(]+?) \({_SIZE}\) exceeds available HBM \({_SIZE}\)", message)
    if found:
        return OutOfMemory(found.group(1).strip(), _bytes(*found.group(2, 3)), _bytes(*found.group(4, 5)), first)
    found = re.search(rf"Used {_SIZE} of {_SIZE} hbm", message)
    if found:
        return OutOfMemory("the program", _bytes(*found.group(1, 2)), _bytes(*found.group(3, 4)), first)
    return OutOfMemory("the program", None, None, first)


def device_memory(device, family: str | None = None) -> tuple[int | None, str]:
    """``(bytes, where the figure comes from)``: the HBM one device can use.

    A local device reports it (``memory_stats()["bytes_limit"]``); a compile-only TPU device does not, but XLA
    names it in its out-of-memory error, so a program too large for any chip is compiled (a fraction of a second)
    and the figure read from the error; else ``HBM_GIB``'s data-sheet size; else ``(None, "unknown")``.
    """
    try:
        stats = device.memory_stats()
    except Exception:  # compile-only devices: "only supported for addressable PjRt devices"
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), "as the device reports"
    if device.platform == "tpu":
        import jax
        import jax.numpy as jnp
        from jax.sharding import SingleDeviceSharding

        huge = jax.ShapeDtypeStruct((2**19, 2**19), jnp.float32, sharding=SingleDeviceSharding(device))  # 1 TiB
        try:
            jax.jit(lambda x: x + 1).lower(huge).compile()
        except Exception as error:
            oom = parse_out_of_memory(str(error))
            if oom is not None and oom.available:
                return oom.available, "as XLA reports"
    if family in HBM_GIB:
        return HBM_GIB[family] * GiB, "data sheet"
    return None, "unknown"
