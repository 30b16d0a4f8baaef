"""Writing files and model folders so that an interrupted save never leaves half of one, and reading and writing
JSON and text.

All writes are atomic: the bytes go to a temporary file in the destination folder, which is fsynced and then moved
over the final name with :func:`os.replace`, so an interrupted save never leaves a half-written file under the final
name. A model folder is replaced as a whole with :func:`atomic_folder`, so that its weights and config always
belong together.

Every path may also be a bucket URL (``gs://bucket/model``, see :mod:`jaxencdec.paths`). A bucket has no rename:
each file is written as one object, which appears only once complete, and :func:`atomic_folder` says what a whole
save guarantees there.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from jaxencdec import paths
from jaxencdec.errors import CheckpointError
from jaxencdec.paths import PathLike

__all__ = ["atomic_folder", "write_file", "read_json", "write_json", "write_text"]


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


def write_file(data: bytes, path: PathLike) -> None:
    """Atomically writes ``data`` as the whole file ``path``: one object upload on a bucket, else through
    :func:`_atomic_open`."""
    if paths.is_url(path):
        paths.write_bytes(path, data)
        return
    with _atomic_open(path) as f:
        _write_bytes(f, data)


# Weight files of any kind a model folder may hold (single, sharded, index): a new save drops the old ones, since
# checkpoint.weights.find_weights would otherwise pick a stale model.safetensors before a fresh flax_model.msgpack.
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
    """Deletes the weight files of ``folder`` not named in ``keep`` (``find_weights`` could pick them first)."""
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
    write_file(text.encode("utf-8"), path)
