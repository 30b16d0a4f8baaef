"""The exceptions of files and model configs, low in the package so that every floor raises the same ones:
``CheckpointError`` when reading a JSON file, a weight file or a model folder, or restoring a training checkpoint;
``ConfigError`` for a model configuration value."""

from __future__ import annotations

__all__ = ["CheckpointError", "ConfigError", "require"]


class CheckpointError(ValueError):
    """A checkpoint file or folder cannot be used.

    Raised for missing, truncated, corrupt or refused weight files, invalid config JSON, model locations that are
    neither a local folder nor a reachable Hugging Face Hub repo, and training checkpoints that cannot be restored.
    The message always names the file (or location) and the problem, on one line.
    """


class ConfigError(ValueError):
    """A configuration value is missing, unsupported or inconsistent."""


def require(condition: bool, message: str) -> None:
    """Raises ConfigError with ``message`` unless ``condition``: the one-line checks of model configs."""
    if not condition:
        raise ConfigError(message)
