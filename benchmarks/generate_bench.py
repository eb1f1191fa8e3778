"""Decode-loop throughput and cache size of `gkv_jax.generate`: `gkv` at fixed budgets vs `full`.

For every (max_new_tokens, policy) pair, `generate()` runs twice on the same random prompts
(greedy, `eos_token_id=[]`, so every sequence generates exactly max_new_tokens tokens). The
first call compiles and warms up; the table reports the second call, whose compile_seconds
must be 0. Policies: `full` and `gkv` at each budget with gkv's default window (16) and
`--divide-length` (default 128; the cache holds budget + divide_length slots, so a budget
below divide_length is allowed).

Reported per run (from `GenerateOutput.stats` of the second call):
  tokens/s       generated tokens (batch x max_new_tokens) / run seconds (compile excluded).
  step (ms)      run seconds / forwards (prefill included in both).
  cache bytes    the whole cache pytree at the end: keys, values, positions, global scores,
                 query window, lengths.
  full bytes     keys + values a full cache needs at the final length (prompt + generated).

Memory-bandwidth roofline (`--roofline-gbps BW`, in GB/s = 1e9 bytes/s). The bytes one decode
step must read are modelled as
  weights  = (num_parameters - V * D if the embedding is untied else num_parameters) * itemsize
             (an untied embedding table is only gathered at B rows, so it is not counted),
  kv       = 2 * L * B * K * H * itemsize * slots, where slots is
               gkv:  budget + divide_length (the fixed buffer attention reads every step),
               full: prompt_length + max_new_tokens / 2 (the mean length over the run; the
                     ideal traffic of a growing cache. Our `full` attends over its whole
                     static buffer of prompt + max_new_tokens - 1 slots every step, so this
                     under-counts what it actually reads by up to 2x on the KV part),
and fraction = (weights + kv) / (run_seconds / forwards) / (BW * 1e9). Eviction scoring
(every divide_length steps) and activations are not counted.

Model: by default a random-weights Qwen2-family model (4 layers, D 256, 4 query / 2 KV heads,
head dim 64, MLP 768, vocab 4096, context 8192); `--preset NAME` uses a real architecture
(`gkv_jax.models.preset`) with random weights, `--set FIELD=VALUE` overrides config fields.

Usage:
  # CPU, small model (a few minutes on 2 cores):
  python benchmarks/generate_bench.py --results benchmarks/results.jsonl
  # only the gkv rows (e.g. to re-measure them):
  python benchmarks/generate_bench.py --no-full
  # smoke test, seconds:
  python benchmarks/generate_bench.py --quick
  # our own baseline: the decode step as it was before issue 18
  python benchmarks/generate_bench.py --no-full --before
  # GPU, R1-Distill-Qwen-1.5B architecture (random bf16 weights), H100 SXM at 3350 GB/s:
  python benchmarks/generate_bench.py --preset deepseek-r1-distill-qwen-1.5b \\
      --dtype bfloat16 --batch 1 64 --max-new-tokens 4096 16384 --budgets 2048 \\
      --roofline-gbps 3350 --results benchmarks/results.jsonl
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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gkv_jax import decode
from gkv_jax.eviction import DEFAULT_DIVIDE_LENGTH, EvictionConfig
from gkv_jax.generation import generate
from gkv_jax.models import ModelConfig, Transformer, preset

SMALL_CONFIG = ModelConfig(
    family="qwen2", vocab_size=4096, hidden_size=256, intermediate_size=768, num_layers=4,
    num_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=8192, qkv_bias=True)
DEFAULT_MAX_NEW = (1024, 2048, 4096)
DEFAULT_BUDGETS = (64, 128, 256)
QUICK_MAX_NEW = (256,)


@dataclasses.dataclass(frozen=True)
class Run:
    """One cell of the sweep."""

    batch: int
    max_new_tokens: int
    eviction: EvictionConfig

    @property
    def label(self) -> str:
        e = self.eviction
        return "full" if e.policy == "full" else f"gkv budget {e.budget}"


# ------------------------------------------------------------------------------ setup
def parse_value(text: str) -> Any:
    """An int, float or bool from the command line, else the string itself."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def build_config(preset_name: str | None, overrides: list[str]) -> tuple[str, ModelConfig]:
    """The model config and a name for it: a preset or the small default, with overrides."""
    name, config = ("small qwen2", SMALL_CONFIG) if preset_name is None else (
        preset_name, preset(preset_name))
    return apply_overrides(name, config, overrides)


def apply_overrides(name: str, config: ModelConfig, overrides: list[str]
                    ) -> tuple[str, ModelConfig]:
    """`config` with the command line's `FIELD=VALUE` overrides, and `name` naming them."""
    changes = {}
    for item in overrides:
        field, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects FIELD=VALUE, got {item!r}")
        changes[field] = parse_value(value)
    if changes:
        config = config.replace(**changes)
        name += ", " + ", ".join(f"{k}={v}" for k, v in changes.items())
    return name, config


def random_prompts(config: ModelConfig, batch: int, length: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, config.vocab_size, (batch, length)).tolist()


def sweep(batches: list[int], max_new: list[int], budgets: list[int], divide_length: int,
          with_full: bool = True) -> list[Run]:
    policies = [EvictionConfig(policy="full")] if with_full else []
    policies += [EvictionConfig(policy="gkv", budget=b, divide_length=divide_length)
                 for b in budgets]
    return [Run(b, m, e) for b in batches for m in max_new for e in policies]


@contextlib.contextmanager
def decode_as_before():
    """`generate`'s decode steps as they were before issue 18, our own baseline: over the
    stacked [L, ...] weights (the layer scan) and attending over the whole cache buffer
    (`grouped_attention` over all C slots). Both are read when a program is traced: call
    it for configurations not compiled yet in this process."""
    originals = decode.decode_params, decode.live_attention_block
    decode.decode_params = lambda params: params
    decode.live_attention_block = lambda *_: None
    try:
        yield
    finally:
        decode.decode_params, decode.live_attention_block = originals


# ------------------------------------------------------------------------------ measuring
def bytes_per_step(config: ModelConfig, itemsize: int, run: Run, prompt_length: int
                   ) -> dict[str, float]:
    """Weight and KV bytes one decode step reads (the model in the module docstring)."""
    params = config.num_parameters()
    if not config.tie_word_embeddings:
        params -= config.vocab_size * config.hidden_size
    e = run.eviction
    slots = (e.budget + e.divide_length if e.evicts
             else prompt_length + run.max_new_tokens / 2)
    per_slot = 2 * config.num_layers * run.batch * config.num_kv_heads * config.head_dim
    return {"weight_bytes": params * itemsize, "kv_bytes": per_slot * itemsize * slots}


def measure(model: Transformer, run: Run, prompts: list[list[int]]) -> dict[str, Any]:
    """Two identical `generate` calls; returns both calls' stats (the second is reported)."""
    calls = []
    for _ in range(2):
        out = generate(model, prompts, eviction=run.eviction,
                       max_new_tokens=run.max_new_tokens, eos_token_id=[])
        calls.append(out.stats)
    first, second = calls
    if second["compile_seconds"] != 0:
        raise RuntimeError(f"{run.label}: the second call compiled again "
                           f"({second['compile_seconds']:.2f} s)")
    expected = run.batch * run.max_new_tokens
    if second["generated_tokens"] != expected:
        raise RuntimeError(f"{run.label}: generated {second['generated_tokens']} tokens, "
                           f"expected {expected}")
    return {"warmup": first, "measured": second}


def row(config: ModelConfig, itemsize: int, run: Run, prompt_length: int,
        calls: dict[str, Any], roofline_gbps: float | None) -> dict[str, Any]:
    s = calls["measured"]
    out = {"policy": run.eviction.policy, "label": run.label,
           "eviction": run.eviction.describe(), "batch": run.batch,
           "max_new_tokens": run.max_new_tokens, "tokens_per_second": s["tokens_per_second"],
           "run_seconds": s["run_seconds"], "forwards": s["forwards"],
           "step_seconds": s["run_seconds"] / s["forwards"],
           "compile_seconds_first_call": calls["warmup"]["compile_seconds"],
           "compile_seconds": s["compile_seconds"], "cache_bytes": s["cache_bytes"],
           "full_cache_bytes": s["full_cache_bytes"],
           "cache_ratio": s["cache_bytes"] / s["full_cache_bytes"],
           "compressions": s["compressions"], "capacity": s["capacity"],
           "stats": calls}
    if roofline_gbps:
        traffic = bytes_per_step(config, itemsize, run, prompt_length)
        total = traffic["weight_bytes"] + traffic["kv_bytes"]
        out.update(traffic, roofline_gbps=roofline_gbps,
                   roofline_fraction=total / out["step_seconds"] / (roofline_gbps * 1e9))
    return out


# ------------------------------------------------------------------------------ output
def markdown_table(rows: list[dict[str, Any]], roofline: bool) -> str:
    head = ("| batch | max new tokens | policy | tokens/s | run (s) | step (ms) "
            "| compile (s), 1st / 2nd call | cache (MB) | full cache (MB) | cache / full "
            "| compressions |")
    rule = "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    if roofline:
        head += " weights + KV per step (MB) | roofline |"
        rule += "---:|---:|"
    lines = [head, rule]
    for r in rows:
        line = (f"| {r['batch']} | {r['max_new_tokens']} | {r['label']} "
                f"| {r['tokens_per_second']:.1f} | {r['run_seconds']:.2f} "
                f"| {r['step_seconds'] * 1e3:.2f} "
                f"| {r['compile_seconds_first_call']:.2f} / {r['compile_seconds']:.2f} "
                f"| {r['cache_bytes'] / 1e6:.2f} | {r['full_cache_bytes'] / 1e6:.2f} "
                f"| {r['cache_ratio']:.3f} | {r['compressions']} |")
        if roofline:
            moved = (r["weight_bytes"] + r["kv_bytes"]) / 1e6
            line += f" {moved:.1f} | {100 * r['roofline_fraction']:.1f}% |"
        lines.append(line)
    return "\n".join(lines)


def describe(name: str, config: ModelConfig, dtype: str, args: argparse.Namespace) -> str:
    c = config
    return (f"Model `{name}` ({c.family}, random weights, {dtype}): {c.num_layers} layers, "
            f"hidden {c.hidden_size}, {c.num_heads} query / {c.num_kv_heads} KV heads, "
            f"head_dim {c.head_dim}, intermediate {c.intermediate_size}, vocab "
            f"{c.vocab_size}, max_position_embeddings {c.max_position_embeddings}, "
            f"{c.num_parameters() / 1e6:.2f} M parameters. Prompts: {args.prompt_length} "
            f"random tokens each, greedy, no EOS. gkv: window 16, divide_length "
            f"{args.divide_length}. Backend {jax.default_backend()} "
            f"({jax.devices()[0].device_kind}); second of two calls per row.")


# ------------------------------------------------------------------------------ main
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default=None, help="a gkv_jax.models preset name "
                        "(random weights); default: the small qwen2 config")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[],
                        metavar="FIELD=VALUE", help="override ModelConfig fields")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--batch", nargs="+", type=int, default=[4])
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--max-new-tokens", nargs="+", type=int, default=None,
                        help=f"default {list(DEFAULT_MAX_NEW)} ({list(QUICK_MAX_NEW)} "
                        "with --quick)")
    parser.add_argument("--budgets", nargs="+", type=int, default=list(DEFAULT_BUDGETS))
    parser.add_argument("--divide-length", type=int, default=DEFAULT_DIVIDE_LENGTH)
    parser.add_argument("--no-full", action="store_true", help="run only the gkv budgets")
    parser.add_argument("--before", action="store_true",
                        help="decode as before issue 18 (stacked weights, whole-buffer "
                        "attention): our own baseline")
    parser.add_argument("--roofline-gbps", type=float, default=None,
                        help="memory bandwidth in GB/s; adds the roofline fraction")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: max_new_tokens {list(QUICK_MAX_NEW)}")
    parser.add_argument("--results", default=None, help="append a JSON line to this file")
    args = parser.parse_args(argv)
    if args.max_new_tokens is None:
        args.max_new_tokens = list(QUICK_MAX_NEW if args.quick else DEFAULT_MAX_NEW)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    name, config = build_config(args.preset, args.overrides)
    start = time.perf_counter()
    model = Transformer(config, dtype=getattr(jnp, args.dtype), rngs=nnx.Rngs(0))
    print(f"built {name} in {time.perf_counter() - start:.1f} s", flush=True)
    itemsize = jnp.dtype(args.dtype).itemsize
    rows = []
    for run in sweep(args.batch, args.max_new_tokens, args.budgets, args.divide_length,
                     with_full=not args.no_full):
        prompts = random_prompts(config, run.batch, args.prompt_length, args.seed)
        with decode_as_before() if args.before else contextlib.nullcontext():
            calls = measure(model, run, prompts)
        rows.append(row(config, itemsize, run, args.prompt_length, calls, args.roofline_gbps))
        print(f"done: batch {run.batch}, {run.max_new_tokens} tokens, {run.label}: "
              f"{rows[-1]['tokens_per_second']:.1f} tokens/s", flush=True)
    print("\n" + describe(name, config, args.dtype, args) + "\n")
    print(markdown_table(rows, args.roofline_gbps is not None))
    if args.results:
        record = {"bench": "generate", "argv": sys.argv[1:], "model": name,
                  "config": dataclasses.asdict(config),
                  "dtype": args.dtype, "prompt_length": args.prompt_length,
                  "divide_length": args.divide_length, "quick": args.quick,
                  "seed": args.seed, "before": args.before, "backend": jax.default_backend(),
                  "device": jax.devices()[0].device_kind, "jax": jax.__version__,
                  "host": platform.node(), "cpus": os.cpu_count(), "rows": rows}
        with open(args.results, "a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
