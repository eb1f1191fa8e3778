"""Compile time of the full causal forward on CPU, from abstract inputs (no weights exist).

For each config, `jax.jit(functools.partial(forward, config))` is lowered and compiled for
`jax.ShapeDtypeStruct` params (from `param_shapes`, bfloat16) and int32 tokens [B, T]. Lowering
(tracing + StableHLO) and XLA compilation are timed separately; every repeat starts from
`jax.clear_caches()` and the table shows medians. The default configs are the 1.5B and 7B
presets and the 1.5B preset at depths 4, 8, 16 and 28: the layers run under `lax.scan`, so
compile time should not grow with depth.

Usage:
  python benchmarks/compile_bench.py [--repeats 3] [--batch 1] [--seq 512]
      [--presets NAME ...] [--depths 4 8 16 28] [--results FILE.jsonl]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from gkv_jax.models.config import ModelConfig, preset  # noqa: E402
from gkv_jax.models.transformer import forward, param_shapes  # noqa: E402

DEPTH_PRESET = "deepseek-r1-distill-qwen-1.5b"
DEFAULT_PRESETS = ("deepseek-r1-distill-qwen-1.5b", "deepseek-r1-distill-qwen-7b")
DEFAULT_DEPTHS = (4, 8, 16, 28)


def abstract_params(config: ModelConfig, dtype=jnp.bfloat16) -> dict[str, Any]:
    """`jax.ShapeDtypeStruct` leaves with the shapes of every weight."""
    return jax.tree.map(lambda shape: jax.ShapeDtypeStruct(shape, dtype), param_shapes(config),
                        is_leaf=lambda x: isinstance(x, tuple))


def time_compile(config: ModelConfig, batch: int, seq: int) -> dict[str, float]:
    """Seconds to lower and to compile the forward once, from cleared caches."""
    jax.clear_caches()
    params = abstract_params(config)
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    jitted = jax.jit(functools.partial(forward, config))
    start = time.perf_counter()
    lowered = jitted.lower(params, tokens)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    compiled_at = time.perf_counter()
    assert compiled.out_info.shape == (batch, seq, config.vocab_size)
    return {"lower_seconds": lowered_at - start, "compile_seconds": compiled_at - lowered_at}


def bench_config(name: str, config: ModelConfig, repeats: int, batch: int,
                 seq: int) -> dict[str, Any]:
    """Medians over `repeats` fresh lowerings and compilations of one config."""
    runs = [time_compile(config, batch, seq) for _ in range(repeats)]
    lower = statistics.median(r["lower_seconds"] for r in runs)
    compile_ = statistics.median(r["compile_seconds"] for r in runs)
    return {"name": name, "num_layers": config.num_layers,
            "num_parameters": config.num_parameters(), "lower_seconds": lower,
            "compile_seconds": compile_, "total_seconds": lower + compile_, "runs": runs}


def configs_to_run(presets: list[str], depths: list[int]) -> list[tuple[str, ModelConfig]]:
    named = [(name, preset(name)) for name in presets]
    base = preset(DEPTH_PRESET)
    named += [(f"{DEPTH_PRESET}, num_layers={n}", base.replace(num_layers=n)) for n in depths]
    return named


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| config | layers | parameters | lower (s) | compile (s) | total (s) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| `{r['name']}` | {r['num_layers']} | {r['num_parameters'] / 1e9:.2f} B "
                     f"| {r['lower_seconds']:.2f} | {r['compile_seconds']:.2f} "
                     f"| {r['total_seconds']:.2f} |")
    return "\n".join(lines)


def warm_up() -> None:
    """Compiles a tiny model once, so that one-time backend start-up is not in any timing."""
    tiny = preset(DEPTH_PRESET).replace(vocab_size=256, hidden_size=64, intermediate_size=128,
                                        num_layers=2, num_heads=4, num_kv_heads=2,
                                        head_dim=16)
    time_compile(tiny, 1, 8)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--presets", nargs="*", default=list(DEFAULT_PRESETS))
    parser.add_argument("--depths", nargs="*", type=int, default=list(DEFAULT_DEPTHS),
                        help=f"num_layers values for {DEPTH_PRESET}")
    parser.add_argument("--results", default=None, help="append a JSON line to this file")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    warm_up()
    rows = []
    for name, config in configs_to_run(args.presets, args.depths):
        rows.append(bench_config(name, config, args.repeats, args.batch, args.seq))
        print(f"done: {name}", flush=True)
    print(f"\nForward `jax.jit(partial(forward, config)).lower(params, tokens).compile()`, "
          f"bfloat16 abstract params, int32 tokens [{args.batch}, {args.seq}], backend "
          f"{jax.default_backend()}, median of {args.repeats} runs from `jax.clear_caches()`."
          "\n")
    print(markdown_table(rows))
    if args.results:
        record = {"bench": "compile", "batch": args.batch, "seq": args.seq,
                  "repeats": args.repeats, "backend": jax.default_backend(),
                  "jax": jax.__version__, "host": platform.node(), "rows": rows}
        with open(args.results, "a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
