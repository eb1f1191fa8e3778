"""notebooks/quickstart.ipynb runs top to bottom on the bundled model (CPU)."""

from __future__ import annotations

import os

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "notebooks", "quickstart.ipynb")
POST_TRAINING = os.path.join(os.path.dirname(__file__), "..", "notebooks",
                             "post_training.ipynb")


def test_quickstart_notebook_runs(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                      for o in cell.get("outputs", []))
    assert "answer" in outputs and "pass@1" in outputs
    assert os.path.exists(tmp_path / "runs" / "quickstart" / "accuracy_vs_budget.png")


@pytest.mark.slow
def test_post_training_notebook_runs(tmp_path):
    """Distils the bundled model for a few steps and evaluates before and after (slow)."""
    notebook = nbformat.read(POST_TRAINING, as_version=4)
    client = NotebookClient(notebook, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                      for o in cell.get("outputs", []))
    assert "replayed masks equal the record: True" in outputs
    assert "pass@1 gkv@68: before" in outputs
    assert os.path.exists(tmp_path / "runs" / "post_training_notebook" / "before_after.png")
