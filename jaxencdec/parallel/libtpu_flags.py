"""The libtpu compiler flags jaxencdec trains with on TPUs, added to ``LIBTPU_INIT_ARGS`` before libtpu starts.

libtpu reads ``LIBTPU_INIT_ARGS`` once, when the first TPU backend (or ahead-of-time topology) is created in a
process: ``jaxencdec train``, ``eval`` and ``compile`` call ``add_libtpu_flags`` before that; from Python, call it
before anything asks jax for devices (``jax.devices()``, a ``Mesh``).

``FSDP_LAYOUT_FLAGS`` let XLA:TPU give a gradient whose sharded dimension is its minor-most one (attention's out
kernel, ``[heads, head_dim, embed]`` with ``embed`` split over ``fsdp``) the layout a reduce-scatter needs. By
default libtpu sums such a gradient over a group of 2 devices in full (an all-reduce) and keeps a slice of it;
with these flags each device receives only its shard, as with every other kernel. They are MaxText's
``LAYOUT_FOR_ALL_REDUCE_SCATTER`` (its ``xla_flags_library``, which its benchmark recipes set);
``tests/test_tpu_programs.py`` checks the gradients' collectives compiled with them.
"""

from __future__ import annotations

import os
from typing import MutableMapping

FSDP_LAYOUT_FLAGS = ("--xla_tpu_use_minor_sharding_for_major_trivial_input=true",
                     "--xla_tpu_relayout_group_size_threshold_for_reduce_scatter=1",
                     "--xla_tpu_assign_all_reduce_scatter_layout=true")


def add_libtpu_flags(env: MutableMapping[str, str] = os.environ) -> str:
    """Appends to ``env["LIBTPU_INIT_ARGS"]`` each of ``FSDP_LAYOUT_FLAGS`` that it does not already set (a value
    given there wins: ``--xla_tpu_assign_all_reduce_scatter_layout=false`` keeps libtpu's default). Returns the
    new value. Takes effect only before libtpu starts in this process (on CPU and GPU it changes nothing)."""
    given = env.get("LIBTPU_INIT_ARGS", "").split()
    named = {flag.split("=", 1)[0] for flag in given}
    added = [flag for flag in FSDP_LAYOUT_FLAGS if flag.split("=", 1)[0] not in named]
    env["LIBTPU_INIT_ARGS"] = " ".join(given + added)
    return env["LIBTPU_INIT_ARGS"]
