"""The share of gkv's decode time spent compressing the cache, by budget.

A gkv cycle is `divide_length` decode steps over a `budget + divide_length`-slot buffer, then
one compression (`decode.evict`: scoring and compaction of every layer). For each budget
this script:

1. generates `--max-new-tokens` tokens with `generate_tokens` (greedy, no EOS; chosen as
   1 + a multiple of divide_length, so the last forward is followed by a compression and
   the buffer holds exactly `budget` tokens): a cache with realistic contents;
2. times `divide_length` decode steps from there (one jitted scan), which fill the buffer;
3. times one `evict` of that full buffer (jitted), the compression that ends the cycle;

and reports share = evict / (steps + evict), the part of a cycle spent compressing. The
end-to-end cross-check is cycles x evict seconds / the whole generation's seconds (every
cycle ends with a compression, whether or not it evicts: a buffer holding at most `budget`
real tokens is compacted, still scored).

Model: R1-Distill-Qwen-1.5B widths with 4 layers (`--shape r1-4l`, default) or the bundled
model's size (`--shape bundled`); random weights, float32, batch `--batch` (default 1).

Usage:
  python benchmarks/eviction_share_bench.py --results benchmarks/results.jsonl
  python benchmarks/eviction_share_bench.py --shape bundled --batch 4 --max-new-tokens 1025 4097
  python benchmarks/eviction_share_bench.py --quick     # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import full_cache_bench  # noqa: E402
import generate_bench  # noqa: E402

from gkv_jax import decode  # noqa: E402
from gkv_jax.eviction import EvictionConfig  # noqa: E402
from gkv_jax.models import Transformer  # noqa: E402
from gkv_jax.sampling import SamplingParams  # noqa: E402

PROMPT_LENGTH = 64


def share_row(config, model, batch: int, budget: int, divide_length: int, max_new: int,
              repeats: int) -> dict:
    eviction = EvictionConfig(policy="gkv", budget=budget, divide_length=divide_length)
    params = model.params()
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (batch, PROMPT_LENGTH)),
                         jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(PROMPT_LENGTH, dtype=jnp.int32), tokens.shape)
    program = jax.jit(decode.generate_tokens, static_argnums=(0, 1, 2))
    args = (params, tokens, positions, SamplingParams.create(), jnp.zeros((batch,), jnp.int32),
            jnp.zeros((0,), jnp.int32))
    jax.block_until_ready(program(config, eviction, max_new, *args))  # compile, warm up
    start = time.perf_counter()
    outputs, state = jax.block_until_ready(program(config, eviction, max_new, *args))
    generate_seconds = time.perf_counter() - start
    capacity = state.cache.capacity
    if int(jnp.min(state.cache.lengths)) != budget:
        raise RuntimeError(f"max_new_tokens {max_new}: the buffer holds "
                           f"{np.asarray(state.cache.lengths)} tokens after the last cycle, "
                           f"expected {budget} (use 1 + a multiple of divide_length)")
    block = decode.live_attention_block(eviction, capacity)
    steps = full_cache_bench.step_seconds(config, decode.decode_params(params), state,
                                          divide_length, block, repeats) * divide_length

    # The cycle's steps, whose cache the compression gets.
    fill = jax.jit(full_cache_bench.decode_steps(config, divide_length, block))
    full = fill(decode.decode_params(params), state)[0].cache
    assert int(jnp.min(full.lengths)) == capacity
    active = jnp.ones((batch,), bool)
    evict = jax.jit(lambda cache: decode.evict(eviction, cache, active)).lower(full).compile()
    evict_seconds = full_cache_bench.median_seconds(lambda: evict(full), repeats)
    scores = full.global_score[jnp.isfinite(full.global_score)]
    tiny = float(np.mean(np.abs(np.asarray(scores)) < np.finfo(np.float32).tiny))
    compressions = int(outputs.compressions)
    cycles = (max_new - 1) // divide_length  # each ends with an evict, evicting or not
    row = {"budget": budget, "divide_length": divide_length, "capacity": capacity,
           "batch": batch, "max_new_tokens": max_new,
           "cycle_steps_seconds": steps, "step_ms": steps / divide_length * 1e3,
           "evict_ms": evict_seconds * 1e3, "share": evict_seconds / (steps + evict_seconds),
           "generate_seconds": generate_seconds, "compressions": compressions,
           "cycles": cycles, "end_to_end_share": cycles * evict_seconds / generate_seconds,
           "subnormal_global_scores": tiny}
    print(f"budget {budget}: step {row['step_ms']:.2f} ms, evict {row['evict_ms']:.2f} ms, "
          f"share {row['share']:.2%} (end to end {row['end_to_end_share']:.2%}, "
          f"{cycles} cycles in {generate_seconds:.1f} s)", flush=True)
    return row


def markdown(rows) -> str:
    lines = ["| budget | slots | new tokens | step (ms) | evict (ms) | share of a cycle "
             "| end to end | subnormal global scores |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['budget']} | {r['capacity']} | {r['max_new_tokens']} | "
                     f"{r['step_ms']:.2f} | {r['evict_ms']:.2f} | {r['share']:.2%} | "
                     f"{r['end_to_end_share']:.2%} | {r['subnormal_global_scores']:.1%} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(full_cache_bench.SHAPES), default="r1-4l")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--budgets", type=int, nargs="+", default=[64, 128, 256, 2048])
    parser.add_argument("--divide-length", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, nargs="+", default=[257])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, seconds")
    parser.add_argument("--results", default=None, help="append a JSON line here")
    args = parser.parse_args(argv)
    preset, overrides = full_cache_bench.SHAPES[args.shape]
    if args.quick:
        preset, overrides = None, ["num_layers=1", "hidden_size=64", "intermediate_size=128",
                                   "vocab_size=256"]
        args.budgets, args.divide_length, args.max_new_tokens = [32], 16, [33]
        args.repeats = 1
    name, config = generate_bench.build_config(
        preset, overrides + ["max_position_embeddings=32768"])
    model = Transformer(config, rngs=nnx.Rngs(0))
    rows = [share_row(config, model, args.batch, budget, args.divide_length, max_new,
                      args.repeats)
            for max_new in args.max_new_tokens for budget in args.budgets]
    print(markdown(rows))
    if args.results:
        record = {"benchmark": "eviction_share_bench", "model": name, "batch": args.batch,
                  "command": " ".join(sys.argv), "backend": jax.default_backend(),
                  "cpu_count": os.cpu_count(), "machine": platform.machine(),
                  "jax": jax.__version__, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "rows": rows}
        with open(args.results, "a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
