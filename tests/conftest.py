"""Shared fixtures: the real assets that ship as packages, and small saved Hugging Face models."""

from __future__ import annotations

import gc
import logging
import os
import shutil
import sys
import tempfile
import warnings

sys.path.insert(0, os.path.dirname(__file__))
import testing  # noqa: E402  (no jax import)

# Before anything imports jax, in this process and in every child it starts (the xdist workers, the `jaxencdec`
# commands, the notebook kernels):
# - XLA:CPU compiles with fewer optimization passes: the tests' tiny models spend far more time compiling than
#   running (results stay inside the tests' tolerances; benchmarks live in tools/, without these flags);
# - one persistent compilation cache for the child processes of the whole run (the `jaxencdec` commands, the
#   notebook kernels), so that a program one child compiled is loaded, not compiled again, by the next (a folder of
#   the run's temporary directory, gone with it); the test processes themselves do not (below);
# - pip may install local wheels (the notebook tests install jaxencdec's), never from a package index;
# - the test extra installs libtpu (tests/test_tpu_*.py compile for TPU slices ahead of time): without these jax
#   would look for TPU chips in every process, the two test workers would contend for libtpu's lock, and libtpu
#   would log into /tmp instead of the run's temporary folder;
# - torch (the transformers references) runs each op on one thread: with two test workers on two cores, its
#   OpenMP threads only contend with the other worker (measured on four files of per-pair checks against
#   transformers, run with -n 2: 6-13% less time, in two runs each way);
# - the MLIR locations jax lowers each operation with name the one user frame it came from, not its whole Python
#   traceback (jax's default, for debugging): about 6% less CPU time over test_models_equivalence.py, run alone
#   three times each way.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), testing.FAST_COMPILE_FLAGS]))
CREATED_CACHE = None if "JAX_COMPILATION_CACHE_DIR" in os.environ else tempfile.mkdtemp(prefix="jaxencdec-xla-cache-")
if CREATED_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = CREATED_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ["PIP_NO_INDEX"] = "1"  # nothing is installed from a package index while the tests run
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_LOG_DIR", os.path.join(tempfile.gettempdir(), "tpu_logs"))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("JAX_INCLUDE_FULL_TRACEBACKS_IN_LOCATIONS", "0")

import jax  # noqa: E402  (after the environment above)
import pytest  # noqa: E402

from jaxencdec import assets  # noqa: E402

# The test processes keep their compiled programs in jax's in-memory caches alone: their tests build a new program
# far more often than they rebuild one that another test compiled, and XLA:CPU compiles those small programs about
# as fast as the persistent cache loads them (measured: over 647 of the tests, 63 cache hits saved no time; over
# 308 of them, writing to the cache cost 3.5% of their CPU time). Set before anything compiles: jax decides once.
jax.config.update("jax_enable_compilation_cache", False)

warnings.filterwarnings("ignore", category=FutureWarning)
logging.getLogger("transformers").setLevel(logging.ERROR)


# The longest test files run first, longest first (each file's test times summed, as `--junitxml` of a full run
# reports them): with `-n 2` each file goes whole to the next idle worker, in collection order, so the long ones
# (the TPU slice compiles take minutes) overlap the rest of the suite instead of running alone at its end.
LONGEST_FIRST = ("test_tpu_configs.py", "test_layer_execution.py", "test_notebooks.py", "test_multihost.py",
                 "test_transformers_suites.py", "test_own_loop.py", "test_surface.py", "test_train_gcs.py",
                 "test_llm_decoders.py", "test_models_equivalence.py", "test_packing.py", "test_demo.py",
                 "test_train_resume.py", "test_cli.py", "test_tpu_programs.py", "test_bfloat16.py",
                 "test_generation_equivalence.py")


def pytest_unconfigure(config):
    if CREATED_CACHE and not hasattr(config, "workerinput"):  # the process that made the cache, after its workers
        shutil.rmtree(CREATED_CACHE, ignore_errors=True)


def pytest_collection_finish(session):
    """Python's garbage collector, in each test process once its tests are collected: what is alive now (the
    modules of jax, torch and transformers: about half a million objects) is frozen, so that full collections no
    longer walk it, and a collection runs every 10,000 net allocations instead of 700 (tracing and lowering
    allocate objects by the million: the threshold the ``jaxencdec`` commands set). Measured run alone: 13% less
    CPU time over test_models_equivalence.py, 5.5% over test_transformers_suites.py."""
    from jaxencdec.cli import _collect_garbage_less_often

    gc.collect()
    gc.freeze()
    _collect_garbage_less_often()


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def hf_pair(tmp_path_factory):
    """``hf_pair(name) -> (transformers model, its saved folder)`` for a pair of ``hf_reference.PAIRS``: each pair
    built and saved once per test process, whichever test files use it. The model has eager attention (it returns
    attention probabilities) and is in eval mode; a test that switches it to training mode switches it back."""
    from hf_reference import PAIRS, hf_encoder_decoder

    built = {}

    def get(name: str):
        if name not in built:
            encoder, decoder, enc_hidden, dec_hidden = PAIRS[name]
            hf = hf_encoder_decoder(encoder, decoder, seed=len(name), encoder_hidden=enc_hidden,
                                    decoder_hidden=dec_hidden)
            hf.set_attn_implementation("eager")
            folder = tmp_path_factory.mktemp(name)
            hf.save_pretrained(folder)
            built[name] = hf, folder
        return built[name]

    return get


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """The real all-MiniLM-L6-v2 BERT (safetensors, vocab.txt, tokenizer.json)."""
    return assets.minilm_path()


@pytest.fixture(scope="session")
def aclsum_path() -> str:
    return assets.aclsum_path()
