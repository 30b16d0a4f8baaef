"""The weight file formats, one file at a time: safetensors, PyTorch ``.bin`` pickles, Flax msgpack, and the
renaming of a Hugging Face Flax parameter tree to PyTorch names.

Everything here works on flat ``dict[str, np.ndarray]`` state dicts keyed by Hugging Face **PyTorch** parameter
names (``encoder.embeddings.word_embeddings.weight``, ``decoder.cls.predictions.bias``, ...), or -- for our own
parameter trees -- on nested dicts of numpy arrays stored as Flax msgpack. Nothing in this module knows about
model architectures. Files are written atomically (:mod:`jaxencdec.storage`); every problem with a file that is
read raises :class:`jaxencdec.errors.CheckpointError` naming the file and the problem.
"""

from __future__ import annotations

import pickle
import types
from collections.abc import Mapping
from io import BytesIO
from typing import Any

import ml_dtypes
import numpy as np

from jaxencdec import paths, storage
from jaxencdec.errors import CheckpointError
from jaxencdec.paths import PathLike

__all__ = ["read_safetensors", "write_safetensors", "read_pytorch_bin", "read_msgpack", "write_msgpack",
           "hf_flax_to_state_dict"]

_DEFAULT_METADATA: Mapping[str, str] = types.MappingProxyType({"format": "pt"})


def write_safetensors(
    state_dict: Mapping[str, Any],
    path: PathLike,
    metadata: Mapping[str, str] | None = _DEFAULT_METADATA,
) -> None:
    """Atomically write a flat ``name -> array`` state dict as a safetensors file.

    Arrays may be numpy or anything ``np.asarray`` accepts (jax arrays); bf16 as ``ml_dtypes.bfloat16``.
    ``metadata`` defaults to ``{"format": "pt"}``, which transformers expects.
    """
    from safetensors.numpy import save

    arrays = {name: np.asarray(value, order="C") for name, value in state_dict.items()}
    storage.write_file(save(arrays, metadata=dict(metadata) if metadata else None), path)


def read_safetensors(path: PathLike) -> dict[str, np.ndarray]:
    """Read one safetensors file into ``name -> np.ndarray``, dtypes and shapes exact (bf16 as ml_dtypes).

    Raises:
        CheckpointError: missing file, or truncated / corrupt file.
    """
    from safetensors.numpy import load, load_file

    path = paths.as_path(path)
    if not paths.is_file(path):
        raise CheckpointError(f"{path}: safetensors file not found")
    data = paths.read_bytes(path) if paths.is_url(path) else None  # a local file is memory-mapped instead
    try:
        return dict(load_file(str(path)) if data is None else load(data))
    except Exception as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({msg})") from e


def _torch_to_numpy(t: Any) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    exact = {
        torch.bfloat16: (torch.int16, ml_dtypes.bfloat16),
        torch.float8_e4m3fn: (torch.uint8, ml_dtypes.float8_e4m3fn),
        torch.float8_e5m2: (torch.uint8, ml_dtypes.float8_e5m2),
    }
    if t.dtype in exact:
        as_int, np_dtype = exact[t.dtype]
        return np.array(t.contiguous().view(as_int).numpy(), copy=True).view(np_dtype)
    try:
        return np.array(t.numpy(), copy=True)
    except TypeError:  # dtypes numpy lacks (e.g. other float8 flavours)
        return np.array(t.float().numpy(), copy=True)


def read_pytorch_bin(path: PathLike) -> dict[str, np.ndarray]:
    """Read one ``pytorch_model.bin`` (or shard) into ``name -> np.ndarray``.

    Uses ``torch.load(map_location="cpu", weights_only=True)``: a pickle that
    would import or call anything besides tensors is refused, never executed.
    bf16 / float8 tensors become the matching ``ml_dtypes`` arrays (same bits).

    Raises:
        CheckpointError: torch not installed; file missing, refused
            (tries to execute code), truncated/corrupt, or not a flat dict of tensors.
    """
    path = paths.as_path(path)
    if not paths.is_file(path):
        raise CheckpointError(f"{path}: PyTorch weight file not found")
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(
            f"{path}: reading PyTorch .bin weights needs torch; "
            "install jaxencdec[convert] or convert the checkpoint to safetensors"
        ) from e
    source = BytesIO(paths.read_bytes(path)) if paths.is_url(path) else str(path)
    try:
        obj = torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(
            f"{path}: refused to load: the pickle tries to execute code or load "
            f"non-tensor objects (not executed; {first_line})"
        ) from e
    except Exception as e:
        msg = " ".join(str(e).split())[:300] or type(e).__name__
        if "weights only load failed" in msg.lower() or "weights_only" in msg.lower():
            raise CheckpointError(
                f"{path}: refused to load: the pickle tries to execute code (not executed; {msg})"
            ) from e
        raise CheckpointError(f"{path}: truncated or corrupt PyTorch weight file ({msg})") from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path}: expected a dict of tensors, found {type(obj).__name__}"
        )
    out: dict[str, np.ndarray] = {}
    for name, value in obj.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor"
            )
        out[name] = _torch_to_numpy(value)
    return out


def read_msgpack(path: PathLike, what: str = "msgpack file") -> dict:
    """Read a Flax msgpack file (``flax.serialization.msgpack_restore``).

    Returns the nested dict as stored, leaves as numpy arrays. ``what`` names the file in the errors.

    Raises:
        CheckpointError: missing file, truncated / corrupt data, or a top
            level that is not a dict.
    """
    path = paths.as_path(path)
    if not paths.is_file(path):
        raise CheckpointError(f"{path}: {what} not found")
    from flax.serialization import msgpack_restore

    data = paths.read_bytes(path)
    try:
        tree = msgpack_restore(data)
    except Exception as e:
        msg = " ".join(str(e).split())[:300] or type(e).__name__
        raise CheckpointError(f"{path}: truncated or corrupt msgpack file ({msg})") from e
    if not isinstance(tree, dict):
        raise CheckpointError(
            f"{path}: truncated or corrupt msgpack file (top level is "
            f"{type(tree).__name__}, not a dict)"
        )
    return tree


def write_msgpack(tree: Mapping, path: PathLike) -> None:
    """Atomically write a nested dict of arrays with ``flax.serialization.msgpack_serialize``.

    Leaves may be numpy or jax arrays or scalars; they are stored as numpy
    arrays with their dtype and shape.  Read back with :func:`read_msgpack`.
    """
    from flax.serialization import msgpack_serialize

    def to_np(x: Any) -> Any:
        if isinstance(x, Mapping):
            return {str(k): to_np(v) for k, v in x.items()}
        return np.asarray(x)

    if not isinstance(tree, Mapping):
        raise TypeError(f"tree must be a (nested) mapping, got {type(tree).__name__}")
    storage.write_file(msgpack_serialize(to_np(tree)), path)


def hf_flax_to_state_dict(tree: Mapping, source: PathLike = "<tree>") -> dict[str, np.ndarray]:
    """Turn a nested HF-Flax (transformers 4.x) param dict into PyTorch names.

    The path is joined with ``"."``; a leaf ``kernel`` becomes ``weight``
    (transposed when 2-D: HF Flax kernels are ``[in, out]``, i.e. PyTorch's
    ``weight.T``, GPT-2's Conv1D included), ``embedding`` and ``scale``
    become ``weight``, everything else (``bias``, ...) keeps its name.  A
    lone top-level ``"params"`` wrapper is dropped.

    Raises:
        CheckpointError: a leaf is not an array, or two leaves map to the same name.
    """
    if set(tree) == {"params"} and isinstance(tree["params"], Mapping):
        tree = tree["params"]
    out: dict[str, np.ndarray] = {}

    def walk(node: Mapping, prefix: tuple[str, ...]) -> None:
        for key, value in node.items():
            p = (*prefix, str(key))
            if isinstance(value, Mapping):
                walk(value, p)
                continue
            if not isinstance(value, (np.ndarray, np.generic)):
                raise CheckpointError(
                    f"{source}: leaf {'/'.join(p)!r} is a {type(value).__name__}, not an array"
                )
            arr = np.asarray(value)
            leaf = p[-1]
            if leaf == "kernel":
                if arr.ndim == 2:
                    arr = np.ascontiguousarray(arr.T)
                leaf = "weight"
            elif leaf in ("embedding", "scale"):
                leaf = "weight"
            name = ".".join((*p[:-1], leaf))
            if name in out:
                raise CheckpointError(
                    f"{source}: two parameters map to the same PyTorch name {name!r}"
                )
            out[name] = arr

    walk(tree, ())
    return out
