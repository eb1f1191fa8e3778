"""The accelerator verification of the eviction kernels, as one JSON summary.

Called by `benchmarks/device_check.sh` (which installs what is missing first); two commands:

  plan   prints "MODE REQUIREMENT": MODE is "device" when JAX sees (or, once REQUIREMENT is
         installed, will see) a GPU or TPU, else "dry-run"; REQUIREMENT is the pip
         requirement of the accelerator's jaxlib at the installed JAX version ("-": none).
  run    the `gpu` / `tpu`-marked tests (`pytest -m "gpu or tpu" tests/pallas_kernels`),
         the eviction benchmark (`eviction_bench.py`: XLA vs Pallas, one layer at
         R1-Distill-Qwen-7B shapes) and the decode benchmark (`generate_bench.py`: `generate`
         with the XLA reference and with the kernels), then writes the summary to --output
         and prints it. `--dry-run` (automatic without an accelerator) runs the same steps at
         tiny sizes; its numbers only show that the steps work.

Exit status of `run`: 0 when every step succeeded (on a device: at least one accelerator
test ran and none failed), 1 otherwise; the summary is written either way.
"""

from __future__ import annotations

import argparse
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
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

TEST_COMMAND = ("-m", "pytest", "-m", "gpu or tpu", "tests/pallas_kernels", "-q",
                "-p", "no:cacheprovider")
TEST_TIMEOUT_S = {"device": 300, "dry-run": 120}
# Sizes: on a device, minutes in all on one H100; in the dry run, seconds on CPU.
EVICTION_RUNS = {  # (batch, implementation, matmul_dtype)
    "device": [(b, i, d) for b in (1, 16) for i, d in
               (("xla", "float32"), ("pallas", "float32"), ("pallas", "bfloat16"))],
    "dry-run": [(1, "xla", "float32"), (1, "pallas", "float32")],
}
EVICTION_REPEATS = {"device": 5, "dry-run": 1}
DECODE = {
    "device": dict(preset="deepseek-r1-distill-qwen-1.5b", overrides=["num_layers=4"],
                   dtype="bfloat16", batch=8, prompt_length=128, max_new_tokens=1024,
                   budget=512, window=16, divide_length=128),
    "dry-run": dict(preset=None, overrides=["num_layers=1", "hidden_size=128",
                                            "intermediate_size=256", "vocab_size=256"],
                    dtype="float32", batch=2, prompt_length=16, max_new_tokens=48,
                    budget=32, window=16, divide_length=16),
}


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


def run_tests(mode: str) -> dict[str, Any]:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        command = [sys.executable, *TEST_COMMAND, f"--junitxml={junit}"]
        try:
            done = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                                  timeout=TEST_TIMEOUT_S[mode])
            result = parse_junit(junit.read_text()) if junit.exists() else {
                "passed": 0, "failed": 0, "errors": 1, "skipped": 0,
                "failures": ["pytest wrote no report"]}
            result["returncode"] = done.returncode
            result["output_tail"] = (done.stdout + done.stderr)[-3000:]
        except subprocess.TimeoutExpired:
            result = {"passed": 0, "failed": 0, "errors": 1, "skipped": 0,
                      "failures": [f"timed out after {TEST_TIMEOUT_S[mode]} s"]}
    result["command"] = " ".join(["python", *TEST_COMMAND])
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


# ------------------------------------------------------------------------------ benchmarks
def eviction_benchmark(mode: str) -> list[dict[str, Any]]:
    import eviction_bench

    shapes = eviction_bench.R1_DISTILL_QWEN_7B if mode == "device" else eviction_bench.TINY
    rows = []
    for batch, implementation, matmul_dtype in EVICTION_RUNS[mode]:
        entry = {"batch": batch, "implementation": implementation,
                 "matmul_dtype": matmul_dtype}
        try:
            row = eviction_bench.bench(shapes, implementation, batch, EVICTION_REPEATS[mode],
                                       matmul_dtype)
            entry.update({k: row[k] for k in ("slots", "compile_seconds", "median_seconds",
                                              "min_seconds", "memory", "device_peak_bytes")})
            entry["shapes"] = row["shapes"]
        except Exception as error:  # a kernel that fails to compile is a result too
            entry["error"] = _describe_error(error)
        rows.append(entry)
        print(f"eviction {implementation}/{matmul_dtype} batch {batch}: "
              f"{entry.get('median_seconds', entry.get('error'))}", flush=True)
    return rows


def decode_benchmark(mode: str) -> list[dict[str, Any]]:
    import generate_bench
    import jax.numpy as jnp
    from flax import nnx

    from gkv_jax.eviction import EvictionConfig
    from gkv_jax.models import Transformer

    size = DECODE[mode]
    name, config = generate_bench.build_config(size["preset"], size["overrides"])
    model = Transformer(config, dtype=getattr(jnp, size["dtype"]), rngs=nnx.Rngs(0))
    prompts = generate_bench.random_prompts(config, size["batch"], size["prompt_length"], 0)
    itemsize = jnp.dtype(size["dtype"]).itemsize
    rows = []
    for implementation in ("xla", "pallas"):
        eviction = EvictionConfig("gkv", budget=size["budget"], window=size["window"],
                                  divide_length=size["divide_length"],
                                  implementation=implementation)
        run = generate_bench.Run(size["batch"], size["max_new_tokens"], eviction)
        entry = {"model": name, "dtype": size["dtype"], "implementation": implementation,
                 "eviction": eviction.describe(), "batch": size["batch"],
                 "prompt_length": size["prompt_length"],
                 "max_new_tokens": size["max_new_tokens"]}
        try:
            calls = generate_bench.measure(model, run, prompts)
            row = generate_bench.row(config, itemsize, run, size["prompt_length"], calls, None)
            entry.update({k: row[k] for k in (
                "tokens_per_second", "step_seconds", "run_seconds",
                "compile_seconds_first_call", "compressions", "cache_bytes")})
        except Exception as error:
            entry["error"] = _describe_error(error)
        rows.append(entry)
        print(f"decode {implementation}: {entry.get('tokens_per_second', entry.get('error'))}",
              flush=True)
    return rows


def _describe_error(error: Exception) -> str:
    lines = traceback.format_exception_only(type(error), error)
    return "".join(lines).strip()[-2000:]


# ------------------------------------------------------------------------------ summary
def default_output() -> Path:
    """$OUT/device_check.json when $OUT is set, else benchmarks/device_check.json."""
    out = os.environ.get("OUT")
    return Path(out) / "device_check.json" if out else REPO / "benchmarks" / "device_check.json"


def succeeded(summary: dict[str, Any]) -> bool:
    tests = summary["tests"]
    benchmarks_ok = all("error" not in row for key in ("eviction_benchmark", "decode_benchmark")
                        for row in summary[key])
    ran_on_device = not summary["expected_accelerator"] or (
        summary["mode"] == "device" and tests["passed"] > 0)
    return (tests["failed"] == 0 and tests["errors"] == 0 and benchmarks_ok
            and ran_on_device)


def run(dry_run: bool, output: Path, installed: str | None,
        expect_accelerator: bool = False) -> dict[str, Any]:
    start = time.perf_counter()
    import jax
    import jaxlib

    backend = jax.default_backend()
    mode = "dry-run" if dry_run or backend not in ("gpu", "tpu") else "device"
    print(f"device check ({mode}): backend {backend}, {jax.devices()[0].device_kind}",
          flush=True)
    summary: dict[str, Any] = {
        "mode": mode, "backend": backend, "device": jax.devices()[0].device_kind,
        "device_count": jax.device_count(), "jax": jax.__version__,
        "jaxlib": jaxlib.__version__, "python": platform.python_version(),
        "host": platform.node(), "installed": installed,
        "expected_accelerator": expect_accelerator,
    }
    summary["tests"] = run_tests(mode)
    print(f"tests: {summary['tests']['passed']} passed, {summary['tests']['failed']} failed, "
          f"{summary['tests']['errors']} errors, {summary['tests']['skipped']} skipped",
          flush=True)
    summary["eviction_benchmark"] = eviction_benchmark(mode)
    summary["decode_benchmark"] = decode_benchmark(mode)
    summary["seconds"] = round(time.perf_counter() - start, 2)
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
    args = parser.parse_args(argv)
    if args.command == "plan":
        mode, requirement = plan()
        print(mode, requirement or "-")
        return 0
    installed = None if args.installed in (None, "", "-") else args.installed
    summary = run(args.dry_run, args.output or default_output(), installed,
                  args.expect_accelerator)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
