"""benchmarks/lookup_misses.py: where a trace first leaves the reference, and the counts it
prints for the chain model at gkv@68 (slow: one generation with the eviction record)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "lookup_misses.py"


def _module():
    spec = importlib.util.spec_from_file_location("lookup_misses", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_first_error_is_the_first_differing_character_or_the_cut():
    first_error = _module().first_error
    assert first_error("00 A 1 79\n", "00 A 1 79\n") is None
    assert first_error("00 A 2 79\n", "00 A 1 79\n") == 5
    assert first_error("00 A", "00 A 1 79\n") == 4  # stopped early: wrong where it stopped


@pytest.mark.slow
def test_it_counts_every_problem_of_the_chain_model(monkeypatch, capsys):
    from gkv_jax.loading import bundled_model_dir
    monkeypatch.setattr(sys, "argv", ["lookup_misses", "--model", bundled_model_dir("chain"),
                                      "--budget", "68", "--num-problems", "4"])
    assert _module().main() == 0
    printed = capsys.readouterr().out
    counts = printed.split("\nfirst error:")[1].splitlines()[0]
    assert sum(int(part.split()[-1]) for part in counts.split(",")) == 4
    assert all(f"layer {layer}:" in printed for layer in range(4))
