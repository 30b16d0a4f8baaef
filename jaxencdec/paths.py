"""Where files live: local paths, and bucket URLs (``gs://``, ``s3://``, ``az://``, ``hf://``).

A local path stays a :class:`pathlib.Path`. A URL becomes an :class:`etils.epath.Path`: it keeps the ``//`` that
``pathlib`` folds away (``pathlib.Path("gs://b/m")`` is the local folder ``gs:/b/m``) and reads and writes through
fsspec's file system for its scheme: gcsfs for ``gs://`` (``pip install 'jaxencdec[gcs]'``), s3fs for ``s3://``,
adlfs for ``az://``, huggingface_hub for ``hf://``. (With TensorFlow installed, etils serves these through
``tf.io.gfile`` instead, unless ``EPATH_USE_TF=false``.) Both path types answer ``/``, ``.name``, ``.exists()``,
``.read_bytes()``...; the functions below add what a bare path object lacks: an error that names the URL and what to
install or set when the store cannot be used (:class:`StorageError`, never a traceback from inside the client), and
for ``gs://`` a check before the first request that credentials or an emulator are configured.

A bucket has no folders and no rename: a "folder" is a name prefix, a file is one object, and writing one object is
the only atomic step (an object becomes visible only once its upload is complete). ``storage.atomic_folder``
says what a whole save guarantees on a bucket.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from etils import epath

__all__ = ["SCHEMES", "PathLike", "AnyPath", "StorageError", "is_url", "as_path", "existing_folder", "exists",
           "is_file", "is_dir", "list_names", "size", "read_bytes", "read_text", "write_bytes", "append_bytes",
           "remove", "copy_folder"]

PathLike = str | os.PathLike
AnyPath = Path | epath.Path  # what as_path returns: pathlib for a local path, epath for a URL

# URL schemes etils.epath serves, and the package that serves each.
SCHEMES = {"gs": "gcsfs", "s3": "s3fs", "az": "adlfs", "hf": "huggingface_hub"}
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+)://")
# Google Cloud Storage's bucket naming rules: 3-63 characters (up to 222 with dots) of lowercase letters, digits,
# "-", "_" and ".", starting and ending with a letter or digit
_GCS_BUCKET = re.compile(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]")
_FOLDED_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+):/(?!/)")  # what pathlib.Path makes of "gs://b"
_GCS_SETUP = ("run `gcloud auth application-default login`, or set GOOGLE_APPLICATION_CREDENTIALS to a "
              "service-account key file (on a Cloud TPU or Compute Engine VM its service account is used); for an "
              "emulator set STORAGE_EMULATOR_HOST=http://HOST:PORT")


class StorageError(OSError):
    """A URL's store cannot be used: its fsspec package is missing, no credentials are configured, or a request
    failed (unreachable, refused, denied). The message names the URL and what to install or set."""


def is_url(path: object) -> bool:
    """True for ``scheme://...`` (a string, or a path object such as ``epath.Path`` whose ``fspath`` is one)."""
    text = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
    return isinstance(text, str) and _URL.match(text) is not None


def as_path(path: PathLike) -> AnyPath:
    """``path`` as a path object: a ``pathlib.Path`` for a local path, an ``epath.Path`` for a URL.

    For ``gs://`` it also checks, once per process and before any request, that Google credentials or an emulator
    (``STORAGE_EMULATOR_HOST``) are configured.

    Raises:
        ValueError: a URL scheme other than those of ``SCHEMES``, or a URL that ``pathlib.Path`` folded
            (``gs:/bucket``): pass URLs as strings.
        StorageError: ``gs://`` without credentials or emulator.
    """
    text = os.fspath(path)
    url = _URL.match(text)
    if url is None:
        folded = _FOLDED_URL.match(text)
        if folded and folded.group(1).lower() in SCHEMES:
            raise ValueError(f"{text}: looks like a {folded.group(1)}:// URL that pathlib.Path folded into a local "
                             f"path; pass the URL as a string")
        return Path(text)
    scheme = url.group(1).lower()
    if scheme not in SCHEMES:
        raise ValueError(f"{text}: unsupported URL scheme {scheme}://; use a local path or one of "
                         f"{', '.join(s + '://' for s in SCHEMES)}")
    if scheme == "gs":
        _check_bucket_name(text)
        _check_gcs_setup(text)
    return epath.Path(text)


def existing_folder(path: PathLike) -> AnyPath:
    """``path`` as a path object (see :func:`as_path`), checked to be a folder (on a bucket: a prefix that objects
    are stored under).

    Raises:
        FileNotFoundError: nothing there. NotADirectoryError: a file.
    """
    folder = as_path(path)
    if is_dir(folder):
        return folder
    if exists(folder):
        raise NotADirectoryError(f"{path}: is a file, not a folder")
    where = " (no object is stored under this prefix)" if is_url(path) else ""
    raise FileNotFoundError(f"{path}: no such folder{where}")


def exists(path: PathLike) -> bool:
    with _storage_errors(path):
        return as_path(path).exists()


def is_file(path: PathLike) -> bool:
    with _storage_errors(path):
        return as_path(path).is_file()


def is_dir(path: PathLike) -> bool:
    """True for a local folder, or a URL prefix that objects are stored under (a bucket has no empty folders)."""
    with _storage_errors(path):
        return as_path(path).is_dir()


def list_names(folder: PathLike) -> list[str]:
    """The names of the entries of ``folder`` (files and sub-folders, not their contents), sorted."""
    with _storage_errors(folder):
        return sorted(entry.name for entry in as_path(folder).iterdir())


def size(path: PathLike) -> int:
    """The file's size in bytes. Raises FileNotFoundError for a missing one."""
    with _storage_errors(path):
        stat = as_path(path).stat()
        return stat.length if is_url(path) else stat.st_size  # etils' StatResult, os.stat_result


def read_bytes(path: PathLike) -> bytes:
    """The whole file. Raises FileNotFoundError for a missing one."""
    with _storage_errors(path):
        return as_path(path).read_bytes()


def read_text(path: PathLike) -> str:
    """The whole file as UTF-8 text, line ends translated to ``\\n`` as ``open`` does. Raises FileNotFoundError for a
    missing one, UnicodeDecodeError for invalid UTF-8."""
    with _storage_errors(path):
        return as_path(path).read_text(encoding="utf-8")


def write_bytes(path: PathLike, data: bytes) -> None:
    """Writes ``data`` as the whole file. On a bucket this is one object upload, visible only once complete; a
    local file is written in place (``storage`` writes local files atomically through a temporary file)."""
    with _storage_errors(path):
        as_path(path).write_bytes(data)


def append_bytes(path: PathLike, data: bytes) -> None:
    """Adds ``data`` at the end of the file (created when missing). On ``gs://`` only ``data`` is uploaded: as an
    object of its own, then composed onto the end of the file by Cloud Storage and removed (the file's new version
    is visible once complete). Stores without such an operation (``s3://``, ``az://``) rewrite the whole file."""
    with _storage_errors(path):
        target = as_path(path)
        if not is_url(path):
            with open(target, "ab") as f:
                f.write(data)
            return
        if not target.exists():
            target.write_bytes(data)
            return
        if _URL.match(os.fspath(path)).group(1).lower() != "gs":
            target.write_bytes(target.read_bytes() + data)
            return
        import fsspec

        fs = fsspec.filesystem("gs", finalize_on_close=True)  # the instance etils' paths use
        part = f"{os.fspath(path)}.part-{uuid.uuid4().hex[:12]}"
        fs.pipe_file(part, data)
        try:
            fs.merge(os.fspath(path), [os.fspath(path), part])
        finally:
            fs.rm_file(part)
        fs.invalidate_cache(os.fspath(path))


def remove(path: PathLike) -> None:
    """Deletes one file (a bucket object)."""
    with _storage_errors(path):
        as_path(path).unlink()


def copy_folder(source: PathLike, target: PathLike) -> None:
    """Copies every file under the folder ``source`` to the same place under ``target``, which must not exist.

    Local files are hard-linked where the file system allows (no bytes copied; the copy keeps them when the
    source is deleted), else copied. On a bucket each object is copied by the store itself (nothing downloaded).

    Raises:
        FileExistsError: ``target`` exists. FileNotFoundError: ``source`` is not a folder.
    """
    with _storage_errors(source):
        src, dst = as_path(source), as_path(target)
        if dst.exists():
            raise FileExistsError(f"{target}: already exists; copying {source} there would mix the two")
        if not src.is_dir():
            raise FileNotFoundError(f"{source}: no such folder")
        if not is_url(source) and not is_url(target):
            shutil.copytree(src, dst, copy_function=_link_or_copy)
            return
        _copy_objects(epath.Path(src), epath.Path(dst))  # a local side too: epath's local paths have copy()


def _copy_objects(source: epath.Path, target: epath.Path) -> None:
    target.mkdir(parents=True, exist_ok=True)  # (on a bucket, where folders do not exist, nothing)
    for entry in source.iterdir():
        if entry.is_dir():
            _copy_objects(entry, target / entry.name)
        else:
            entry.copy(target / entry.name)


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


# ---------------------------------------------------------------------- errors and credentials


_PASSED_THROUGH = (FileNotFoundError, IsADirectoryError, NotADirectoryError, FileExistsError, UnicodeDecodeError,
                   StorageError)


@contextlib.contextmanager
def _storage_errors(path: PathLike) -> Iterator[None]:
    """Turns a URL's client failures (network, HTTP, authentication, a missing package) into StorageError naming the
    URL; a missing file and everything about local paths pass unchanged."""
    try:
        yield
    except _PASSED_THROUGH:
        raise
    except Exception as error:
        if not is_url(path):
            raise
        raise StorageError(f"{os.fspath(path)}: {_reason(error)}; {_remedy(os.fspath(path), error)}") from error


def _reason(error: BaseException) -> str:
    reason = " ".join(str(error).split()) or "no message"
    return f"{type(error).__name__}: {reason[:300]}{'...' if len(reason) > 300 else ''}"


def _remedy(url: str, error: BaseException) -> str:
    scheme = url.split("://", 1)[0].lower()
    if isinstance(error, ImportError):
        return _install_hint(scheme)
    if scheme != "gs":
        return f"check the {SCHEMES[scheme]} settings (credentials, endpoint) for {scheme}:// URLs"
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if emulator:
        return f"STORAGE_EMULATOR_HOST is {emulator}: is that emulator running, with this bucket?"
    return f"check the bucket name and the permissions of your credentials, or {_GCS_SETUP}"


def _install_hint(scheme: str) -> str:
    package = SCHEMES[scheme]
    command = "pip install 'jaxencdec[gcs]'" if scheme == "gs" else f"pip install {package}"
    return f"{scheme}:// URLs need the {package} package: {command}"


def _check_bucket_name(url: str) -> None:
    """A bucket name that GCS would refuse, caught before any request (which would fail deep in the client)."""
    bucket = url.split("://", 1)[1].split("/", 1)[0]
    dotted_parts_ok = all(0 < len(part) <= 63 for part in bucket.split("."))
    if not (_GCS_BUCKET.fullmatch(bucket) and dotted_parts_ok and (len(bucket) <= 63 or "." in bucket)):
        raise ValueError(f"{url}: {bucket!r} is not a valid bucket name: Cloud Storage bucket names have 3-63 "
                         f"characters, lowercase letters, digits, '-', '_' and '.', and start and end with a letter "
                         f"or a digit (gs://BUCKET/path/in/bucket)")


def _check_gcs_setup(url: str) -> None:
    """Without credentials gcsfs would send anonymous requests, which fail late (or after minutes of retries when
    offline) with a message that names neither the URL nor the fix: fail first, with both. An emulator
    (STORAGE_EMULATOR_HOST) or a token in fsspec's configuration (``FSSPEC_GS_TOKEN``, e.g. ``anon`` for a public
    bucket) is taken as configured."""
    if os.environ.get("STORAGE_EMULATOR_HOST") or _fsspec_gcs_token():
        return
    try:
        _google_default_credentials()
    except ImportError as error:
        raise StorageError(f"{url}: {_install_hint('gs')}") from error
    except Exception as error:  # google.auth.exceptions.DefaultCredentialsError
        raise StorageError(f"{url}: no Google Cloud credentials found ({_reason(error)}); {_GCS_SETUP}") from error


def _fsspec_gcs_token() -> bool:
    import fsspec.config

    return any(fsspec.config.conf.get(protocol, {}).get("token") for protocol in ("gs", "gcs"))


@functools.cache  # a success is kept for the process; a failure is not cached, so a later call looks again
def _google_default_credentials() -> None:
    import google.auth

    google.auth.default()
