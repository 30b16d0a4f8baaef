"""Reading and writing weight files.

Everything here works on flat ``dict[str, np.ndarray]`` state dicts keyed by
Hugging Face **PyTorch** parameter names (``encoder.embeddings.word_embeddings.weight``,
``decoder.cls.predictions.bias``, ...), or -- for our own parameter trees -- on
nested dicts of numpy arrays stored as Flax msgpack.  Nothing in this module
knows about model architectures.

All writes are atomic: the bytes go to a temporary file in the destination
folder, which is fsynced and then moved over the final name with
:func:`os.replace`, so an interrupted save never leaves a half-written file
under the final name.  A model folder is replaced as a whole with
:func:`atomic_folder`, so that its weights and config always belong together.

Every path may also be a bucket URL (``gs://bucket/model``, see :mod:`jaxencdec.paths`).
A bucket has no rename: each file is written as one object, which appears only
once complete, and :func:`atomic_folder` says what a whole save guarantees there.

Every problem with a file that is read raises
:class:`jaxencdec.checkpoint.errors.CheckpointError` with a message naming the
file and the problem.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import tempfile
import types
import uuid
from collections.abc import Iterator, Mapping
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

from jaxencdec import paths
from jaxencdec.checkpoint.errors import CheckpointError

__all__ = [
    "WEIGHT_FILE_CANDIDATES",
    "atomic_folder",
    "resolve_model_folder",
    "find_weights",
    "read_state_dict",
    "hf_flax_to_state_dict",
    "read_safetensors",
    "write_safetensors",
    "read_pytorch_bin",
    "read_msgpack",
    "write_msgpack",
    "read_json",
    "write_json",
    "write_text",
]

PathLike = str | os.PathLike

# (file name, kind, is_index), in the order find_weights looks for them.
WEIGHT_FILE_CANDIDATES: tuple[tuple[str, str, bool], ...] = (
    ("model.safetensors", "safetensors", False),
    ("model.safetensors.index.json", "safetensors", True),
    ("flax_model.msgpack", "flax", False),
    ("flax_model.msgpack.index.json", "flax", True),
    ("pytorch_model.bin", "pytorch", False),
    ("pytorch_model.bin.index.json", "pytorch", True),
)

_DEFAULT_METADATA: Mapping[str, str] = types.MappingProxyType({"format": "pt"})


# --------------------------------------------------------------------------------------
# atomic writes
# --------------------------------------------------------------------------------------


def _write_bytes(f: BinaryIO, data: Any) -> None:
    """Write one buffer to an open file (the single low-level write used by all savers)."""
    f.write(data)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _atomic_open(path: PathLike) -> Iterator[BinaryIO]:
    """Yield a binary file object; on clean exit it atomically becomes ``path``.

    The data is written to a temporary file next to ``path``, flushed and
    fsynced, then moved over ``path`` with :func:`os.replace`.  On any
    exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = 0o644
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(OSError):
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(folder)


def _atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """``data`` as the whole file ``path``: one object upload on a bucket, else through :func:`_atomic_open`."""
    if paths.is_url(path):
        paths.write_bytes(path, data)
        return
    with _atomic_open(path) as f:
        _write_bytes(f, data)


# Weight files of any kind a model folder may hold (single, sharded, index): a new save drops the old ones, since
# find_weights would otherwise pick a stale model.safetensors before a fresh flax_model.msgpack.
_WEIGHT_FILE = re.compile(r"(model|pytorch_model|flax_model)(-\d+-of-\d+)?\.(safetensors|bin|msgpack)(\.index\.json)?")


# Uploaded last to a bucket: a model folder is unusable without it, so a new folder that has one is complete.
_UPLOADED_LAST = "config.json"


def atomic_folder(path: PathLike) -> contextlib.AbstractContextManager[Path]:
    """Yield an empty local temporary folder; on clean exit its files become the folder ``path``.

    The caller writes every file of a save into the yielded folder.

    A local ``path`` is replaced as a whole.  Entries of an existing ``path`` that the save did not write are
    carried over as hard links (tokenizer files, a README; weight files of an earlier save excepted, see
    ``_WEIGHT_FILE``); then the old folder is renamed away, the new one renamed in, and the old one removed.
    On any exception the temporary folder is removed and ``path`` keeps its previous, complete contents.  (A
    process killed between the two renames leaves the previous folder beside ``path`` as ``.{name}.*.old``.)

    A bucket URL (``gs://bucket/model``) has no rename.  The files are uploaded after the block ends, so an
    exception inside it leaves the bucket untouched; then one object per file, each visible only once complete,
    ``config.json`` last, after the weight files of an earlier save that this save does not overwrite have been
    deleted (when it writes weights).  Other objects under the prefix are kept.  A new folder that has a
    ``config.json`` thus holds a complete save; an upload interrupted over an earlier save can leave a mix of
    the two, so save each model to a new path (e.g. one per step) where that matters.

    Raises:
        NotADirectoryError: ``path`` exists and is not a folder.
    """
    return _uploaded_folder(path) if paths.is_url(path) else _replaced_folder(path)


@contextlib.contextmanager
def _uploaded_folder(url: PathLike) -> Iterator[Path]:
    """:func:`atomic_folder` for a bucket URL: stage in a local temporary folder, then :func:`_upload` it."""
    target = paths.as_path(url)
    if paths.is_file(target):
        raise NotADirectoryError(f"{url}: exists and is not a folder; pass a folder path to save into")
    with tempfile.TemporaryDirectory(prefix=f"{target.name}.", suffix=".upload") as staging:
        yield Path(staging)
        _upload(Path(staging), target)


def _upload(staging: Path, target: paths.AnyPath) -> None:
    """Uploads each file below ``staging`` to the same name below ``target``, :data:`_UPLOADED_LAST` last; before
    it, when the save has weights, deletes the weight files of an earlier save that it did not overwrite."""
    names = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
    for name in names:
        if name != _UPLOADED_LAST:
            paths.write_bytes(target / name, (staging / name).read_bytes())
    if any(_WEIGHT_FILE.fullmatch(name) for name in names):
        _delete_stale_weights(target, keep=names)
    if _UPLOADED_LAST in names:
        paths.write_bytes(target / _UPLOADED_LAST, (staging / _UPLOADED_LAST).read_bytes())


def _delete_stale_weights(folder: paths.AnyPath, keep: list[str]) -> None:
    """Deletes the weight files of ``folder`` not named in ``keep`` (find_weights could pick them first)."""
    for name in paths.list_names(folder) if paths.is_dir(folder) else []:
        if _WEIGHT_FILE.fullmatch(name) and name not in keep:
            paths.remove(folder / name)


@contextlib.contextmanager
def _replaced_folder(path: PathLike) -> Iterator[Path]:
    """:func:`atomic_folder` for a local path: build beside it, then swap the folders by renames."""
    target = paths.as_path(path).absolute()
    if target.is_symlink():  # replace the folder the link points to, keep the link
        target = Path(os.path.realpath(target))
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{path}: exists and is not a folder; pass a folder path to save into")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(target, "tmp")
    staging.mkdir()
    try:
        yield staging
        if target.exists():
            shutil.copymode(target, staging)
            _carry_over(target, staging)
        _fsync_dir(staging)
        _swap_in(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _sibling(path: Path, tag: str) -> Path:
    """A fresh hidden name beside ``path`` for a staging or retiring copy of it."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.{tag}")


def _carry_over(old: Path, new: Path) -> None:
    """Hard-links (copies where links fail) the entries of ``old`` that ``new`` lacks, weight files excepted."""
    for entry in old.iterdir():
        if (new / entry.name).exists() or _WEIGHT_FILE.fullmatch(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, new / entry.name)


def _link_or_copy(src: PathLike, dst: PathLike) -> None:
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links
        shutil.copy2(src, dst)


def _swap_in(staging: Path, target: Path) -> None:
    """Renames ``staging`` to ``target``, retiring a previous ``target``; restores it if the rename fails."""
    if not target.exists():
        os.rename(staging, target)
        _fsync_dir(target.parent)
        return
    cwd = os.getcwd()
    retired = _sibling(target, "old")
    os.rename(target, retired)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(retired, target)
        raise
    _fsync_dir(target.parent)
    shutil.rmtree(retired, ignore_errors=True)
    if Path(cwd).is_relative_to(os.path.realpath(target)):  # the process worked in the retired folder: follow
        with contextlib.suppress(OSError):  # the new one (a subfolder of the old may not exist in it)
            os.chdir(cwd)


# --------------------------------------------------------------------------------------
# model location
# --------------------------------------------------------------------------------------


def _looks_like_local_path(s: str) -> bool:
    if s.startswith((".", "~", "/", "\\")) or "\\" in s:
        return True
    if len(s) >= 2 and s[1] == ":" and s[0].isalpha():  # Windows drive
        return True
    return s.count("/") > 1 or s.endswith("/")


def resolve_model_folder(
    path_or_repo_id: PathLike,
    allow_patterns: list[str] | str | None = None,
    *,
    revision: str | None = None,
    cache_dir: PathLike | None = None,
) -> paths.AnyPath:
    """Return the folder holding a model's files: local, or on a bucket.

    A local directory is returned as is, a bucket URL (``gs://bucket/model``,
    see :mod:`jaxencdec.paths`) as an ``epath.Path`` once objects are found
    under it.  Anything else is taken as a Hugging Face Hub repo id and fetched
    with ``huggingface_hub.snapshot_download`` (restricted to ``allow_patterns``
    if given; honours ``HF_HUB_OFFLINE`` and the local cache).

    Raises:
        CheckpointError: ``path_or_repo_id`` is an existing file, looks like a
            local path (absolute, ``./``, ``~``, more than one ``/``) or is a
            URL but does not exist, or the hub download fails (offline and not
            cached, repo not found, invalid repo id, network error).
        StorageError: a URL's store cannot be used (see :mod:`jaxencdec.paths`).
    """
    if paths.is_url(path_or_repo_id):
        return _bucket_folder(path_or_repo_id)
    if isinstance(path_or_repo_id, os.PathLike):
        as_path_only = True
        s = os.fspath(path_or_repo_id)
    else:
        as_path_only = False
        s = str(path_or_repo_id)
    local = paths.as_path(s).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise CheckpointError(f"{s}: is a file, not a model folder or a hub repo id")
    if as_path_only or _looks_like_local_path(s):
        raise CheckpointError(
            f"{s}: is neither a local folder nor a reachable hub repo "
            "(it looks like a local path, and no such directory exists)"
        )
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            repo_id=s,
            allow_patterns=allow_patterns,
            revision=revision,
            cache_dir=None if cache_dir is None else os.fspath(cache_dir),
        )
    except Exception as e:  # offline, not found, gated, invalid id, network, ...
        reason = " ".join(str(e).split()) or type(e).__name__
        if len(reason) > 300:
            reason = reason[:300] + "..."
        raise CheckpointError(
            f"{s}: is neither a local folder nor a reachable hub repo "
            f"({type(e).__name__}: {reason})"
        ) from e
    return Path(folder)


def hub_upload_error(what: str, repo_id: str | None) -> NotImplementedError:
    """The error ``push_to_hub`` raises: jaxencdec does not upload; these calls do (``what``: "model", ...)."""
    repo = repo_id or "your-name/your-repo"
    folder = repo.rstrip("/").split("/")[-1]
    return NotImplementedError(
        f"{what}.push_to_hub is not implemented in jaxencdec. Save to a folder, then upload it with "
        f"huggingface_hub (after `hf auth login`):\n"
        f"    {what}.save_pretrained({folder!r})\n"
        f"    import huggingface_hub\n"
        f"    huggingface_hub.create_repo({repo!r}, exist_ok=True)\n"
        f"    huggingface_hub.upload_folder(repo_id={repo!r}, folder_path={folder!r})")


def _bucket_folder(url: PathLike) -> paths.AnyPath:
    try:
        return paths.existing_folder(url)
    except (FileNotFoundError, NotADirectoryError) as error:
        raise CheckpointError(str(error)) from error


# --------------------------------------------------------------------------------------
# locating weight files
# --------------------------------------------------------------------------------------


def _read_index(index_path: Path) -> dict[str, str]:
    """Read an HF ``*.index.json`` and return its ``weight_map`` (name -> shard file)."""
    index = read_json(index_path)
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


# --------------------------------------------------------------------------------------
# safetensors
# --------------------------------------------------------------------------------------

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
    _atomic_write_bytes(path, save(arrays, metadata=dict(metadata) if metadata else None))


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


# --------------------------------------------------------------------------------------
# PyTorch pickles
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# msgpack (Flax)
# --------------------------------------------------------------------------------------


def _msgpack_restore_file(path: Path, what: str) -> dict:
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


def read_msgpack(path: PathLike) -> dict:
    """Read a Flax msgpack file (``flax.serialization.msgpack_restore``).

    Returns the nested dict as stored, leaves as numpy arrays.

    Raises:
        CheckpointError: missing file, truncated / corrupt data, or a top
            level that is not a dict.
    """
    return _msgpack_restore_file(paths.as_path(path), "msgpack file")


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
    _atomic_write_bytes(path, msgpack_serialize(to_np(tree)))


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


def _flatten_slash(tree: Mapping, prefix: str = "") -> list[str]:
    names: list[str] = []
    for k, v in tree.items():
        p = f"{prefix}/{k}" if prefix else str(k)
        names.extend(_flatten_slash(v, p) if isinstance(v, Mapping) else [p])
    return names


# --------------------------------------------------------------------------------------
# whole checkpoints
# --------------------------------------------------------------------------------------


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
            tree = _msgpack_restore_file(f, "Flax weight file")
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


# --------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------


def read_json(path: PathLike) -> dict:
    """Read a JSON file whose top level is an object (config, index, ...).

    Raises:
        CheckpointError: missing / unreadable file, invalid UTF-8 or JSON
            (with line and column), or a top level that is not an object.
    """
    path = paths.as_path(path)
    try:
        text = paths.read_text(path)
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: JSON file not found") from e
    except paths.StorageError:
        raise
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read JSON file ({e})") from e
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"{path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})"
        ) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: JSON top level is a {type(obj).__name__}, not an object")
    return obj


def write_json(obj: Any, path: PathLike) -> None:
    """Atomically write ``obj`` as JSON (``indent=2, sort_keys=True``, trailing newline, UTF-8)."""
    write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", path)


def write_text(text: str, path: PathLike) -> None:
    """Atomically write ``text`` as UTF-8 (a local temporary file renamed over ``path``; one object on a bucket)."""
    _atomic_write_bytes(path, text.encode("utf-8"))
