"""`benchmarks/device_check.sh`: its pure pieces, and the CPU dry run end to end (slow)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "device_check.sh"


def load_helper():
    spec = importlib.util.spec_from_file_location("device_check",
                                                  REPO / "benchmarks" / "device_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


device_check = load_helper()


def test_accelerator_requirement_matches_the_machine():
    need = device_check.accelerator_requirement
    assert need("gpu", "0.11.2", 13, False) is None  # JAX already sees the GPU: skip
    assert need("tpu", "0.10.2", None, True) is None
    assert need("cpu", "0.10.2", 12, False) == "jax[cuda12]==0.10.2"
    assert need("cpu", "0.11.2", 13, False) == "jax[cuda13]==0.11.2"
    assert need("cpu", "0.10.2", None, True) == "jax[tpu]==0.10.2"
    assert need("cpu", "0.10.2", 11, False) is None  # no jaxlib for CUDA 11
    assert need("cpu", "0.10.2", None, False) is None  # no accelerator: dry run


def test_cuda_major_version_from_nvidia_smi():
    banner = "| NVIDIA-SMI 580.159.03   Driver Version: 580.159.03   CUDA Version: 13.0     |"
    assert device_check.cuda_major_version(banner) == 13
    assert device_check.cuda_major_version("") is None


def test_parse_junit_counts_each_outcome():
    xml = """<testsuites><testsuite>
      <testcase classname="t" name="ok"/>
      <testcase classname="t" name="bad"><failure message="x"/></testcase>
      <testcase classname="t" name="broken"><error message="y"/></testcase>
      <testcase classname="t" name="off"><skipped message="z"/></testcase>
    </testsuite></testsuites>"""
    assert device_check.parse_junit(xml) == {
        "passed": 1, "failed": 1, "errors": 1, "skipped": 1,
        "failures": ["t::bad", "t::broken"]}


def test_default_output_follows_out(monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert device_check.default_output() == tmp_path / "device_check.json"
    monkeypatch.delenv("OUT")
    assert device_check.default_output() == REPO / "benchmarks" / "device_check.json"


def test_a_device_run_that_ran_no_accelerator_test_fails():
    summary = {"expected_accelerator": True, "mode": "device", "eviction_benchmark": [],
               "decode_benchmark": [],
               "tests": {"passed": 0, "failed": 0, "errors": 0, "skipped": 9}}
    assert not device_check.succeeded(summary)
    summary["tests"]["passed"] = 9
    assert device_check.succeeded(summary)
    summary["decode_benchmark"] = [{"error": "boom"}]
    assert not device_check.succeeded(summary)


def test_unknown_argument_names_the_allowed_ones():
    done = subprocess.run(["bash", str(SCRIPT), "--fast"], capture_output=True, text=True)
    assert done.returncode == 2
    assert "--fast" in done.stderr and "--dry-run" in done.stderr and "--output" in done.stderr


@pytest.mark.slow
def test_dry_run_writes_a_valid_summary(tmp_path):
    """The whole script on CPU at tiny sizes (about 40 s on 2 cores)."""
    output = tmp_path / "summary.json"
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--output", str(output)],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**_env(), "PYTHON": sys.executable})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(output.read_text())
    assert summary["ok"] is True and summary["mode"] == "dry-run"
    assert summary["backend"] == "cpu" and summary["jax"] and summary["device"]
    assert json.loads(done.stdout[done.stdout.index("{"):done.stdout.rindex("}") + 1]) == summary
    tests = summary["tests"]
    assert tests["failed"] == tests["errors"] == 0 and tests["skipped"] > 0  # gpu/tpu tests
    evictions = {row["implementation"]: row for row in summary["eviction_benchmark"]}
    decodes = {row["implementation"]: row for row in summary["decode_benchmark"]}
    assert set(evictions) == set(decodes) == {"xla", "pallas"}
    for row in evictions.values():
        assert row["median_seconds"] > 0 and row["slots"] == 128
    for row in decodes.values():
        assert row["tokens_per_second"] > 0 and row["compressions"] >= 1


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "OUT"}
