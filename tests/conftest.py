"""Shared fixtures: the real assets that ship as packages, and small saved Hugging Face models."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import warnings

# Before anything imports jax: the test extra installs libtpu (tests/test_tpu_*.py compile for TPU slices ahead of
# time), and without these jax would look for TPU chips in every process, the two test workers would contend for
# libtpu's lock, and libtpu would log into /tmp instead of the run's temporary folder.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_LOG_DIR", os.path.join(tempfile.gettempdir(), "tpu_logs"))

import pytest  # noqa: E402

from jaxencdec import assets  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
warnings.filterwarnings("ignore", category=FutureWarning)
logging.getLogger("transformers").setLevel(logging.ERROR)


# The longest test files run first: with `-n 2` each file goes whole to a worker, in collection order, and the
# demo (several minutes of training) then overlaps the rest of the suite instead of running alone at its end.
LONGEST_FIRST = ("test_demo.py", "test_cli.py", "test_notebooks.py", "test_tpu_configs.py", "test_layer_execution.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


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
