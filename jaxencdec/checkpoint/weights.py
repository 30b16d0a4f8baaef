"""A model folder's weights: which files hold them (single, sharded with an index, in which format), and reading
them all into one flat state dict keyed by Hugging Face PyTorch names (the formats are in
:mod:`jaxencdec.checkpoint.formats`).

Every problem raises :class:`jaxencdec.errors.CheckpointError` naming the file and the problem.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from jaxencdec import paths, storage
from jaxencdec.checkpoint.formats import hf_flax_to_state_dict, read_msgpack, read_pytorch_bin, read_safetensors
from jaxencdec.errors import CheckpointError
from jaxencdec.paths import PathLike

__all__ = ["WEIGHT_FILE_CANDIDATES", "find_weights", "read_state_dict"]

# (file name, kind, is_index), in the order find_weights looks for them.
WEIGHT_FILE_CANDIDATES: tuple[tuple[str, str, bool], ...] = (
    ("model.safetensors", "safetensors", False),
    ("model.safetensors.index.json", "safetensors", True),
    ("flax_model.msgpack", "flax", False),
    ("flax_model.msgpack.index.json", "flax", True),
    ("pytorch_model.bin", "pytorch", False),
    ("pytorch_model.bin.index.json", "pytorch", True),
)


def _read_index(index_path: Path) -> dict[str, str]:
    """Read an HF ``*.index.json`` and return its ``weight_map`` (name -> shard file)."""
    index = storage.read_json(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: index has no (or an empty) 'weight_map' object")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise CheckpointError(
                f"{index_path}: weight_map entry {name!r} does not name a shard file"
            )
        if Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise CheckpointError(
                f"{index_path}: shard {shard!r} lies outside the checkpoint folder"
            )
    return weight_map


def _find_weights(folder: PathLike) -> tuple[str, list[Path], Path | None, dict[str, str] | None]:
    folder = paths.as_path(folder)
    if not paths.is_dir(folder):
        raise CheckpointError(f"{folder}: not a folder")
    for name, kind, is_index in WEIGHT_FILE_CANDIDATES:
        p = folder / name
        if not paths.is_file(p):
            continue
        if not is_index:
            return kind, [p], None, None
        weight_map = _read_index(p)
        shards: list[Path] = []
        for shard in dict.fromkeys(weight_map.values()):
            sp = folder / shard
            if not paths.is_file(sp):
                raise CheckpointError(f"{p}: shard {shard!r} named in weight_map is missing")
            shards.append(sp)
        return kind, shards, p, weight_map
    looked_for = ", ".join(n for n, _, _ in WEIGHT_FILE_CANDIDATES)
    raise CheckpointError(f"{folder}: no weight file found (looked for {looked_for})")


def find_weights(folder: PathLike) -> tuple[str, list[Path]]:
    """Find the weight file(s) of a model folder.

    Looks, in this order, for ``model.safetensors``, ``model.safetensors.index.json``,
    ``flax_model.msgpack``, ``flax_model.msgpack.index.json``, ``pytorch_model.bin``,
    ``pytorch_model.bin.index.json``; the first one present wins.

    Returns:
        ``(kind, files)`` with ``kind`` one of ``"safetensors"``, ``"flax"``,
        ``"pytorch"`` and ``files`` the weight files to read: one file, or for
        a sharded checkpoint every shard named in the index's ``weight_map``
        (in order of first appearance).

    Raises:
        CheckpointError: ``folder`` is not a directory, none of the files
            exists, an index is invalid, or a shard it names is missing.
    """
    kind, files, _, _ = _find_weights(folder)
    return kind, files


def _flatten_slash(tree: Mapping, prefix: str = "") -> list[str]:
    names: list[str] = []
    for k, v in tree.items():
        p = f"{prefix}/{k}" if prefix else str(k)
        names.extend(_flatten_slash(v, p) if isinstance(v, Mapping) else [p])
    return names


def read_state_dict(folder: PathLike) -> dict[str, np.ndarray]:
    """Read a model folder's weights into one flat ``PyTorch name -> np.ndarray`` dict.

    Reads what :func:`find_weights` finds: safetensors (dtypes kept exactly,
    bf16 as ``ml_dtypes.bfloat16``), HF-Flax msgpack (converted to PyTorch
    names by :func:`hf_flax_to_state_dict`), or ``pytorch_model.bin`` (loaded
    with ``weights_only=True``).  Shards of a sharded checkpoint are merged;
    every name in the index's ``weight_map`` must be found in its shard.

    Raises:
        CheckpointError: no weights, missing shard, truncated / corrupt /
            refused file, a tensor in two shards, or a name listed in the
            index missing from the shards.
    """
    kind, files, index_path, weight_map = _find_weights(folder)
    out: dict[str, np.ndarray] = {}
    found_in: dict[str, Path] = {}  # names as the index spells them -> shard

    def add(names: list[str], shard: Path) -> None:
        for n in names:
            if n in found_in:
                raise CheckpointError(
                    f"{shard}: tensor {n!r} is also stored in {found_in[n].name}"
                )
            found_in[n] = shard

    for f in files:
        if kind == "safetensors":
            sd = read_safetensors(f)
            add(list(sd), f)
        elif kind == "pytorch":
            sd = read_pytorch_bin(f)
            add(list(sd), f)
        else:
            tree = read_msgpack(f, "Flax weight file")
            add(_flatten_slash(tree), f)
            sd = hf_flax_to_state_dict(tree, f)
        out.update(sd)

    if weight_map is not None:
        missing = [n for n in weight_map if n not in found_in]
        if missing:
            shown = ", ".join(f"{n!r} (in {weight_map[n]})" for n in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise CheckpointError(f"{index_path}: tensors missing from their shards: {shown}{more}")
    return out
