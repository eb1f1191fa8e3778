"""The notebooks run top to bottom on the bundled model (CPU)."""

from __future__ import annotations

import os

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = os.path.join(os.path.dirname(__file__), "..", "notebooks")


def run_notebook(name: str, directory, timeout: int) -> str:
    """Executes notebooks/<name> with `directory` as its working directory; returns the
    text its code cells printed."""
    notebook = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    client = NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(directory)}})
    client.execute()
    return "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                   for o in cell.get("outputs", []))


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path):
    outputs = run_notebook("quickstart.ipynb", tmp_path, timeout=600)
    assert "answer" in outputs and "pass@1" in outputs
    assert os.path.exists(tmp_path / "runs" / "quickstart" / "accuracy_vs_budget.png")


@pytest.mark.slow
def test_post_training_notebook_runs(tmp_path):
    """Distils the bundled model for a few steps and evaluates before and after (slow)."""
    outputs = run_notebook("post_training.ipynb", tmp_path, timeout=900)
    assert "replayed masks equal the record: True" in outputs
    assert "pass@1 gkv@68: before" in outputs
    assert os.path.exists(tmp_path / "runs" / "post_training_notebook" / "before_after.png")
