"""Where a model's files are: a local folder, a bucket prefix, or a Hugging Face Hub repo fetched into the local
cache; and the error that ``push_to_hub`` raises, since jaxencdec leaves uploads to ``huggingface_hub``."""

from __future__ import annotations

import os
from pathlib import Path

from jaxencdec import paths
from jaxencdec.errors import CheckpointError
from jaxencdec.paths import PathLike

__all__ = ["resolve_model_folder", "hub_upload_error"]


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
