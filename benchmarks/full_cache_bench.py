"""A full cache that costs what it holds: decode step time by tokens generated, before/after.

The `full` policy's buffer holds `prompt + max_new_tokens - 1` slots. Before, every decode
step attended over the whole buffer (its cost fixed by `max_new_tokens`); now it reads the
live slots only, in blocks (`decode.live_attention_block`, `layers.live_block_attention`).
Both are measured in one run, side by side:

1. Step time at a given point of a long generation: a buffer sized for `--capacity-for`
   new tokens (default 16384) holding `live` cached tokens (1024, 4096, 16384 by default),
   `--steps` decode steps timed under one jitted scan, dense (before) and live blocks (now).
2. End to end: `generate` with `full` for each `--max-new-tokens` (default 1024 and 4096),
   dense and live blocks, tokens/s of the second call; the tokens must be identical.

Model: the bundled-model size (4 layers x 256, random weights) by default, or `--shape
r1-4l` (R1-Distill-Qwen-1.5B widths, 4 layers). Float32, batch `--batch` (default 1).

Usage:
  python benchmarks/full_cache_bench.py --results benchmarks/results.jsonl
  python benchmarks/full_cache_bench.py --quick       # seconds: tiny sizes
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
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
import generate_bench  # noqa: E402

from gkv_jax import decode, generate  # noqa: E402
from gkv_jax.cache import init_cache  # noqa: E402
from gkv_jax.eviction import EvictionConfig  # noqa: E402
from gkv_jax.models import Transformer  # noqa: E402
from gkv_jax.sampling import SamplingParams  # noqa: E402

SHAPES = {"bundled": (None, []), "r1-4l": ("deepseek-r1-distill-qwen-1.5b", ["num_layers=4"])}
PROMPT_LENGTH = 64


@contextlib.contextmanager
def dense_attention():
    """The previous full-cache decode step: every step attends over the whole buffer."""
    original = decode.live_attention_block
    decode.live_attention_block = lambda *_: None
    try:
        yield
    finally:
        decode.live_attention_block = original


def filled_state(config, batch: int, capacity: int, live: int, seed: int = 0):
    """A decode state whose cache holds `live` tokens (random keys and values)."""
    rng = np.random.default_rng(seed)
    cache = init_cache(config, batch, capacity)
    shape = cache.keys.shape[:3] + (live, cache.keys.shape[4])
    keys = jnp.asarray(rng.normal(size=shape) * 0.3, cache.keys.dtype)
    values = jnp.asarray(rng.normal(size=shape), cache.values.dtype)
    positions = jnp.broadcast_to(jnp.arange(live, dtype=jnp.int32), shape[:4])
    cache = cache.replace(keys=cache.keys.at[:, :, :, :live].set(keys),
                          values=cache.values.at[:, :, :, :live].set(values),
                          positions=cache.positions.at[:, :, :, :live].set(positions),
                          lengths=jnp.full((batch,), live, jnp.int32))
    return decode.initial_state(
        cache, jnp.asarray(rng.integers(0, config.vocab_size, batch), jnp.int32),
        jnp.full((batch,), live, jnp.int32))


def median_seconds(fn, repeats: int) -> float:
    """Median wall seconds of `fn()` (its result awaited) over `repeats` calls, after one
    warm-up call."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def decode_steps(config, steps: int, attention_block):
    """A function (params, state) -> (state, tokens [steps, B]): `steps` greedy decode steps
    under one scan, no EOS."""
    sampling, eos = SamplingParams.create(), jnp.zeros((0,), jnp.int32)

    def run(params, state):
        def body(state, _):
            state, out = decode.decode_step(config, params, state, sampling, eos,
                                            attention_block)
            return state, out.tokens
        return jax.lax.scan(body, state, None, length=steps)

    return run


def step_seconds(config, params, state, steps: int, attention_block, repeats: int) -> float:
    """Median seconds per decode step over `steps` steps run by one jitted scan."""
    program = jax.jit(decode_steps(config, steps, attention_block)).lower(
        params, state).compile()
    return median_seconds(lambda: program(params, state), repeats) / steps


def step_rows(config, model, batch, capacity_for, lives, steps, repeats):
    params = decode.decode_params(model.params())
    full = EvictionConfig(policy="full")
    capacity = decode.cache_capacity(full, PROMPT_LENGTH, capacity_for)
    block = decode.live_attention_block(full, capacity)
    rows = []
    for live in lives:
        live = min(live, capacity - steps)
        state = filled_state(config, batch, capacity, live)
        before = step_seconds(config, params, state, steps, None, repeats)
        now = step_seconds(config, params, state, steps, block, repeats)
        rows.append({"kind": "step", "capacity": capacity, "block": block, "live": live,
                     "batch": batch, "before_ms": before * 1e3, "now_ms": now * 1e3,
                     "speedup": before / now})
        print(f"step at {live} cached tokens, buffer {capacity}: before {before * 1e3:.2f} ms,"
              f" now {now * 1e3:.2f} ms ({before / now:.2f}x)", flush=True)
    return rows


def generate_rows(config, model, batch, max_new_tokens_list):
    prompts = generate_bench.random_prompts(config, batch, PROMPT_LENGTH, 0)
    rows = []
    for max_new in max_new_tokens_list:
        full = EvictionConfig(policy="full")
        runs = {}
        # The dense run gets its own program (decode's block size is read when tracing).
        for name, eviction in (("now", full),
                               ("before", dataclasses.replace(full, divide_length=129))):
            context = dense_attention() if name == "before" else contextlib.nullcontext()
            with context:
                out = [generate(model, prompts, eviction=eviction, max_new_tokens=max_new,
                                eos_token_id=[]) for _ in range(2)][1]
            runs[name] = out
        same = bool(np.array_equal(np.asarray(runs["now"].tokens),
                                   np.asarray(runs["before"].tokens)))
        before, now = (runs[k].stats["tokens_per_second"] for k in ("before", "now"))
        rows.append({"kind": "generate", "batch": batch, "max_new_tokens": max_new,
                     "before_tokens_per_second": before, "now_tokens_per_second": now,
                     "speedup": now / before, "identical_tokens": same})
        print(f"generate {max_new} tokens: before {before:.1f} tok/s, now {now:.1f} tok/s "
              f"({now / before:.2f}x), identical tokens: {same}", flush=True)
    return rows


def markdown(rows) -> str:
    lines = ["| cached tokens | buffer slots | block | before (ms/step) | now (ms/step) "
             "| speed-up |", "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["kind"] == "step":
            lines.append(f"| {r['live']} | {r['capacity']} | {r['block']} | "
                         f"{r['before_ms']:.2f} | {r['now_ms']:.2f} | {r['speedup']:.2f}x |")
    lines += ["", "| new tokens | before (tok/s) | now (tok/s) | speed-up | identical tokens |",
              "|---:|---:|---:|---:|---|"]
    for r in rows:
        if r["kind"] == "generate":
            lines.append(f"| {r['max_new_tokens']} | {r['before_tokens_per_second']:.1f} | "
                         f"{r['now_tokens_per_second']:.1f} | {r['speedup']:.2f}x | "
                         f"{r['identical_tokens']} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="bundled")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--capacity-for", type=int, default=16384)
    parser.add_argument("--live", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, nargs="*", default=[1024, 4096])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, seconds")
    parser.add_argument("--results", default=None, help="append a JSON line here")
    args = parser.parse_args(argv)
    preset, overrides = SHAPES[args.shape]
    if args.quick:
        preset, overrides = None, ["num_layers=1", "hidden_size=64", "intermediate_size=128",
                                   "vocab_size=256"]
        args.capacity_for, args.live, args.steps, args.repeats = 2048, [256, 2000], 4, 1
        args.max_new_tokens = [1100]
    name, config = generate_bench.build_config(
        preset, overrides + ["max_position_embeddings=32768"])
    model = Transformer(config, rngs=nnx.Rngs(0))
    rows = step_rows(config, model, args.batch, args.capacity_for, args.live, args.steps,
                     args.repeats)
    rows += generate_rows(config, model, args.batch, args.max_new_tokens)
    print(markdown(rows))
    if args.results:
        record = {"benchmark": "full_cache_bench", "model": name, "batch": args.batch,
                  "command": " ".join(sys.argv), "backend": jax.default_backend(),
                  "device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
                  "machine": platform.machine(), "jax": jax.__version__,
                  "time": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows}
        with open(args.results, "a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
