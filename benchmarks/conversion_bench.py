"""Checkpoint loading: `gkv_jax.conversion.from_hf` vs `transformers` `from_pretrained`.

Writes a synthetic Hugging Face checkpoint with the exact tensor names and shapes of a preset
(random bfloat16 weights, `config.json` + sharded safetensors with an index), then loads it in
fresh subprocesses so that each loader's peak host RSS is isolated:

  baseline      imports jax, gkv_jax, torch and transformers, loads nothing
  ours          `from_hf(dir, dtype="bfloat16")`, blocked until every array is ready
  transformers  `AutoModelForCausalLM.from_pretrained(dir, dtype=torch.bfloat16)`
  transformers+read  the same, then every weight is read once (`p.max()`): transformers
                keeps bf16 weights as lazy views of the memory-mapped files, so without
                a read most of the checkpoint is never resident
  orbax         `load_checkpoint(DIR-orbax)`: the fast reload of a model converted once
                and saved with `save_checkpoint` (written by a child before the runs)
  ours-stages   `from_hf`'s two stages run one by one, each with its own peak RSS

Every child imports the same libraries, then reports its wall time and peak RSS
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`) after the imports and at the end. The parent
only uses the standard library (the checkpoint is written by a child too): on Linux a child's
ru_maxrss starts at its parent's peak RSS at spawn time, which would otherwise leak in. The
files are read once before the measurements so that every loader reads from the page cache.

Usage:
  python benchmarks/conversion_bench.py [--preset NAME] [--workdir DIR] [--shards 2]
      [--repeats 1] [--results FILE.jsonl] [--keep] [--num-layers N]
  python benchmarks/conversion_bench.py --report FILE.jsonl   (re-render recorded runs)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

DEFAULT_PRESET = "deepseek-r1-distill-qwen-1.5b"
GB = 1e9  # decimal gigabytes throughout
LOADERS = ("baseline", "ours", "transformers", "transformers+read", "orbax")
ORBAX_SUFFIX = "-orbax"  # the Orbax copy of the checkpoint: a sibling directory


# ---------------------------------------------------------------------------- memory
def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> None:
    """Resets the kernel's peak-RSS mark to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def current_rss_bytes() -> dict[str, int]:
    """Current RSS, split into anonymous and file-backed pages, from /proc/self/status."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


# ---------------------------------------------------------------------------- checkpoint
def bench_config(preset_name: str, num_layers: int | None):
    """The preset's `ModelConfig`, optionally with another depth."""
    from gkv_jax.models.config import preset

    config = preset(preset_name)
    return config.replace(num_layers=num_layers) if num_layers else config


def hf_tensor_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name of `config`'s checkpoint and its shape, in checkpoint order.

    Read from the conversion table itself, so the checkpoint is exactly what `from_hf` expects.
    """
    from gkv_jax.conversion.rules import GLOBAL_RULES, LAYER_RULES

    head = [r for r in GLOBAL_RULES if r.when(config) and r.hf_suffix == "lm_head.weight"]
    shapes = {r.hf_suffix: r.hf_shape(config) for r in GLOBAL_RULES
              if r.when(config) and r not in head}
    for i in range(config.num_layers):
        for rule in LAYER_RULES:
            if rule.when(config):
                shapes[f"model.layers.{i}.{rule.hf_suffix}"] = rule.hf_shape(config)
    shapes.update({r.hf_suffix: r.hf_shape(config) for r in head})  # last, as in real ones
    return shapes


def random_bf16(name: str, shape: tuple[int, ...], rng):
    """A random bfloat16 tensor: norms 1, matrices and biases ~ N(0, 0.02)."""
    import ml_dtypes
    import numpy as np

    if name.endswith("norm.weight"):
        return np.ones(shape, ml_dtypes.bfloat16)
    values = rng.standard_normal(shape, dtype=np.float32)
    values *= 0.02
    return values.astype(ml_dtypes.bfloat16)


def split_into_shards(shapes: dict[str, tuple[int, ...]], num_shards: int) -> list[list[str]]:
    """Consecutive groups of tensor names with roughly equal byte counts."""
    import math

    sizes = {name: 2 * math.prod(shape) for name, shape in shapes.items()}
    target = sum(sizes.values()) / num_shards
    shards: list[list[str]] = [[]]
    filled = 0
    for name, size in sizes.items():
        if shards[-1] and filled + size > target and len(shards) < num_shards:
            shards.append([])
            filled = 0
        shards[-1].append(name)
        filled += size
    return shards


def write_checkpoint(config, directory: str, num_shards: int, seed: int = 0) -> int:
    """Writes `config.json`, the shards and `model.safetensors.index.json`; returns bytes.

    Only one shard's tensors are in memory at a time.
    """
    import numpy as np
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    hf_config = config.to_hf_dict()
    hf_config["torch_dtype"] = "bfloat16"
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    shapes = hf_tensor_shapes(config)
    groups = split_into_shards(shapes, num_shards)
    rng = np.random.default_rng(seed)
    weight_map, total = {}, 0
    for i, names in enumerate(groups):
        file_name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: random_bf16(name, shapes[name], rng) for name in names}
        total += sum(t.nbytes for t in tensors.values())
        save_file(tensors, os.path.join(directory, file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file_name))
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
    return total


def directory_bytes(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))


def warm_page_cache(directory: str) -> None:
    """Reads every file once so that no loader pays the first read from disk."""
    buffer = bytearray(8 * 1024 * 1024)
    for root, _, names in os.walk(directory):
        for name in sorted(names):
            with open(os.path.join(root, name), "rb", buffering=0) as f:
                while f.readinto(buffer):
                    pass


# ---------------------------------------------------------------------------- children
def import_everything() -> None:
    """The libraries every loading child imports, so that their baselines are comparable."""
    import jax  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import gkv_jax.conversion  # noqa: F401


def load_ours(directory: str):
    import jax

    from gkv_jax.conversion import from_hf

    model = from_hf(directory, dtype="bfloat16")
    jax.block_until_ready(model.params())
    return model


def load_orbax(directory: str):
    import jax

    from gkv_jax.conversion import load_checkpoint

    model = load_checkpoint(directory + ORBAX_SUFFIX)
    jax.block_until_ready(model.params())
    return model


def write_orbax_child(directory: str) -> dict[str, Any]:
    """Converts the checkpoint once and saves it with Orbax, next to it."""
    from gkv_jax.conversion import from_hf, save_checkpoint

    start = time.perf_counter()
    save_checkpoint(from_hf(directory, dtype="bfloat16", progress=False),
                    directory + ORBAX_SUFFIX)
    return {"seconds": time.perf_counter() - start}


def load_transformers(directory: str, read_weights: bool = False):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    if read_weights:
        with torch.no_grad():
            for param in model.parameters():
                param.max()
    return model


def load_ours_by_stage(directory: str) -> dict[str, dict[str, Any]]:
    """`from_hf`'s stages one by one, the peak-RSS mark reset before each (diagnosis only:
    uses the stage functions `from_hf` is made of)."""
    import jax

    from gkv_jax.conversion import hf, source

    stages = {}
    reset_peak_rss()
    start = time.perf_counter()
    config, tensors = source._open_source(directory)
    weights = hf.convert_weights(config, tensors, "bfloat16")
    stages["convert_weights: safetensors -> stacked numpy"] = _stage(start)
    reset_peak_rss()
    start = time.perf_counter()
    model = hf.model_from_weights(config, weights, "bfloat16")
    jax.block_until_ready(model.params())
    stages["model_from_weights: numpy -> jax arrays"] = _stage(start)
    reset_peak_rss()
    start = time.perf_counter()
    del weights
    stages["then `del` the numpy weights"] = _stage(start)
    reset_peak_rss()
    start = time.perf_counter()
    gc.collect()  # jaxlib drops its references to transferred host buffers at a gc pass
    stages["then `gc.collect()`"] = _stage(start)
    del model
    return stages


def _stage(start: float) -> dict[str, Any]:
    return {"seconds": time.perf_counter() - start, "peak_rss": peak_rss_bytes(),
            **current_rss_bytes()}


def write_child(args: argparse.Namespace) -> dict[str, Any]:
    config = bench_config(args.preset, args.num_layers)
    start = time.perf_counter()
    total = write_checkpoint(config, args.workdir, args.shards)
    return {"seconds": time.perf_counter() - start, "tensor_bytes": total,
            "num_parameters": config.num_parameters()}


def load_child(loader: str, directory: str) -> dict[str, Any]:
    """Body of a loading child: imports, loads, measures."""
    start = time.perf_counter()
    import_everything()
    import_seconds = time.perf_counter() - start
    import_peak = peak_rss_bytes()
    start = time.perf_counter()
    stages, model = None, None  # the model stays alive until RSS at exit is read
    if loader == "ours":
        model = load_ours(directory)
    elif loader == "transformers":
        model = load_transformers(directory)
    elif loader == "transformers+read":
        model = load_transformers(directory, read_weights=True)
    elif loader == "orbax":
        model = load_orbax(directory)
    elif loader == "ours-stages":
        stages = load_ours_by_stage(directory)
    load_seconds = time.perf_counter() - start
    assert loader in ("baseline", "ours-stages") or model is not None
    return {"loader": loader, "import_seconds": import_seconds, "load_seconds": load_seconds,
            "import_peak_rss": import_peak, "peak_rss": peak_rss_bytes(),
            "end_rss": current_rss_bytes(), "stages": stages}


def spawn_child(mode: str, args: argparse.Namespace, directory: str) -> dict[str, Any]:
    """Runs this script with `--child mode` in a fresh interpreter; returns its result."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, os.path.abspath(__file__), "--child", mode, "--workdir",
               directory, "--preset", args.preset, "--shards", str(args.shards)]
    if args.num_layers:
        command += ["--num-layers", str(args.num_layers)]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"child {mode!r} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")


# ---------------------------------------------------------------------------- report
def summarise(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Medians over the repeats of one loader, memory in GB."""
    def median(value):
        return statistics.median(value(r) for r in runs)

    return {"load_seconds": median(lambda r: r["load_seconds"]),
            "peak_rss_gb": median(lambda r: r["peak_rss"] / GB),
            "above_imports_gb": median(lambda r: (r["peak_rss"] - r["import_peak_rss"]) / GB),
            "end_rss_gb": median(lambda r: r["end_rss"]["VmRSS"] / GB),
            "end_anon_gb": median(lambda r: r["end_rss"]["RssAnon"] / GB),
            "end_file_gb": median(lambda r: r["end_rss"]["RssFile"] / GB)}


LOADER_NAMES = {
    "baseline": "baseline child (imports only)",
    "ours": '`from_hf(dir, dtype="bfloat16")`',
    "transformers": "`AutoModelForCausalLM.from_pretrained(dir, dtype=torch.bfloat16)`",
    "transformers+read": "the same, then read every weight once",
    "orbax": "`load_checkpoint(dir)` of the same model saved with Orbax",
}


def markdown_table(summary: dict[str, dict[str, float]], checkpoint_bytes: int) -> str:
    baseline_gb = summary["baseline"]["peak_rss_gb"]
    rows = ["| loader | wall time (s) | s per GB | peak RSS (GB) | peak above baseline child "
            "(GB) | RSS after load, model alive (GB) | of which anonymous / file-backed (GB) |",
            "|---|---:|---:|---:|---:|---:|---|"]
    for loader in LOADERS:
        s = summary[loader]
        seconds = "-" if loader == "baseline" else f"{s['load_seconds']:.2f}"
        per_gb = ("-" if loader == "baseline"
                  else f"{s['load_seconds'] / (checkpoint_bytes / GB):.2f}")
        rows.append(f"| {LOADER_NAMES[loader]} | {seconds} | {per_gb} | "
                    f"{s['peak_rss_gb']:.2f} | {s['peak_rss_gb'] - baseline_gb:.2f} | "
                    f"{s['end_rss_gb']:.2f} | {s['end_anon_gb']:.2f} / {s['end_file_gb']:.2f} |")
    return "\n".join(rows)


def ratio_line(summary: dict[str, dict[str, float]], theirs_name: str) -> str:
    ours, theirs = summary["ours"], summary[theirs_name]
    baseline_gb = summary["baseline"]["peak_rss_gb"]
    time_ratio = ours["load_seconds"] / theirs["load_seconds"]
    mem_ratio = (ours["peak_rss_gb"] - baseline_gb) / (theirs["peak_rss_gb"] - baseline_gb)
    return (f"ours / {theirs_name}: wall time {time_ratio:.2f}x, "
            f"peak RSS above baseline {mem_ratio:.2f}x")


def stages_table(stages: dict[str, dict[str, Any]]) -> str:
    rows = ["| `from_hf` stage (peak mark reset before each) | seconds | peak RSS in stage (GB) "
            "| RSS after (GB) | anonymous (GB) | file-backed (GB) |",
            "|---|---:|---:|---:|---:|---:|"]
    for name, s in stages.items():
        rows.append(f"| {name} | {s['seconds']:.2f} | {s['peak_rss'] / GB:.2f} | "
                    f"{s['VmRSS'] / GB:.2f} | {s['RssAnon'] / GB:.2f} | "
                    f"{s['RssFile'] / GB:.2f} |")
    return "\n".join(rows)


# ---------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default=DEFAULT_PRESET)
    parser.add_argument("--num-layers", type=int, default=None,
                        help="override the preset's depth (quick smoke runs)")
    parser.add_argument("--workdir", default=None,
                        help="checkpoint directory (default: a new temporary directory); "
                             "an existing checkpoint there is reused and kept")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1,
                        help="children per loader; the table shows medians")
    parser.add_argument("--no-stages", action="store_true",
                        help="skip the per-stage breakdown of from_hf")
    parser.add_argument("--results", default=None, help="append a JSON line to this file")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    parser.add_argument("--report", default=None, metavar="FILE.jsonl",
                        help="only re-render the runs recorded in this --results file")
    parser.add_argument("--child", choices=("write", "write-orbax", *LOADERS, "ours-stages"),
                        help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def measure(args: argparse.Namespace, directory: str) -> dict[str, Any]:
    """Writes the checkpoint if needed, then runs every child; returns the raw results."""
    record: dict[str, Any] = {"write": None}
    if not os.path.exists(os.path.join(directory, "config.json")):
        record["write"] = spawn_child("write", args, directory)
        print(f"wrote the synthetic checkpoint in {record['write']['seconds']:.1f} s")
    record["checkpoint_bytes"] = directory_bytes(directory)
    if not os.path.exists(directory + ORBAX_SUFFIX):
        record["write_orbax"] = spawn_child("write-orbax", args, directory)
    warm_page_cache(directory)
    warm_page_cache(directory + ORBAX_SUFFIX)
    record["parent_peak_rss"] = peak_rss_bytes()
    runs: dict[str, list[dict[str, Any]]] = {loader: [] for loader in LOADERS}
    for _ in range(args.repeats):
        for loader in LOADERS:
            runs[loader].append(spawn_child(loader, args, directory))
    record["runs"] = runs
    record["stages"] = (None if args.no_stages
                        else spawn_child("ours-stages", args, directory)["stages"])
    return record


def report(args: argparse.Namespace, record: dict[str, Any]) -> None:
    print_report(args.preset, args.num_layers, args.shards, args.repeats, record)
    if args.results:
        out = {"bench": "conversion", "preset": args.preset, "num_layers": args.num_layers,
               "shards": args.shards, "repeats": args.repeats, "host": platform.node(),
               **record}
        with open(args.results, "a") as f:
            f.write(json.dumps(out) + "\n")


def print_report(preset_name: str, num_layers: int | None, shards: int, repeats: int,
                 record: dict[str, Any]) -> None:
    """The tables and ratios of one run (also re-rendered from `--results` lines)."""
    summary = {loader: summarise(r) for loader, r in record["runs"].items()}
    record["summary"] = summary
    size = record["checkpoint_bytes"]
    depth = f" with num_layers={num_layers}" if num_layers else ""
    params = (f"{record['write']['num_parameters'] / 1e9:.3f} B parameters, "
              if record.get("write") else "")
    print(f"\nPreset `{preset_name}`{depth}: {params}checkpoint {size / GB:.2f} GB on disk "
          f"({size / 1024**3:.2f} GiB) in {shards} shards. Median of {repeats} "
          f"fresh child process(es) per loader, files in the page cache; parent peak RSS "
          f"{record['parent_peak_rss'] / GB:.2f} GB.\n")
    print(markdown_table(summary, size))
    print()
    for theirs_name in ("transformers", "transformers+read"):
        print(ratio_line(summary, theirs_name))
    above = summary["ours"]["peak_rss_gb"] - summary["baseline"]["peak_rss_gb"]
    print(f"ours: peak RSS above baseline / checkpoint bytes {above / (size / GB):.2f}x "
          "(goal <= 1.15x); wall time goal <= 1.0x transformers+read")
    orbax_ratio = summary["orbax"]["load_seconds"] / summary["ours"]["load_seconds"]
    print(f"orbax reload / from_hf: wall time {orbax_ratio:.2f}x (goal <= 0.5x)")
    if record.get("stages"):
        print("\n" + stages_table(record["stages"]))


def report_file(path: str) -> None:
    """Re-renders every conversion run recorded in a `--results` file."""
    with open(path) as f:
        for line in f:
            run = json.loads(line)
            if run.get("bench") == "conversion":
                print_report(run["preset"], run["num_layers"], run["shards"], run["repeats"],
                             run)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.report:
        report_file(args.report)
        return
    if args.child:
        if args.child == "write":
            result = write_child(args)
        elif args.child == "write-orbax":
            result = write_orbax_child(args.workdir)
        else:
            result = load_child(args.child, args.workdir)
        print("RESULT " + json.dumps(result))
        return
    directory = args.workdir or tempfile.mkdtemp(prefix="conversion_bench_")
    created = not os.path.exists(os.path.join(directory, "config.json"))
    try:
        record = measure(args, directory)
    finally:
        if created and not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
            shutil.rmtree(directory + ORBAX_SUFFIX, ignore_errors=True)
    report(args, record)


if __name__ == "__main__":
    main()
