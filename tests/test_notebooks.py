"""Both Colab notebooks run top to bottom on CPU in their small setting (a broken notebook fails CI)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["quickstart.ipynb", "finetune_tpu.ipynb"])
def test_notebook_runs(name, tmp_path, monkeypatch):
    notebook = nbformat.read(ROOT / "colab" / name, as_version=4)
    assert all(not c.get("outputs") for c in notebook.cells if c.cell_type == "code"), "clear the outputs"
    assert "colab.research.google.com" in notebook.cells[0].source  # the Open in Colab badge
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    monkeypatch.setenv("JAXENCDEC_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in notebook.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    printed = "".join(o.get("text", "") for c in notebook.cells for o in c.get("outputs", []))
    if name == "quickstart.ipynb":
        assert "saved and reloaded: identical logits" in printed
    else:
        assert os.path.isdir(tmp_path / "runs" / "finetune_cpu" / "final_model")
        assert "rougeL" in printed
