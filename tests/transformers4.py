"""transformers 4 as a test oracle, for what transformers 5 removed (relative position embeddings in BERT and
RoBERTa, ``tie_encoder_decoder``).

The ``transformers4`` fixture installs the pinned transformers 4 stack with pip into a folder of the session's
temporary directory, and runs Python scripts in a subprocess whose ``PYTHONPATH`` puts that folder first: there
transformers 4 shadows the virtual environment's transformers 5, while torch, numpy and safetensors come from
the environment. Arrays go in and out as ``.npz`` files. Each script pays for importing torch and transformers
(several seconds), so a test module runs few, each doing much.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PINS = ("transformers==4.57.3", "huggingface-hub==0.36.0", "tokenizers==0.22.1")
VERSION = "4.57.3"
TESTS = Path(__file__).resolve().parent


def _pip_install(target: Path, requirements: list[str]) -> None:
    """``pip install --no-deps --target target requirements``; a failure (no registry, no such version) fails
    the requesting test with pip's own words."""
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
               "--target", str(target), *requirements]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        pytest.fail(f"pip could not install {' '.join(requirements)} within 10 minutes (is the package registry "
                    "reachable?); the transformers 4 equivalence tests need them", pytrace=False)
    if result.returncode != 0:
        pytest.fail(f"pip could not install {' '.join(requirements)}, which the transformers 4 equivalence tests "
                    f"need (is the package registry reachable?):\n{result.stderr[-3000:]}", pytrace=False)


def _unmet(target: Path) -> list[str]:
    """The requirements of the distributions in ``target`` that neither ``target`` nor this environment meets
    (transformers 4 imports packages, such as ``requests``, that transformers 5 no longer needs)."""
    dists = list(importlib.metadata.distributions(path=[str(target)]))
    installed = {canonicalize_name(d.metadata["Name"]) for d in dists}
    unmet = set()
    for requirement in (Requirement(line) for d in dists for line in d.requires or ()):
        if canonicalize_name(requirement.name) in installed or (
                requirement.marker and not requirement.marker.evaluate({"extra": ""})):
            continue
        try:
            met = requirement.specifier.contains(importlib.metadata.version(requirement.name), prereleases=True)
        except importlib.metadata.PackageNotFoundError:
            met = False
        if not met:
            unmet.add(f"{requirement.name}{requirement.specifier}")
    return sorted(unmet)


class Transformers4:
    """Runs scripts against transformers 4 (installed in ``site``)."""

    def __init__(self, site: Path):
        self.site = site

    def run(self, script: str, folder: Path, timeout: int = 600, **arrays: np.ndarray) -> dict[str, np.ndarray]:
        """Runs ``script`` with transformers 4 in a subprocess whose working directory is ``folder``.

        The script finds ``arrays`` in ``inputs.npz`` and leaves its results in ``outputs.npz`` (optional); it
        may import ``hf_reference`` (the tests folder is on its path). Returns the outputs (empty when none).
        A failing script fails the test with its stderr.
        """
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / "inputs.npz", **arrays)
        preamble = (f"import transformers\nassert transformers.__version__ == {VERSION!r}, "
                    "('transformers 4 is not the one imported', transformers.__file__)\n")
        (folder / "script.py").write_text(preamble + textwrap.dedent(script))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(self.site), str(TESTS)]),
               "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        result = subprocess.run([sys.executable, "script.py"], cwd=folder, env=env, capture_output=True, text=True,
                                timeout=timeout)
        if result.returncode != 0:
            pytest.fail(f"the transformers 4 script in {folder} failed:\n{result.stderr[-6000:]}", pytrace=False)
        outputs = folder / "outputs.npz"
        if not outputs.exists():
            return {}
        with np.load(outputs) as data:
            return {name: data[name] for name in data.files}


@pytest.fixture(scope="session")
def transformers4(tmp_path_factory) -> Transformers4:
    """transformers 4.57 (with the huggingface-hub and tokenizers it needs) installed into the session's
    temporary directory, and whatever else it requires that this environment lacks."""
    site = tmp_path_factory.mktemp("transformers4")
    requirements = list(PINS)
    for _ in range(5):  # each round installs what the previous round's packages require
        _pip_install(site, requirements)
        requirements = _unmet(site)
        if not requirements:
            return Transformers4(site)
    pytest.fail(f"transformers 4's requirements keep growing: {requirements}", pytrace=False)
