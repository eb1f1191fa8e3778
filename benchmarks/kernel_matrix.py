"""The eviction kernels compiled for every TPU chip kind, without the chips (libtpu on the
host): one layer's compression (`decode.compress_layer`: the score-update, redundancy and
top-k kernels, then the compaction kernel) at the head layouts of R1-Distill-Qwen-1.5B/7B,
Llama-8B and Qwen-32B, budgets 512 to 4,096, batch 1 to 128, bfloat16 and float32 caches.

Each cell is compiled by `gkv_jax.targets.compile_for(..., program="compress_layer")` for one
chip of v4, v5e, v5p and v6e; a cell the compiler refuses is printed with its message (and
the script exits 1). Compile seconds are this host's; nothing ran on a chip.

Usage:
  python benchmarks/kernel_matrix.py                 # the whole matrix (about an hour)
  python benchmarks/kernel_matrix.py --corners       # 32 cells (about 15 minutes)
  python benchmarks/kernel_matrix.py --quick         # one cell per chip
  python benchmarks/kernel_matrix.py --json benchmarks/results.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time

from gkv_jax import EvictionConfig
from gkv_jax.models import ModelConfig, preset
from gkv_jax.targets import compile_for

CHIP_TARGETS = ("v5e-1", "v6e-1", "v5p-8", "v4-8")  # one device of each kind
LAYOUTS = {  # name: the config whose head layout (N, K, H) the kernels see
    "r1-qwen-1.5b": preset("deepseek-r1-distill-qwen-1.5b"),
    "r1-qwen-7b": preset("deepseek-r1-distill-qwen-7b"),
    "llama-8b": preset("deepseek-r1-distill-llama-8b"),
    "qwen-32b": dataclasses.replace(preset("deepseek-r1-distill-qwen-7b"), num_heads=40,
                                    num_kv_heads=8, head_dim=128, hidden_size=5120),
}
BUDGETS = (512, 4096)
BATCHES = (1, 128)
DTYPES = ("bfloat16", "float32")
# --corners: the smallest and the largest cell of each chip and layout (what the recorded
# run compiles: the whole product takes about an hour on 2 cores).
CORNERS = ((512, 1, "float32"), (4096, 128, "bfloat16"))


def cells(quick: bool, corners: bool = False):
    if quick:
        return [(t, "r1-qwen-7b", 4096, 128, "bfloat16") for t in CHIP_TARGETS]
    if corners:
        return [(t, layout, *corner) for t in CHIP_TARGETS for layout in LAYOUTS
                for corner in CORNERS]
    return list(itertools.product(CHIP_TARGETS, LAYOUTS, BUDGETS, BATCHES, DTYPES))


def compile_cell(target: str, layout: str, budget: int, batch: int, dtype: str) -> dict:
    config: ModelConfig = LAYOUTS[layout]
    eviction = EvictionConfig("gkv", budget=budget, implementation="pallas")
    start = time.perf_counter()
    report = compile_for(target, config, batch=batch, prompt_length=1, max_new_tokens=1,
                         eviction=eviction, dtype=dtype, program="compress_layer", cost=False)
    return dict(target=target, chip=report.chip, layout=layout,
                heads=f"{config.num_heads}/{config.num_kv_heads}/{config.head_dim}",
                budget=budget, batch=batch, dtype=dtype, compiled=report.compiled,
                error=report.error, kernels=list(report.kernels),
                per_device_bytes=report.total_bytes,
                compile_seconds=round(time.perf_counter() - start, 2))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one cell per chip")
    parser.add_argument("--corners", action="store_true",
                        help="the smallest and largest cell of each chip and layout")
    parser.add_argument("--json", default=None, help="append the cells to this JSON-lines file")
    args = parser.parse_args(argv)
    rows = []
    print("| chip | layout N/K/H | budget | batch | cache dtype | compiled | kernels | "
          "per device MiB | compile s |")
    print("|---|---|---:|---:|---|---|---|---:|---:|")
    for cell in cells(args.quick, args.corners):
        row = compile_cell(*cell)
        rows.append(row)
        status = "yes" if row["compiled"] else f"NO: {row['error'][:120]}"
        print(f"| {row['chip']} | {row['layout']} {row['heads']} | {row['budget']} | "
              f"{row['batch']} | {row['dtype']} | {status} | {len(row['kernels'])} | "
              f"{row['per_device_bytes'] / 2**20:.0f} | {row['compile_seconds']} |",
              flush=True)
    failed = [r for r in rows if not r["compiled"]]
    print(f"{len(rows) - len(failed)} of {len(rows)} cells compiled; "
          f"{sum(r['compile_seconds'] for r in rows):.0f} s of compiling")
    if args.json:
        with open(args.json, "a") as f:
            for row in rows:
                f.write(json.dumps({"bench": "kernel_matrix", **row}) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
