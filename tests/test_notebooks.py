"""Both Colab notebooks: committed with the outputs of a real run, and run again top to bottom on CPU in their
small setting, as Colab would run them: from an installed wheel, in a folder that holds no checkout, on one
device and on eight (a Colab TPU v2-8 has 8 cores)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest
from nbclient import NotebookClient

import testing

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ["quickstart.ipynb", "finetune_tpu.ipynb"]


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory) -> Path:
    """jaxencdec built as a wheel and installed (without dependencies: the test venv has them) into a folder
    of its own, which the notebook kernels import it from instead of the checkout."""
    folder = tmp_path_factory.mktemp("wheel")
    # built with this environment's setuptools (the test extra's): no package index is reached while tests run
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(folder / "dist"), str(ROOT)], check=True)
    wheel = next((folder / "dist").glob("jaxencdec-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(folder / "site"),
                    str(wheel)], check=True)
    return folder / "site"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_holds_the_outputs_of_a_full_run(name):
    notebook = nbformat.read(ROOT / "colab" / name, as_version=4)
    assert "colab.research.google.com" in notebook.cells[0].source  # the Open in Colab badge
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), "run tools/build_notebooks.py --execute"
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))  # top to bottom, one run
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    printed = "".join(o.get("text", "") for o in outputs)
    assert "device(s)" in printed or "CpuDevice" in printed or "TpuDevice" in printed
    if name == "finetune_tpu.ipynb":  # the full run of the inlined config, not the test suite's small setting
        steps = json.loads((ROOT / "configs" / "aclsum_minilm_cpu.json").read_text())["train"]["num_steps"]
        assert f'"step": {steps},' in printed and "eval/rougeL" in printed
        assert any("image/png" in o.get("data", {}) for o in outputs), "the loss plot"


def test_finetune_notebook_inlines_the_repository_config():
    notebook = nbformat.read(ROOT / "colab" / "finetune_tpu.ipynb", as_version=4)
    source = next(c.source for c in notebook.cells if "CONFIG = json.loads" in c.source)
    inlined = json.loads(source.split('r"""', 1)[1].split('"""', 1)[0])
    assert inlined == json.loads((ROOT / "configs" / "aclsum_minilm_cpu.json").read_text())


@pytest.mark.parametrize("devices", [1, 8])
def test_finetune_notebook_full_run_batches_divide_over_the_devices(devices):
    """The full run's settings (the runs below use the small setting's) pass the trainer's checks on ``devices``
    TPU cores: the config cell run with a stand-in for jax that reports them."""
    from jaxencdec.train.loop import validate

    notebook = nbformat.read(ROOT / "colab" / "finetune_tpu.ipynb", as_version=4)
    source = next(c.source for c in notebook.cells if "CONFIG = json.loads" in c.source)
    scope = {"json": json, "SMALL": False, "platform": "tpu", "jax": SimpleNamespace(device_count=lambda: devices)}
    exec(source, scope)
    config, inlined = scope["config"], scope["CONFIG"]
    assert (config.train.batch_size, config.eval.batch_size) == (inlined["train"]["batch_size"] * devices,
                                                                 inlined["eval"]["batch_size"] * devices)
    assert validate(config, devices, 1) == (devices, 1, 1)
    assert config.model.compute_dtype == "bfloat16" and config.model.scan_layers  # as test_tpu_configs compiles it


# Both on 8 host devices, as many cores as a Colab TPU v2-8 has; the fine-tune notebook also on one (a v5e-1 or v6e-1
# runtime's single chip), where its mesh and batch sizes differ. The quickstart places nothing itself: its programs
# run on the first device whatever the count.
RUNS = [("quickstart.ipynb", 8), ("finetune_tpu.ipynb", 8), ("finetune_tpu.ipynb", 1)]


@pytest.mark.slow
@pytest.mark.parametrize("name, devices", RUNS, ids=[f"{name}-{devices}" for name, devices in RUNS])
def test_notebook_runs_from_an_installed_wheel(name, devices, installed_wheel, tmp_path, monkeypatch):
    notebook = nbformat.read(ROOT / "colab" / name, as_version=4)
    for c in notebook.cells:
        if c.cell_type == "code":
            c.outputs, c.execution_count = [], None
    notebook.cells.append(nbformat.v4.new_code_cell("import jaxencdec; print('imported from', jaxencdec.__file__)"))
    # The kernel inherits this environment: a CPU jax with `devices` host devices, compiling with the test run's
    # flags (the small setting trains one step: its programs take far longer to compile than to run).
    monkeypatch.setenv("XLA_FLAGS", testing.subprocess_env(devices)["XLA_FLAGS"])
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("PYTHONPATH", str(installed_wheel))
    monkeypatch.setenv("JAXENCDEC_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    assert not list(tmp_path.iterdir())  # no configs/, no checkout: only what the wheel carries
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in notebook.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    printed = "".join(o.get("text", "") for c in notebook.cells for o in c.get("outputs", []))
    assert f"imported from {installed_wheel}{os.sep}jaxencdec" in printed
    if name == "quickstart.ipynb":
        assert f"CpuDevice(id={devices - 1})]" in printed  # the last of the devices listed
        assert "saved and reloaded: identical logits" in printed
    else:
        assert f"{devices} cpu device(s)" in printed
        assert f"mesh: data {devices}, fsdp 1, model 1" in printed  # the batches were split over every device
        assert (tmp_path / "runs" / "finetune_cpu" / "final_model").is_dir()
        assert "rougeL" in printed
