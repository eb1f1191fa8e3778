"""One layer's eviction at DeepSeek-R1-Distill-Qwen-7B shapes: Pallas kernels vs XLA reference.

Shapes: N = 28 query heads, K = 4 KV heads, H = 128, budget 2048, divide_length 128 (so
S = 2176 slots at a compression), W = 16, policy gkv, bfloat16 cache; batch 1, 16, 64, 128.
One eviction is what `gkv_jax.decode.evict` does for a layer: `select` (score update,
redundancy, top-k) then the compaction of keys, values, positions and global score, in one
jitted function with the four cache arrays donated (so an in-place compaction can reuse them).

  * xla:    `gkv_jax.eviction.select(implementation="xla")` + `topk_retention.compact` (XLA).
  * pallas: `gkv_jax.eviction.select_with_ops` + `topk_retention.compact` (Pallas), with
            `--matmul-dtype` float32 (exact, the default) or bfloat16.

Reported per (implementation, batch): the median wall time of one eviction over `--repeats`
calls (each call compacts the previous call's output, so donation is real), the compiled
program's memory analysis (arguments, outputs, aliased bytes, temporaries; peak estimate =
arguments + outputs - aliased + temporaries) and, where the backend reports it, the device's
`peak_bytes_in_use` high-water mark (process-wide: configurations run from the smallest).

Run it on a TPU (Mosaic TPU kernels) or a Hopper GPU (Mosaic GPU kernels: `pallas` forces
them there). On CPU the Pallas path runs in TPU interpret mode,
which only shows that the script works: use `--tiny` there, and do not read its numbers as
the benchmark's answer.

Usage:
  python benchmarks/eviction_bench.py [--batches 1 16 64 128] [--repeats 10]
      [--implementations xla pallas] [--matmul-dtype float32] [--tiny] [--results FILE.jsonl]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import platform
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gkv_jax import eviction
from gkv_jax.pallas_kernels import Ops
from gkv_jax.pallas_kernels.topk_retention import compact


@dataclasses.dataclass(frozen=True)
class Shapes:
    query_heads: int = 28
    kv_heads: int = 4
    head_dim: int = 128
    budget: int = 2048
    divide_length: int = 128
    window: int = 16

    @property
    def slots(self) -> int:
        return self.budget + self.divide_length


R1_DISTILL_QWEN_7B = Shapes()
TINY = Shapes(query_heads=4, kv_heads=2, head_dim=64, budget=112, divide_length=16, window=16)


def one_eviction(cfg: eviction.EvictionConfig, implementation: str, matmul_dtype: str,
                 queries, keys, values, positions, global_score):
    """select + compact of one layer, as gkv_jax.decode.evict does it."""
    valid = positions[:, 0, :] >= 0
    history = global_score[:, :, : cfg.kept_scored]
    if implementation == "xla":
        kept, new_score = eviction.select(dataclasses.replace(cfg, implementation="xla"),
                                          queries, keys, valid, history)
    else:
        kept, new_score = eviction.select_with_ops(
            cfg, Ops.resolve("pallas", matmul_dtype=matmul_dtype), queries, keys, valid,
            history)
    return compact(keys, values, positions, global_score, kept, window=cfg.window,
                   new_score=new_score, implementation=implementation)


def make_layer(shapes: Shapes, batch: int, seed: int = 0):
    """A full layer at a compression step: clustered bfloat16 keys (realistic near-duplicates),
    a carried global score on the first budget - W slots."""
    rng = np.random.default_rng(seed)
    B, K, S, H = batch, shapes.kv_heads, shapes.slots, shapes.head_dim
    centres = rng.normal(size=(K, 64, H)).astype(np.float32) * 2.0
    choice = rng.integers(0, 64, size=(B, K, S))
    keys = centres[np.arange(K)[None, :, None], choice]
    keys += rng.normal(size=keys.shape).astype(np.float32) * 0.7
    values = rng.normal(size=(B, K, S, H)).astype(np.float32)
    queries = rng.normal(size=(B, shapes.query_heads, shapes.window, H)).astype(np.float32)
    positions = np.broadcast_to(np.arange(S, dtype=np.int32), (B, K, S))
    score = np.full((B, K, S), np.nan, np.float32)
    score[:, :, : shapes.budget - shapes.window] = rng.uniform(
        size=(B, K, shapes.budget - shapes.window))
    return (jnp.asarray(queries, jnp.bfloat16), jnp.asarray(keys, jnp.bfloat16),
            jnp.asarray(values, jnp.bfloat16), jnp.asarray(positions), jnp.asarray(score))


def memory_analysis(compiled) -> dict[str, int] | None:
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
              "temp_size_in_bytes")
    out = {f: int(getattr(analysis, f, 0) or 0) for f in fields}
    out["peak_estimate_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                                  - out["alias_size_in_bytes"] + out["temp_size_in_bytes"])
    return out


def device_peak() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def bench(shapes: Shapes, implementation: str, batch: int, repeats: int,
          matmul_dtype: str) -> dict[str, Any]:
    cfg = eviction.EvictionConfig("gkv", budget=shapes.budget, window=shapes.window,
                                  divide_length=shapes.divide_length)
    step = jax.jit(functools.partial(one_eviction, cfg, implementation, matmul_dtype),
                   donate_argnums=(1, 2, 3, 4))
    queries, *cache = make_layer(shapes, batch)
    start = time.perf_counter()
    compiled = step.lower(queries, *cache).compile()
    compile_seconds = time.perf_counter() - start
    cache = jax.block_until_ready(compiled(queries, *cache))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        cache = jax.block_until_ready(compiled(queries, *cache))
        times.append(time.perf_counter() - start)
    return {"bench": "eviction", "implementation": implementation,
            "matmul_dtype": matmul_dtype if implementation == "pallas" else "float32",
            "batch": batch, "shapes": dataclasses.asdict(shapes), "slots": shapes.slots,
            "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
            "host": platform.node(), "jax": jax.__version__,
            "compile_seconds": compile_seconds, "median_seconds": statistics.median(times),
            "min_seconds": min(times), "repeats": repeats,
            "memory": memory_analysis(compiled), "device_peak_bytes": device_peak()}


def _mib(x) -> str:
    return "-" if x is None else f"{x / 2**20:.1f}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| implementation | batch | median (ms) | peak estimate (MiB) | temporaries (MiB) "
             "| aliased (MiB) | device peak (MiB) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        memory = r["memory"] or {}
        name = r["implementation"] + (f" ({r['matmul_dtype']})"
                                      if r["implementation"] == "pallas" else "")
        lines.append(f"| {name} | {r['batch']} | {1e3 * r['median_seconds']:.2f} | "
                     f"{_mib(memory.get('peak_estimate_bytes'))} | "
                     f"{_mib(memory.get('temp_size_in_bytes'))} | "
                     f"{_mib(memory.get('alias_size_in_bytes'))} | "
                     f"{_mib(r['device_peak_bytes'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 128])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--implementations", nargs="+", default=["xla", "pallas"],
                        choices=["xla", "pallas"])
    parser.add_argument("--matmul-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--tiny", action="store_true",
                        help="tiny shapes (S=128, K=2, H=64): a smoke run, e.g. on CPU")
    parser.add_argument("--results", help="append one JSON line per run to this file")
    args = parser.parse_args(argv)
    shapes = TINY if args.tiny else R1_DISTILL_QWEN_7B
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), shapes {shapes}")
    if jax.default_backend() == "cpu" and "pallas" in args.implementations:
        print("note: on CPU the Pallas path runs in TPU interpret mode; its times are not "
              "kernel times")
    rows = []
    for batch in sorted(args.batches):
        for implementation in args.implementations:
            row = bench(shapes, implementation, batch, args.repeats, args.matmul_dtype)
            rows.append(row)
            print(f"{implementation} batch {batch}: {1e3 * row['median_seconds']:.2f} ms",
                  flush=True)
            if args.results:
                with open(args.results, "a") as f:
                    f.write(json.dumps(row) + "\n")
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
