"""The one-call accelerator check: the kernels' tests, the eviction and decode benchmarks, the
targets, as one JSON summary.

Called by `benchmarks/device_check.sh` (which installs what is missing first); two commands:

  plan   prints "MODE REQUIREMENT": MODE is "device" when JAX sees (or, once REQUIREMENT is
         installed, will see) a GPU or TPU, else "dry-run"; REQUIREMENT is the pip
         requirement of the accelerator's jaxlib at the installed JAX version ("-": none).
  run    the stages below, in order, each printing a line with the elapsed time as it ends,
         then writes the summary to --output and prints it.

Stages of `run` (on one H100 / H200, within an 8-minute budget counted from the shell
script's start; the estimated seconds of each row are checked against what is left, and a
row that would overrun is recorded as {"skipped": "time budget"} instead of run):

  tests         `pytest -m "gpu or tpu" tests/pallas_kernels` (the kernels compiled on the
                device against the reference), in a subprocess with a timeout.
  eviction      `eviction_bench.bench`: one layer's eviction at R1-Distill-Qwen-7B shapes,
                batch 1, 16, 64, 128, XLA reference vs Pallas float32 vs Pallas bfloat16
                matmuls: median time (also as ms per layer), compile time, the compiled
                program's memory analysis and the device's peak bytes in use.
  decode        `decode_device_bench.decode_stage`: `generate` at the whole
                R1-Distill-Qwen-1.5B preset (random bfloat16 weights), batch 1 and 64, full
                vs gkv budget 2048, 4,096 and 16,384 new tokens, the roofline fraction, and
                `transformers` on the same device when torch sees it (see that module).
                Then two of its rows beside `gkv_jax.targets.compile_for("attached", ...)`'s
                report of the same program ("against_reports"): measured step time against
                the ESTIMATED step floor (step bytes / published bandwidth), the device's
                peak bytes in use against the compiler's bytes per device.
  engine        `engine_bench.measure`: the slot engine against static `generate` batches at
                the whole R1-Distill-Qwen-1.5B preset (random bfloat16 weights), 16 slots,
                48 requests whose max_new_tokens follow the R1 trace-length lognormal
                scaled to 2,048 (identical tokens required), when the time left allows.
  targets       each target's measured value, threshold and verdict ("pass", "fail", or
                "not-measured": in the dry run, or when its rows did not run):
                  batch1_decode_roofline_fraction      >= 0.8  (batch 1, full, 4,096 tokens)
                  eviction_ms_per_layer_batch64        <= 1.5  (fastest implementation)
                  gkv2048_over_full_speed_batch64_16k  >= 2.5  (tokens/s ratio)
                  engine_over_static_lognormal         >= 1.8  (useful tokens/s ratio)

`--dry-run` (automatic without an accelerator) runs the same code at tiny sizes on the CPU
(seconds, without the tests stage: `tests/test_device_check.py`); its numbers only show that
the code works. The summary keeps the keys of earlier versions (`tests`, `eviction_benchmark`,
`decode_benchmark`, `ok`, ...) and adds `decode_setup`, `transformers`, `against_reports`,
`targets`, `stages` and `time_budget`.

Exit status of `run`: 0 when every stage succeeded (on a device: at least one accelerator
test ran and none failed; no benchmark row failed; skipped rows and the transformers
comparison, a reference rather than a check of this project, do not count), 1 otherwise; the
summary is written either way.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

TEST_COMMAND = ("-m", "pytest", "-m", "gpu or tpu", "tests/pallas_kernels", "-q",
                "-p", "no:cacheprovider")
TEST_TIMEOUT_S = {"device": 180, "dry-run": 120}
TIME_BUDGET_S = {"device": 480.0, "dry-run": 600.0}
END_RESERVE_S = 15.0  # left for the summary and the exit
EVICTION_RUNS = {  # (implementation, matmul_dtype) at each batch, batches ascending (the
    # device's peak bytes in use is a process-wide high-water mark)
    "device": dict(batches=(1, 16, 64, 128),
                   implementations=(("xla", "float32"), ("pallas", "float32"),
                                    ("pallas", "bfloat16"))),
    "dry-run": dict(batches=(1,), implementations=(("xla", "float32"), ("pallas", "float32"))),
}
EVICTION_REPEATS = {"device": 5, "dry-run": 1}
EVICTION_COMPILE_ESTIMATE_S = {"device": 15.0, "dry-run": 5.0}  # until one is measured
EVICTION_TARGET_BATCH = {"device": 64, "dry-run": 1}
TARGETS = {  # name: (comparison, threshold)
    "batch1_decode_roofline_fraction": (">=", 0.8),
    "eviction_ms_per_layer_batch64": ("<=", 1.5),
    "gkv2048_over_full_speed_batch64_16k": (">=", 2.5),
    "engine_over_static_lognormal": (">=", 1.8),
}
ENGINE_RUNS = {  # the engine stage's workload (argparse-like) and its time estimate
    "device": dict(shape="r1-1.5b", requests=48, cap=2048, slots=16, seed=0,
                   dtype="bfloat16", estimate_s=150.0),
    "dry-run": dict(shape="bundled", requests=8, cap=24, slots=4, seed=0, dtype="float32",
                    estimate_s=20.0),
}


@dataclasses.dataclass(frozen=True)
class Clock:
    """The run's time budget: `started` (epoch seconds, the shell script's start) + budget."""

    started: float
    budget_seconds: float

    def elapsed(self) -> float:
        return time.time() - self.started

    def remaining(self) -> float:
        """Seconds a stage may still use (the end reserve kept back)."""
        return self.budget_seconds - END_RESERVE_S - self.elapsed()

    def log(self, message: str) -> None:
        print(f"[{self.elapsed():6.1f} s] {message}", flush=True)


# ------------------------------------------------------------------------------ plan
def cuda_major_version(nvidia_smi_output: str) -> int | None:
    """The driver's CUDA major version from `nvidia-smi`'s banner ("CUDA Version: 13.0")."""
    match = re.search(r"CUDA Version:\s*(\d+)", nvidia_smi_output)
    return int(match.group(1)) if match else None


def accelerator_requirement(backend: str, jax_version: str, cuda_major: int | None,
                            has_tpu: bool) -> str | None:
    """The pip requirement that gives JAX this machine's accelerator, None when nothing is
    to install (JAX already sees a GPU / TPU, or there is no accelerator)."""
    if backend in ("gpu", "tpu"):
        return None
    if cuda_major is not None and cuda_major >= 12:
        return f"jax[cuda{min(cuda_major, 13)}]=={jax_version}"
    if has_tpu:
        return f"jax[tpu]=={jax_version}"
    return None


def plan() -> tuple[str, str | None]:
    """(mode, requirement) for this machine."""
    import jax

    backend = jax.default_backend()
    smi = shutil.which("nvidia-smi")
    smi_output = subprocess.run([smi], capture_output=True, text=True).stdout if smi else ""
    has_tpu = bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))
    requirement = accelerator_requirement(backend, jax.__version__,
                                          cuda_major_version(smi_output), has_tpu)
    mode = "device" if backend in ("gpu", "tpu") or requirement else "dry-run"
    return mode, requirement


# ------------------------------------------------------------------------------ tests
def parse_junit(xml_text: str) -> dict[str, Any]:
    """Counts (passed, failed, errors, skipped) and failed test ids of a pytest junit XML."""
    root = ET.fromstring(xml_text)
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures = []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None:
            counts["failed"] += 1
            failures.append(name)
        elif case.find("error") is not None:
            counts["errors"] += 1
            failures.append(name)
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return {**counts, "failures": failures}


def not_run(reason: str) -> dict[str, Any]:
    return {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [],
            "not_run": reason}


def run_tests(mode: str, clock: Clock) -> dict[str, Any]:
    timeout = min(TEST_TIMEOUT_S[mode], clock.remaining())
    if timeout < 30:
        return not_run(f"time budget ({clock.remaining():.0f} s left)")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        command = [sys.executable, *TEST_COMMAND, f"--junitxml={junit}"]
        try:
            done = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                                  timeout=timeout)
            result = parse_junit(junit.read_text()) if junit.exists() else {
                "passed": 0, "failed": 0, "errors": 1, "skipped": 0,
                "failures": ["pytest wrote no report"]}
            result["returncode"] = done.returncode
            result["output_tail"] = (done.stdout + done.stderr)[-3000:]
        except subprocess.TimeoutExpired:
            result = {"passed": 0, "failed": 0, "errors": 1, "skipped": 0,
                      "failures": [f"timed out after {timeout:.0f} s"]}
    result["command"] = " ".join(["python", *TEST_COMMAND])
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


# ------------------------------------------------------------------------------ benchmarks
def eviction_benchmark(mode: str, clock: Clock) -> list[dict[str, Any]]:
    """Every (batch, implementation) of EVICTION_RUNS[mode]; a row whose estimate (the last
    compile time of that implementation, or a default, + 2 s) exceeds the time left is
    skipped."""
    import eviction_bench

    shapes = eviction_bench.R1_DISTILL_QWEN_7B if mode == "device" else eviction_bench.TINY
    runs = EVICTION_RUNS[mode]
    compile_seconds: dict[tuple[str, str], float] = {}
    rows = []
    for batch in runs["batches"]:
        for implementation, matmul_dtype in runs["implementations"]:
            key = (implementation, matmul_dtype)
            entry: dict[str, Any] = {"batch": batch, "implementation": implementation,
                                     "matmul_dtype": matmul_dtype}
            estimate = compile_seconds.get(key, EVICTION_COMPILE_ESTIMATE_S[mode]) + 2.0
            left = clock.remaining()
            if estimate > left:
                entry.update(skipped="time budget", estimated_seconds=round(estimate, 1),
                             remaining_seconds=round(left, 1))
                rows.append(entry)
                clock.log(f"eviction {implementation}/{matmul_dtype} batch {batch}: skipped "
                          "(time budget)")
                continue
            try:
                row = eviction_bench.bench(shapes, implementation, batch,
                                           EVICTION_REPEATS[mode], matmul_dtype)
                entry.update({k: row[k] for k in (
                    "slots", "compile_seconds", "median_seconds", "min_seconds", "repeats",
                    "memory", "device_peak_bytes")})
                entry["ms_per_layer"] = 1e3 * row["median_seconds"]
                entry["shapes"] = row["shapes"]
                compile_seconds[key] = row["compile_seconds"]
                peak = (row["memory"] or {}).get("peak_estimate_bytes")
                done = (f"{entry['ms_per_layer']:.3f} ms per layer, compile "
                        f"{row['compile_seconds']:.1f} s, peak estimate "
                        + ("-" if peak is None else f"{peak / 2**20:.0f} MiB"))
            except Exception as error:  # a kernel that fails to compile is a result too
                entry["error"] = _describe_error(error)
                done = f"error: {entry['error'].splitlines()[-1][:200]}"
            rows.append(entry)
            clock.log(f"eviction {implementation}/{matmul_dtype} batch {batch}: {done}")
    return rows


def decode_benchmark(mode: str, clock: Clock, transformers: bool) -> dict[str, Any]:
    import decode_device_bench

    return decode_device_bench.decode_stage(mode == "dry-run", clock.remaining, clock.log,
                                            transformers=transformers)


def engine_benchmark(mode: str, clock: Clock) -> list[dict[str, Any]]:
    """The engine against static batches on the lognormal mix (two rows), or one skipped
    row when the time left is below the estimate."""
    import types

    import engine_bench

    settings = dict(ENGINE_RUNS[mode])
    estimate = settings.pop("estimate_s")
    if clock.remaining() < estimate:
        return [{"skipped": "time budget", "estimate_seconds": estimate}]
    rows = engine_bench.measure(settings.pop("shape"), "lognormal",
                                types.SimpleNamespace(**settings))
    for row in rows:
        clock.log(f"engine {row['path']}: {row['tokens_per_second']:.0f} useful tok/s, "
                  f"occupancy {row['occupancy']:.1%}, identical {row['identical_tokens']}")
    return rows


def _describe_error(error: Exception) -> str:
    lines = traceback.format_exception_only(type(error), error)
    return "".join(lines).strip()[-2000:]


# ------------------------------------------------------------------------------ targets
def verdict(value: float | None, comparison: str, threshold: float, measured: bool) -> str:
    """"pass" / "fail", or "not-measured" (no value, or a dry run's value)."""
    if value is None or not measured:
        return "not-measured"
    met = value >= threshold if comparison == ">=" else value <= threshold
    return "pass" if met else "fail"


def _ran(rows: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    return [row for row in rows if key in row]


def target_values(summary: dict[str, Any]) -> dict[str, tuple[float | None, str]]:
    """Each target's measured value and what it was measured on, from the summary's rows: the
    roofline on the smallest batch, shortest length, full; the speed ratio on the largest
    batch and length (gkv tokens/s over full's); the eviction at EVICTION_TARGET_BATCH (the
    fastest implementation)."""
    decode = _ran(summary.get("decode_benchmark", []), "tokens_per_second")
    out: dict[str, tuple[float | None, str]] = {}
    roofline = None
    if decode:
        small = min(r["batch"] for r in decode)
        short = min(r["max_new_tokens"] for r in decode)
        roofline = next((r for r in decode if r["batch"] == small and r["policy"] == "full"
                         and r["max_new_tokens"] == short), None)
    out["batch1_decode_roofline_fraction"] = (
        (roofline["roofline_fraction"], f"batch {roofline['batch']}, "
         f"{roofline['max_new_tokens']} tokens, full") if roofline else (None, "did not run"))

    ratio: tuple[float | None, str] = (None, "did not run")
    if decode:
        large = max(r["batch"] for r in decode)
        long = max(r["max_new_tokens"] for r in decode)
        pair = {r["policy"]: r for r in decode
                if r["batch"] == large and r["max_new_tokens"] == long}
        if "gkv" in pair and "full" in pair:
            ratio = (pair["gkv"]["tokens_per_second"] / pair["full"]["tokens_per_second"],
                     f"batch {large}, {long} tokens, {pair['gkv']['label']} "
                     f"({pair['gkv']['implementation']}) / full")
    out["gkv2048_over_full_speed_batch64_16k"] = ratio

    batch = EVICTION_TARGET_BATCH[summary["mode"]]
    eviction = [r for r in _ran(summary.get("eviction_benchmark", []), "ms_per_layer")
                if r["batch"] == batch]
    best = min(eviction, key=lambda r: r["ms_per_layer"], default=None)
    engine = [r for r in _ran(summary.get("engine_benchmark", []), "engine_over_static")
              if r["identical_tokens"]]
    out["engine_over_static_lognormal"] = (
        (engine[0]["engine_over_static"], f"{engine[0]['shape']}, {engine[0]['slots']} slots, "
         f"{engine[0]['requests']} requests, identical tokens") if engine
        else (None, "did not run"))
    out["eviction_ms_per_layer_batch64"] = (
        (best["ms_per_layer"], f"batch {batch}, {best['implementation']} "
         f"({best['matmul_dtype']} matmuls), fastest of "
         + ", ".join(f"{r['implementation']}/{r['matmul_dtype']} {r['ms_per_layer']:.3f}"
                     for r in eviction)) if best else (None, "did not run"))
    return out


def targets(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    measured = summary["mode"] == "device"
    values = target_values(summary)
    out = {}
    for name, (comparison, threshold) in TARGETS.items():
        value, on = values[name]
        out[name] = {"value": value, "comparison": comparison, "threshold": threshold,
                     "verdict": verdict(value, comparison, threshold, measured),
                     "measured_on": on if measured or value is None
                     else f"{on} (dry run: tiny sizes, the value only shows the code works)"}
    return out


# ------------------------------------------------------------------------------ summary
def default_output() -> Path:
    """$OUT/device_check.json when $OUT is set, else benchmarks/device_check.json."""
    out = os.environ.get("OUT")
    return Path(out) / "device_check.json" if out else REPO / "benchmarks" / "device_check.json"


def succeeded(summary: dict[str, Any]) -> bool:
    tests = summary["tests"]
    benchmarks_ok = all("error" not in row for key in ("eviction_benchmark", "decode_benchmark",
                                                       "engine_benchmark")
                        for row in summary.get(key, []))
    ran_on_device = not summary["expected_accelerator"] or (
        summary["mode"] == "device" and tests["passed"] > 0)
    return (tests["failed"] == 0 and tests["errors"] == 0 and benchmarks_ok
            and ran_on_device)


def run_stage(summary: dict[str, Any], name: str, clock: Clock,
              stage: Callable[[], Any]) -> Any:
    """Runs one stage, records its seconds in summary["stages"] and prints a line; an
    exception ends only that stage (returned as {"error": ...})."""
    start = time.perf_counter()
    try:
        result = stage()
    except Exception as error:  # the summary is written whatever a stage does
        result = {"error": _describe_error(error)}
    seconds = time.perf_counter() - start
    summary["stages"].append({"stage": name, "seconds": round(seconds, 2),
                              "ended_at_seconds": round(clock.elapsed(), 2)})
    clock.log(f"stage {name} done in {seconds:.1f} s")
    return result


def run(dry_run: bool, output: Path, installed: str | None,
        expect_accelerator: bool = False, started_at: float | None = None,
        budget_seconds: float | None = None, with_tests: bool = True,
        transformers: bool = True) -> dict[str, Any]:
    """Every stage, the targets, the summary written to `output`. `started_at` (epoch
    seconds, default now) and `budget_seconds` (default TIME_BUDGET_S[mode]) bound the run;
    `with_tests=False` leaves the pytest stage out, `transformers=False` the comparison."""
    clock_start = time.time() if started_at is None else started_at
    import jax
    import jaxlib

    backend = jax.default_backend()
    mode = "dry-run" if dry_run or backend not in ("gpu", "tpu") else "device"
    clock = Clock(clock_start, TIME_BUDGET_S[mode] if budget_seconds is None
                  else budget_seconds)
    clock.log(f"device check ({mode}): backend {backend}, {jax.devices()[0].device_kind}, "
              f"time budget {clock.budget_seconds:.0f} s")
    summary: dict[str, Any] = {
        "mode": mode, "backend": backend, "device": jax.devices()[0].device_kind,
        "device_count": jax.device_count(), "jax": jax.__version__,
        "jaxlib": jaxlib.__version__, "python": platform.python_version(),
        "host": platform.node(), "installed": installed,
        "expected_accelerator": expect_accelerator,
        "time_budget": {"budget_seconds": clock.budget_seconds,
                        "end_reserve_seconds": END_RESERVE_S,
                        "started_at": clock_start},
        "stages": [],
    }
    summary["tests"] = (run_stage(summary, "tests", clock, lambda: run_tests(mode, clock))
                        if with_tests else not_run("not requested"))
    if "error" in summary["tests"]:  # the stage itself failed
        summary["tests"] = {**not_run("stage error"), "errors": 1,
                            "failures": [summary["tests"]["error"]]}
    tests = summary["tests"]
    clock.log(f"tests: {tests['passed']} passed, {tests['failed']} failed, "
              f"{tests['errors']} errors, {tests['skipped']} skipped"
              + (f" (not run: {tests['not_run']})" if "not_run" in tests else ""))
    evictions = run_stage(summary, "eviction", clock, lambda: eviction_benchmark(mode, clock))
    summary["eviction_benchmark"] = evictions if isinstance(evictions, list) else [evictions]
    decode = run_stage(summary, "decode", clock,
                       lambda: decode_benchmark(mode, clock, transformers))
    if "error" in decode:
        decode = {"setup": None, "rows": [decode], "transformers": {"skipped": "stage error"}}
    summary["decode_setup"] = decode["setup"]
    summary["decode_benchmark"] = decode["rows"]
    summary["transformers"] = decode["transformers"]
    summary["against_reports"] = decode.get("against_reports", [])
    engine = run_stage(summary, "engine", clock, lambda: engine_benchmark(mode, clock))
    summary["engine_benchmark"] = engine if isinstance(engine, list) else [engine]
    summary["targets"] = targets(summary)
    for name, target in summary["targets"].items():
        value = target["value"]
        clock.log(f"target {name}: {'-' if value is None else f'{value:.3f}'} "
                  f"{target['comparison']} {target['threshold']}: {target['verdict']}")
    summary["seconds"] = round(clock.elapsed(), 2)
    summary["ok"] = succeeded(summary)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"written to {output}")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("plan", help="print MODE REQUIREMENT")
    run_parser = commands.add_parser("run", help="tests + benchmarks -> JSON summary")
    run_parser.add_argument("--dry-run", action="store_true",
                            help="tiny sizes (automatic without an accelerator)")
    run_parser.add_argument("--output", type=Path, default=None,
                            help="JSON summary path (default: $OUT/device_check.json, else "
                            "benchmarks/device_check.json)")
    run_parser.add_argument("--expect-accelerator", action="store_true",
                            help="fail unless JAX runs on a GPU / TPU (after an install)")
    run_parser.add_argument("--installed", default=None,
                            help="the requirement device_check.sh installed, if any")
    run_parser.add_argument("--started-at", type=float, default=None,
                            help="epoch seconds the time budget counts from (default: now)")
    run_parser.add_argument("--budget-seconds", type=float, default=None,
                            help=f"time budget (default: {TIME_BUDGET_S['device']:.0f} s on a "
                            f"device, {TIME_BUDGET_S['dry-run']:.0f} s in the dry run)")
    run_parser.add_argument("--skip-tests", action="store_true",
                            help="leave out the pytest stage")
    run_parser.add_argument("--no-transformers", action="store_true",
                            help="leave out the transformers comparison")
    args = parser.parse_args(argv)
    if args.command == "plan":
        mode, requirement = plan()
        print(mode, requirement or "-")
        return 0
    if args.budget_seconds is not None and args.budget_seconds <= 0:
        parser.error(f"--budget-seconds must be > 0, got {args.budget_seconds}")
    installed = None if args.installed in (None, "", "-") else args.installed
    summary = run(args.dry_run, args.output or default_output(), installed,
                  args.expect_accelerator, args.started_at, args.budget_seconds,
                  not args.skip_tests, not args.no_transformers)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
