"""The installed jaxencdec's version, from its package metadata: imported by the package's top, the command line and
exported artifacts' manifests alike, so that none of them imports another to learn it."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__"]

try:
    __version__ = version("jaxencdec")
except PackageNotFoundError:  # a source tree that was never installed (pip install -e . records the version)
    __version__ = "0+unknown"
