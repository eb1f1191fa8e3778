"""`benchmarks/device_check.sh`: its pure pieces, the CPU dry run in-process (fast, without the
pytest stage and the transformers comparison) and the whole script's dry run (slow)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "device_check.sh"


def load_helper():
    spec = importlib.util.spec_from_file_location("device_check",
                                                  REPO / "benchmarks" / "device_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["device_check"] = module  # dataclasses look their module up while defined
    spec.loader.exec_module(module)
    return module


device_check = load_helper()
sys.path.insert(0, str(REPO / "benchmarks"))
import decode_device_bench  # noqa: E402  (a benchmark script next to device_check.py)


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
    summary["decode_benchmark"] = [{"batch": 1, "skipped": "time budget"}]
    assert device_check.succeeded(summary)  # a row left out for time is not a failure
    summary["decode_benchmark"] = [{"error": "boom"}]
    assert not device_check.succeeded(summary)


def decode_row(batch, tokens, policy, tokens_per_second, roofline=0.5):
    return {"batch": batch, "max_new_tokens": tokens, "policy": policy,
            "label": "full" if policy == "full" else "gkv budget 2048",
            "implementation": "xla", "tokens_per_second": tokens_per_second,
            "roofline_fraction": roofline}


def device_summary():
    return {"mode": "device", "decode_benchmark": [
        decode_row(64, 16384, "gkv", 3000.0), decode_row(64, 16384, "full", 1000.0),
        decode_row(1, 4096, "full", 900.0, roofline=0.85),
        decode_row(1, 4096, "gkv", 800.0, roofline=0.7),
        {"batch": 1, "max_new_tokens": 16384, "policy": "full", "skipped": "time budget"}],
        "eviction_benchmark": [
            {"batch": 64, "implementation": "xla", "matmul_dtype": "float32",
             "ms_per_layer": 9.0},
            {"batch": 64, "implementation": "pallas", "matmul_dtype": "float32",
             "ms_per_layer": 1.2},
            {"batch": 64, "implementation": "pallas", "matmul_dtype": "bfloat16",
             "error": "boom"},
            {"batch": 16, "implementation": "pallas", "matmul_dtype": "float32",
             "ms_per_layer": 0.3}]}


def test_targets_read_their_rows_and_give_verdicts():
    summary = device_summary()
    targets = device_check.targets(summary)
    assert set(targets) == set(device_check.TARGETS)
    roofline = targets["batch1_decode_roofline_fraction"]
    assert roofline["value"] == 0.85 and roofline["verdict"] == "pass"  # full, not gkv
    ratio = targets["gkv2048_over_full_speed_batch64_16k"]
    assert ratio["value"] == 3.0 and ratio["verdict"] == "pass"
    eviction = targets["eviction_ms_per_layer_batch64"]
    assert eviction["value"] == 1.2 and eviction["verdict"] == "pass"  # fastest at batch 64
    assert "pallas" in eviction["measured_on"]

    summary["decode_benchmark"][0]["tokens_per_second"] = 2000.0
    summary["eviction_benchmark"][1]["ms_per_layer"] = 2.0
    targets = device_check.targets(summary)
    assert targets["gkv2048_over_full_speed_batch64_16k"]["verdict"] == "fail"
    assert targets["eviction_ms_per_layer_batch64"]["verdict"] == "fail"

    del summary["decode_benchmark"][1]  # full at 16k did not run: no ratio
    targets = device_check.targets(summary)
    assert targets["gkv2048_over_full_speed_batch64_16k"] == {
        "value": None, "comparison": ">=", "threshold": 2.5, "verdict": "not-measured",
        "measured_on": "did not run"}
    summary["mode"] = "dry-run"  # a dry run measures no target
    assert {t["verdict"] for t in device_check.targets(summary).values()} == {"not-measured"}


def test_peak_bandwidth_table_by_device_kind():
    gbps = decode_device_bench.table_bandwidth_gbps
    assert gbps("NVIDIA H200") == 4800
    assert gbps("NVIDIA H100 80GB HBM3") == 3350  # SXM
    assert gbps("NVIDIA H100 PCIe") == 2000
    assert gbps("TPU v5 lite") == 819 and gbps("TPU v5") == 2765 and gbps("TPU v5p") == 2765
    assert gbps("TPU v6 lite") == 1640
    assert gbps("cpu") is None and gbps("NVIDIA A100-SXM4-80GB") is None


def test_device_rows_cover_the_grid_most_important_first():
    first, rest = decode_device_bench.rows_in_order(decode_device_bench.DEVICE, False)
    runs = first + rest
    assert len(set(runs)) == len(runs)
    cells = {(r.batch, r.max_new_tokens, r.eviction.policy) for r in runs}
    assert cells == {(b, n, p) for b in (1, 64) for n in (4096, 16384) for p in ("full", "gkv")}
    labels = [(r.batch, r.max_new_tokens, r.label) for r in first]
    assert labels == [(64, 16384, "gkv budget 2048"), (64, 16384, "full"), (1, 4096, "full"),
                      (64, 4096, "full")]  # the targets' rows, then transformers' match
    other = [r for r in runs if r.eviction.implementation is not None]
    assert [(r.batch, r.max_new_tokens, r.eviction.implementation) for r in other] == [
        (64, 4096, "pallas")]
    assert all(r.eviction.budget == 2048 and r.eviction.divide_length == 128
               for r in runs if r.eviction.policy == "gkv")


def test_rows_past_the_time_budget_are_skipped_not_run():
    lines = []
    clock = device_check.Clock(time.time(), device_check.END_RESERVE_S)  # nothing left
    evictions = device_check.eviction_benchmark("dry-run", clock)
    assert evictions and all(r["skipped"] == "time budget" for r in evictions)
    sizes = decode_device_bench.DEVICE
    name, config = decode_device_bench.generate_bench.build_config(sizes.preset, [])
    first, rest = decode_device_bench.rows_in_order(sizes, False)
    left = 200.0  # the first row (batch 64, 16k, gkv) fits, the second (full) does not
    rows = decode_device_bench.decode_rows(first + rest, sizes, None, config, 3350.0,
                                           decode_device_bench.Calibration(), lambda: left,
                                           lines.append)
    assert [r.get("skipped") for r in rows[:2]] == [None, "time budget"]
    assert "error" in rows[0]  # it ran (on no model)
    assert rows[1]["estimated_seconds"] > left >= rows[0]["estimated_seconds"]
    comparison = decode_device_bench.transformers_comparison(sizes, config, rows, "gpu",
                                                             lambda: 0.0, lines.append)
    assert comparison["skipped"] == "time budget"
    assert len(lines) == len(rows) + 1 and "skipped" in lines[-1]


def test_a_stage_that_raises_is_recorded_and_the_summary_still_written(tmp_path,
                                                                        monkeypatch):
    def broken(mode, clock):
        raise RuntimeError("boom")

    monkeypatch.setattr(device_check, "eviction_benchmark", broken)
    monkeypatch.setattr(device_check, "decode_benchmark", lambda mode, clock, transformers: {
        "setup": None, "rows": [], "transformers": {"skipped": "not requested"}})
    monkeypatch.setattr(device_check, "engine_benchmark", lambda mode, clock: [])
    output = tmp_path / "summary.json"
    summary = device_check.run(True, output, None, with_tests=False)
    assert summary["eviction_benchmark"] == [{"error": "RuntimeError: boom"}]
    assert summary["ok"] is False and json.loads(output.read_text()) == summary
    assert [s["stage"] for s in summary["stages"]] == ["eviction", "decode", "engine"]


# Slow (the fast suite's cold time; CI runs it with the slow sweeps): the stage-error test
# above keeps `device_check.run` in the fast suite.
@pytest.mark.slow
def test_dry_run_in_process_writes_every_stage(tmp_path, monkeypatch):
    """The dry run without the pytest stage, the transformers comparison, the Pallas
    eviction row (its interpret-mode compile) and the engine stage (its compiles; the slow
    script test runs them all): seconds."""
    dry_run_evictions = device_check.EVICTION_RUNS["dry-run"]
    monkeypatch.setitem(device_check.EVICTION_RUNS, "dry-run", dict(
        dry_run_evictions, implementations=(("xla", "float32"),)))
    monkeypatch.setattr(device_check, "engine_benchmark", lambda mode, clock: [
        {"skipped": "stubbed (the slow script test)"}])
    output = tmp_path / "summary.json"
    summary = device_check.run(True, output, None, with_tests=False, transformers=False)
    assert json.loads(output.read_text()) == summary
    assert summary["ok"] is True and summary["mode"] == "dry-run"
    assert [s["stage"] for s in summary["stages"]] == ["eviction", "decode", "engine"]
    assert all(s["seconds"] > 0 for s in summary["stages"] if s["stage"] != "engine")
    assert summary["tests"]["not_run"] == "not requested"
    assert summary["transformers"] == {"skipped": "not requested"}

    evictions = {row["implementation"]: row for row in summary["eviction_benchmark"]}
    assert set(evictions) == {"xla"}
    for row in evictions.values():
        assert row["median_seconds"] > 0 and row["compile_seconds"] > 0
        assert row["ms_per_layer"] == 1e3 * row["median_seconds"] and row["slots"] == 128

    setup = summary["decode_setup"]
    assert setup["layers"] == 1 and setup["peak_bandwidth"]["gbps"] > 0
    assert setup["peak_bandwidth"]["source"].startswith("measured")  # cpu: not in the table
    rows = summary["decode_benchmark"]
    assert [(r["batch"], r["policy"]) for r in rows] == [(2, "gkv"), (2, "full")]
    for row in rows:
        assert "skipped" not in row and "error" not in row
        for key in ("tokens_per_second", "step_seconds", "compile_seconds_first_call",
                    "cache_bytes", "weight_bytes", "kv_bytes", "roofline_fraction"):
            assert row[key] > 0, key
        assert row["forwards"] == row["max_new_tokens"] == 48
        assert (row["compressions"] >= 1) == (row["policy"] == "gkv")
        moved = row["weight_bytes"] + row["kv_bytes"]
        assert abs(row["roofline_fraction"] * row["step_seconds"] * row["roofline_gbps"] * 1e9
                   - moved) < 1e-6 * moved

    # Each measured row beside the compiler's report of the same program on this device.
    compared = summary["against_reports"]
    assert [(r["batch"], r["policy"]) for r in compared] == [(2, "full"), (2, "gkv")]
    for entry, row in zip(compared, reversed(rows), strict=True):
        assert entry["measured_step_seconds"] == row["step_seconds"]
        assert entry["compiler_bytes_per_device"] > row["cache_bytes"]  # weights and cache
        assert entry["estimated_step_seconds_floor"] is None  # a CPU: no published bandwidth
        assert entry["measured_peak_bytes_in_use"] is None  # a CPU reports no memory stats

    assert summary["engine_benchmark"] == [{"skipped": "stubbed (the slow script test)"}]

    targets = summary["targets"]
    assert set(targets) == set(device_check.TARGETS)
    for name, target in targets.items():
        assert target["verdict"] == "not-measured"
        if name != "engine_over_static_lognormal":  # its stage is stubbed here
            assert target["value"] > 0 and "dry run" in target["measured_on"]


def test_unknown_argument_names_the_allowed_ones():
    done = subprocess.run(["bash", str(SCRIPT), "--fast"], capture_output=True, text=True)
    assert done.returncode == 2
    assert "--fast" in done.stderr and "--dry-run" in done.stderr and "--output" in done.stderr


@pytest.mark.slow
def test_dry_run_writes_a_valid_summary(tmp_path):
    """The whole script on CPU at tiny sizes, the pytest stage and the transformers comparison
    (on CPU torch) included (about 20 s on 2 cores)."""
    output = tmp_path / "summary.json"
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--output", str(output)],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**_env(), "PYTHON": sys.executable})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(output.read_text())
    assert summary["ok"] is True and summary["mode"] == "dry-run"
    assert summary["backend"] == "cpu" and summary["jax"] and summary["device"]
    assert json.loads(done.stdout[done.stdout.index("{"):done.stdout.rindex("}") + 1]) == summary
    for stage in ("tests", "eviction", "decode", "engine"):  # one line per finished stage
        assert f"stage {stage} done in" in done.stdout
    assert [s["stage"] for s in summary["stages"]] == ["tests", "eviction", "decode", "engine"]
    static, engine = summary["engine_benchmark"]
    assert (static["path"], engine["path"]) == ("static", "engine")
    assert engine["identical_tokens"] and engine["useful_tokens"] == static["useful_tokens"] > 0
    assert 0 < engine["occupancy"] <= 1 and engine["engine_over_static"] > 0
    assert 0 < summary["seconds"] < summary["time_budget"]["budget_seconds"]
    tests = summary["tests"]
    assert tests["failed"] == tests["errors"] == 0 and tests["skipped"] > 0  # gpu/tpu tests
    evictions = {row["implementation"]: row for row in summary["eviction_benchmark"]}
    assert set(evictions) == {"xla", "pallas"}
    for row in evictions.values():
        assert row["median_seconds"] > 0 and row["slots"] == 128
    decodes = {row["policy"]: row for row in summary["decode_benchmark"]}
    assert set(decodes) == {"full", "gkv"}
    assert decodes["gkv"]["compressions"] >= 1 and decodes["full"]["compressions"] == 0
    for row in decodes.values():
        assert row["tokens_per_second"] > 0 and row["roofline_fraction"] > 0
    comparison = summary["transformers"]
    if "skipped" not in comparison:  # torch and transformers are installed here
        assert comparison["device"] == "cpu" and comparison["rows"]
        for row in comparison["rows"]:
            assert row["step_seconds"] > 0 and row["speedup"] > 0
            assert row["mean_context"] == row["ours_mean_context"]
    assert {t["verdict"] for t in summary["targets"].values()} == {"not-measured"}


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "OUT"}
