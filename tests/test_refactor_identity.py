"""The eviction refactor of issue 16 changed no behaviour: the bundled model's generated
tokens and kept positions under every evicting policy of the pre-refactor code are identical
now (`tests/data/eviction_reference.json`, recorded at the commit it names with
`scripts/record_eviction_reference.py`)."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(ROOT, "tests", "data", "eviction_reference.json")


def recorder():
    """scripts/record_eviction_reference.py as a module (scripts/ is not a package)."""
    path = os.path.join(ROOT, "scripts", "record_eviction_reference.py")
    spec = importlib.util.spec_from_file_location("record_eviction_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reference_was_recorded_before_the_refactor_with_the_current_sweep():
    reference = json.load(open(REFERENCE, encoding="utf-8"))
    script = recorder()
    assert reference["made_at_commit"].startswith("e29befa")  # the last pre-refactor commit
    assert not reference["made_at_commit"].endswith("-dirty")
    assert "record_eviction_reference.py" in reference["command"]
    assert reference["sweep"] == {
        "num_problems": script.NUM_PROBLEMS, "budget": script.BUDGET, "window": script.WINDOW,
        "divide_length": script.DIVIDE_LENGTH, "max_new_tokens": script.MAX_NEW_TOKENS,
        "dtype": "float32", "implementation": "xla"}
    assert tuple(reference["policies"]) == script.POLICIES


@pytest.mark.slow
def test_bundled_model_sweep_is_identical_to_the_pre_refactor_reference():
    reference = json.load(open(REFERENCE, encoding="utf-8"))["policies"]
    now = recorder().record()
    for policy, want in reference.items():
        got = now[policy]
        assert got["config"] == want["config"], policy  # same resolved knobs
        assert got["tokens"] == want["tokens"], policy
        assert got["kept_positions_sha256"] == want["kept_positions_sha256"], policy
