"""Shared fixtures: the real assets that ship as packages, and small saved Hugging Face models."""

from __future__ import annotations

import logging
import os
import sys
import warnings

import pytest

from jaxencdec import assets

sys.path.insert(0, os.path.dirname(__file__))
warnings.filterwarnings("ignore", category=FutureWarning)
logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """The real all-MiniLM-L6-v2 BERT (safetensors, vocab.txt, tokenizer.json)."""
    return assets.minilm_path()


@pytest.fixture(scope="session")
def aclsum_path() -> str:
    return assets.aclsum_path()


@pytest.fixture(scope="module")
def fast_compiles():
    """XLA:CPU compiles with fewer optimization passes for the tiny in-process training tests."""
    import testing

    with pytest.MonkeyPatch.context() as mp:
        testing.fast_jit(mp)
        yield
