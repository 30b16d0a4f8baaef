"""The one exception type for unusable checkpoints."""

from __future__ import annotations

__all__ = ["CheckpointError"]


class CheckpointError(ValueError):
    """A checkpoint file or folder cannot be used.

    Raised for missing, truncated, corrupt or refused weight files, invalid
    config JSON, and model locations that are neither a local folder nor a
    reachable Hugging Face Hub repo.  The message always names the file (or
    location) and the problem, on one line.
    """
