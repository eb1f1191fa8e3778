"""notebooks/colab_tpu.ipynb runs on a CPU: the bundled model on a 4 x 2 mesh of 8 host devices.

The notebook's cell tagged "parameters" holds the Colab settings (a 1.5B model from the hub,
AIME24); the test inserts a cell after it with the CI settings, as papermill does, and runs the
notebook in a kernel that inherits this process's XLA_FLAGS (8 host devices, tests/conftest.py).
"""

from __future__ import annotations

import ast
import json
import os

import jax
import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "notebooks", "colab_tpu.ipynb")
PARAMETERS_TAG = "parameters"
CI_MESH = (4, 2)  # the bundled model has 4 query / 2 KV heads: model=2 splits the KV heads
CI_PARAMETERS = f"""
from gkv_jax.loading import bundled_model_dir

MODEL = bundled_model_dir()
DTYPE = "float32"
MESH = {CI_MESH}
DATASET = "synthetic"
PROBLEM = 0
BUDGET = 136
DIVIDE_LENGTH = 16
MAX_NEW_TOKENS = 520
"""


def assigned_names(source: str) -> set[str]:
    """The names a cell's top-level statements assign."""
    return {target.id for node in ast.parse(source).body if isinstance(node, ast.Assign)
            for target in node.targets if isinstance(target, ast.Name)}


def parameter_cell_index(notebook) -> int:
    tagged = [i for i, cell in enumerate(notebook.cells)
              if PARAMETERS_TAG in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, f"expected one cell tagged {PARAMETERS_TAG!r}, found {len(tagged)}"
    return tagged[0]


def with_parameters(notebook, source: str):
    """`notebook` with a cell of `source` right after its parameters cell."""
    cell = nbformat.v4.new_code_cell(source.strip())
    cell.metadata["tags"] = ["injected-parameters"]
    notebook.cells.insert(parameter_cell_index(notebook) + 1, cell)
    return notebook


def test_committed_notebook_is_clean_and_ci_overrides_only_its_parameters():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]
    declared = assigned_names(notebook.cells[parameter_cell_index(notebook)].source)
    overridden = assigned_names(CI_PARAMETERS)
    assert overridden <= declared, f"CI sets names the notebook lacks: {overridden - declared}"


@pytest.mark.slow
def test_colab_tpu_notebook_runs_sharded_on_host_devices(tmp_path):
    assert jax.device_count() == 8  # the kernel sees the same XLA_FLAGS
    notebook = with_parameters(nbformat.read(NOTEBOOK, as_version=4), CI_PARAMETERS)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    printed = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                      for o in cell.get("outputs", []))
    assert "tokens/s" in printed and "cache per chip" in printed
    # The "will it fit" cell: compiled for one v5e chip by libtpu on this host (or, without
    # the tpu extra, how to install it).
    assert "GiB HBM (fits" in printed or "compile_for needs libtpu" in printed
    assert os.path.getsize(tmp_path / "runs" / "colab_tpu" / "kept_tokens.png") > 0

    summary = json.loads((tmp_path / "runs" / "colab_tpu" / "summary.json").read_text())
    data, model = CI_MESH
    assert summary["mesh"] == {"data": data, "model": model} and summary["devices"] == 8
    k_proj, gate_proj = summary["weights"]["k_proj"], summary["weights"]["gate_proj"]
    # [L, D, K, H]: only the KV-head axis is split, over `model`; [L, D, F]: the MLP width.
    assert k_proj["per_device"] == [*k_proj["global"][:2], k_proj["global"][2] // model,
                                    k_proj["global"][3]]
    assert gate_proj["per_device"] == [*gate_proj["global"][:2], gate_proj["global"][2] // model]
    full, gkv = summary["runs"]["full"], summary["runs"]["gkv@136"]
    for run in (full, gkv):
        assert run["devices"] == 8 and run["generated_tokens"] > 0
        # One prompt, padded to `data` rows: each device holds one row's cache with its KV
        # heads split over `model` (`cache_bytes` counts the prompt's row only).
        assert run["cache_bytes_per_device"] == pytest.approx(run["cache_bytes"] / model,
                                                              rel=1e-3)
    assert gkv["cache_bytes_per_device"] < full["cache_bytes_per_device"]
    # the bundled model solves every held-out problem with a full cache (docs/bundled-model.md)
    assert full["correct"], full
