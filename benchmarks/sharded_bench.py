"""Sharded vs single-device `gkv_jax.generate`: tokens/s and compile time per mesh, gkv and full.

For every mesh (`DATAxMODEL`; `1x1` is the single-device program, no mesh at all) a random
model is built straight onto the mesh (the same weights on every mesh), and for every policy
`generate()` runs twice on the same random prompts (greedy, `eos_token_id=[]`, so every
sequence generates exactly max_new_tokens tokens): the first call compiles, the table reports
the second (whose compile_seconds must be 0) beside the first call's compile time. Each row
also counts the generated tokens equal to the `1x1` run's of the same policy: sharding moves
where the sums happen, not what the program computes.

On CPU host devices (`--host-devices 8` on a 2-core machine) this is a correctness-of-plumbing
figure, not a speed claim: the 8 "devices" share the same cores, so a mesh can only add
communication. On an accelerator host it measures what sharding buys.

Reported per row:
  tokens/s         generated tokens (batch x max_new_tokens) / run seconds of the second call.
  compile (s)      the first call's compilation.
  cache / device   bytes of the cache one device holds (its shard of every buffer).
  cache total      bytes of the whole cache.
  same tokens      generated tokens equal to the 1x1 run's, in percent (needs a 1x1 row).

Models: `--preset small` (default) is a random Qwen2-family model of modest width: 4 layers,
D 256, 8 query / 4 KV heads of 32, MLP 1024, vocab 4096 (4 KV heads like R1-Distill-Qwen-7B, so
2x4 splits the KV heads and 1x8 replicates them, as the 7B on 8 chips would). `--preset
r1-qwen-7b` has DeepSeek-R1-Distill-Qwen-7B's shapes (28 layers, D 3584, F 18944, 28 query / 4
KV heads of 128, vocab 152064, untied; bfloat16), batch 64, prompt 128, 4096 new tokens, gkv
2048 vs full, on one mesh over every device with `model` = the largest divisor of the device
count that divides the 4 KV heads (8 devices: 2x4). `--set FIELD=VALUE` overrides config
fields; every other flag overrides the preset's defaults.

Usage:
  # CPU, 8 host devices (about 4 minutes on 2 cores):
  python benchmarks/sharded_bench.py --host-devices 8 --results benchmarks/results.jsonl
  # an 8-chip TPU host or an 8-GPU host:
  python benchmarks/sharded_bench.py --preset r1-qwen-7b --results benchmarks/results.jsonl
  # the same preset, checked on CPU without generating (tiny overrides):
  python benchmarks/sharded_bench.py --host-devices 8 --preset r1-qwen-7b --dry-run \\
      --set num_layers=2 hidden_size=128 intermediate_size=256 head_dim=16 vocab_size=512
"""

from __future__ import annotations

import argparse
import os
import sys

HOST_DEVICES_FLAG = "--xla_force_host_platform_device_count"


def set_host_devices(argv: list[str]) -> None:
    """Sets XLA_FLAGS for `--host-devices N` before JAX starts its CPU backend (it reads the
    flag once, when the first device is asked for)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--host-devices", type=int, default=None)
    count = parser.parse_known_args(argv)[0].host_devices
    if count is None:
        return
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith(HOST_DEVICES_FLAG)]
    os.environ["XLA_FLAGS"] = " ".join([*flags, f"{HOST_DEVICES_FLAG}={count}"])


if __name__ == "__main__":
    set_host_devices(sys.argv[1:])

import dataclasses  # noqa: E402  (after XLA_FLAGS, which the backend reads when it starts)
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from generate_bench import apply_overrides  # noqa: E402  (this folder is on sys.path)
from jax.sharding import NamedSharding  # noqa: E402

import gkv_jax  # noqa: E402
from gkv_jax.eviction import EvictionConfig  # noqa: E402
from gkv_jax.models import ModelConfig, Transformer, param_shapes, preset  # noqa: E402
from gkv_jax.sharding import kv_heads_split, make_mesh, param_specs  # noqa: E402

SMALL_CONFIG = ModelConfig(
    family="qwen2", vocab_size=4096, hidden_size=256, intermediate_size=1024, num_layers=4,
    num_heads=8, num_kv_heads=4, head_dim=32, max_position_embeddings=8192, qkv_bias=True)

# Per preset: the model and the defaults of every flag it sets ("auto": one mesh over every
# device, `model` as large as the KV heads allow).
PRESETS: dict[str, dict[str, Any]] = {
    "small": {"config": SMALL_CONFIG, "dtype": "float32", "batch": 8, "prompt_length": 64,
              "max_new_tokens": 256, "budget": 64, "divide_length": 32,
              "meshes": ["1x1", "8x1", "2x4", "1x8"]},
    "r1-qwen-7b": {"config": preset("deepseek-r1-distill-qwen-7b"), "dtype": "bfloat16",
                   "batch": 64, "prompt_length": 128, "max_new_tokens": 4096, "budget": 2048,
                   "divide_length": 128, "meshes": ["auto"]},
}


# ------------------------------------------------------------------------------ setup
def build_config(preset_name: str, overrides: list[str]) -> tuple[str, ModelConfig]:
    """The preset's config with `FIELD=VALUE` overrides, and a name for it."""
    return apply_overrides(preset_name, PRESETS[preset_name]["config"], overrides)


def auto_mesh_shape(devices: int, num_kv_heads: int) -> tuple[int, int]:
    """(data, model) over `devices` with `model` the largest divisor of the device count that
    divides the KV heads (so each device holds whole KV heads and their query groups)."""
    model = max(m for m in range(1, devices + 1)
                if devices % m == 0 and num_kv_heads % m == 0)
    return devices // model, model


def parse_mesh(text: str, devices: int, num_kv_heads: int) -> tuple[int, int]:
    """`DATAxMODEL` (or "auto") as (data, model).

    Raises:
      ValueError: not of that form, or a product other than 1 (single device) or `devices`.
    """
    if text == "auto":
        return auto_mesh_shape(devices, num_kv_heads)
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise ValueError(f"--meshes: expected DATAxMODEL (e.g. 2x4) or 'auto', got {text!r}")
    data, model = int(parts[0]), int(parts[1])
    if data * model not in (1, devices):
        raise ValueError(f"--meshes: {text} uses {data * model} devices; there are {devices} "
                         "(1x1 is the single-device program)")
    return data, model


def random_model(config: ModelConfig, dtype: str, mesh, seed: int) -> Transformer:
    """A random `Transformer` whose weights are created on their shards of `mesh` (one device
    when None): the 7B never sits whole on one chip. The values do not depend on the mesh."""
    abstract = nnx.eval_shape(lambda: Transformer(config, dtype=dtype, rngs=nnx.Rngs(seed)))
    graphdef, state = nnx.split(abstract)
    shardings = None
    if mesh is not None:
        specs = param_specs(config, param_shapes(config), mesh)

        def sharding(path, _):
            node = specs
            for key in path:  # e.g. ("layers", "q_proj", "value"): the spec is at the name
                name = getattr(key, "key", None)
                if isinstance(node, dict) and name in node:
                    node = node[name]
            return NamedSharding(mesh, node)

        shardings = jax.tree_util.tree_map_with_path(sharding, state)
    build = jax.jit(lambda: nnx.state(Transformer(config, dtype=dtype, rngs=nnx.Rngs(seed))),
                    out_shardings=shardings)
    return nnx.merge(graphdef, build())


def random_prompts(config: ModelConfig, batch: int, length: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, config.vocab_size, (batch, length)).tolist()


def policies(budget: int, divide_length: int, with_full: bool) -> list[EvictionConfig]:
    out = [EvictionConfig(policy="gkv", budget=budget, divide_length=divide_length)]
    if with_full:
        out.append(EvictionConfig(policy="full", divide_length=divide_length))
    return out


def label(eviction: EvictionConfig) -> str:
    return "full" if eviction.policy == "full" else f"gkv {eviction.budget}"


# ------------------------------------------------------------------------------ measuring
def measure(model, eviction: EvictionConfig, prompts, max_new_tokens: int, mesh):
    """Two identical `generate` calls: (first call's stats, second call's output)."""
    calls = [gkv_jax.generate(model, prompts, eviction=eviction, max_new_tokens=max_new_tokens,
                              eos_token_id=[], mesh=mesh) for _ in range(2)]
    first, second = calls
    if second.stats["compile_seconds"] != 0:
        raise RuntimeError(f"{label(eviction)}: the second call compiled again "
                           f"({second.stats['compile_seconds']:.2f} s)")
    expected = len(prompts) * max_new_tokens
    if second.stats["generated_tokens"] != expected:
        raise RuntimeError(f"{label(eviction)}: generated {second.stats['generated_tokens']} "
                           f"tokens, expected {expected}")
    return first.stats, second


def same_tokens(tokens: list[list[int]], reference: list[list[int]] | None) -> float | None:
    """Percent of generated tokens equal to the reference run's, position by position."""
    if reference is None:
        return None
    a, b = np.asarray(tokens), np.asarray(reference)
    return float(100 * np.mean(a == b))


def row(shape, split: bool, eviction, first, second, reference) -> dict[str, Any]:
    s = second.stats
    data, model = shape
    return {"mesh": f"{data}x{model}", "data": data, "model": model, "devices": s["devices"],
            "kv_heads_split": split,
            "policy": eviction.policy, "label": label(eviction),
            "eviction": eviction.describe(), "tokens_per_second": s["tokens_per_second"],
            "run_seconds": s["run_seconds"], "forwards": s["forwards"],
            "compile_seconds_first_call": first["compile_seconds"],
            "compile_seconds": s["compile_seconds"], "cache_bytes": s["cache_bytes"],
            "cache_bytes_per_device": s["cache_bytes_per_device"],
            "full_cache_bytes": s["full_cache_bytes"], "compressions": s["compressions"],
            "same_tokens_percent": same_tokens(second.tokens, reference)}


# ------------------------------------------------------------------------------ output
def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| mesh (data x model) | devices | KV heads split | policy | tokens/s | run (s) "
             "| compile (s) | cache / device (MB) | cache total (MB) | same tokens as 1x1 |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        same = "-" if r["same_tokens_percent"] is None else f"{r['same_tokens_percent']:.1f}%"
        lines.append(
            f"| {r['mesh']} | {r['devices']} | {'yes' if r['kv_heads_split'] else 'no'} "
            f"| {r['label']} | {r['tokens_per_second']:.1f} | {r['run_seconds']:.2f} "
            f"| {r['compile_seconds_first_call']:.2f} | {r['cache_bytes_per_device'] / 1e6:.3f} "
            f"| {r['cache_bytes'] / 1e6:.3f} | {same} |")
    return "\n".join(lines)


def describe(name: str, config: ModelConfig, args: argparse.Namespace) -> str:
    c = config
    device = jax.devices()[0]
    return (f"Model `{name}` ({c.family}, random weights, {args.dtype}): {c.num_layers} layers, "
            f"hidden {c.hidden_size}, {c.num_heads} query / {c.num_kv_heads} KV heads, "
            f"head_dim {c.head_dim}, intermediate {c.intermediate_size}, vocab "
            f"{c.vocab_size}, {c.num_parameters() / 1e6:.2f} M parameters. Batch "
            f"{args.batch}, prompts of {args.prompt_length} random tokens, "
            f"{args.max_new_tokens} new tokens, greedy, no EOS; gkv budget {args.budget}, "
            f"divide_length {args.divide_length}. Backend {jax.default_backend()}: "
            f"{jax.device_count()} x {device.device_kind}, {os.cpu_count()} CPU cores; "
            "second of two calls per row.")


# ------------------------------------------------------------------------------ main
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host-devices", type=int, default=None, metavar="N",
                        help="run on N CPU host devices (sets XLA_FLAGS before JAX starts)")
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--set", dest="overrides", nargs="*", default=[],
                        metavar="FIELD=VALUE", help="override ModelConfig fields")
    parser.add_argument("--meshes", nargs="+", default=None, metavar="DATAxMODEL",
                        help="meshes to run, e.g. 1x1 8x1 2x4 1x8, or 'auto'")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16"))
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--prompt-length", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--budget", type=int, default=None, help="gkv budget")
    parser.add_argument("--divide-length", type=int, default=None)
    parser.add_argument("--no-full", action="store_true", help="run only gkv")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and prompts")
    parser.add_argument("--dry-run", action="store_true",
                        help="build the config, the meshes and the first model; no generation")
    parser.add_argument("--results", default=None, help="append a JSON line to this file")
    args = parser.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if key != "config" and getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("batch", "prompt_length", "max_new_tokens", "budget", "divide_length"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    return args


def check_devices(args: argparse.Namespace) -> None:
    if args.host_devices is not None and jax.device_count() != args.host_devices:
        raise RuntimeError(
            f"--host-devices {args.host_devices}: JAX has {jax.device_count()} devices "
            f"(backend {jax.default_backend()}); XLA_FLAGS must be set before JAX starts, so "
            "run this file as a script")


def main(argv=None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    check_devices(args)
    name, config = build_config(args.preset, args.overrides)
    devices = jax.device_count()
    shapes = [parse_mesh(m, devices, config.num_kv_heads) for m in args.meshes]
    evictions = policies(args.budget, args.divide_length, not args.no_full)
    for data, _ in shapes:
        if data > 1 and args.batch % data:
            raise ValueError(f"--batch {args.batch}: not a multiple of data={data} (generate "
                             "would pad it with copies and the tokens/s would mix them in)")
    print(describe(name, config, args), flush=True)
    prompts = random_prompts(config, args.batch, args.prompt_length, args.seed)
    rows, reference = [], {}
    for shape in shapes:
        mesh = None if shape == (1, 1) else make_mesh(*shape)
        start = time.perf_counter()
        model = random_model(config, args.dtype, mesh, args.seed)
        jax.block_until_ready(nnx.state(model))
        split = mesh is not None and kv_heads_split(mesh, config.num_heads, config.num_kv_heads)
        print(f"mesh {shape[0]}x{shape[1]}: model built in {time.perf_counter() - start:.1f} s, "
              f"KV heads split: {split}", flush=True)
        if args.dry_run:
            continue
        for eviction in evictions:
            first, second = measure(model, eviction, prompts, args.max_new_tokens, mesh)
            if shape == (1, 1):
                reference[eviction] = second.tokens
            compared = None if shape == (1, 1) else reference.get(eviction)
            rows.append(row(shape, split, eviction, first, second, compared))
            print(f"done: {rows[-1]['mesh']} {rows[-1]['label']}: "
                  f"{rows[-1]['tokens_per_second']:.1f} tokens/s, compile "
                  f"{rows[-1]['compile_seconds_first_call']:.1f} s", flush=True)
        del model
    if args.dry_run:
        print(f"dry run: {len(shapes)} mesh(es) "
              f"{', '.join(f'{d}x{m}' for d, m in shapes)} x "
              f"{len(evictions)} policies; "
              f"{args.batch * args.max_new_tokens} tokens per call")
        return rows
    print("\n" + markdown_table(rows))
    if args.results:
        record = {"bench": "sharded_generate", "argv": sys.argv[1:] if argv is None else argv,
                  "model": name, "config": dataclasses.asdict(config), "dtype": args.dtype,
                  "batch": args.batch, "prompt_length": args.prompt_length,
                  "max_new_tokens": args.max_new_tokens, "seed": args.seed,
                  "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
                  "device_count": devices, "jax": jax.__version__, "host": platform.node(),
                  "cpus": os.cpu_count(), "rows": rows}
        with open(args.results, "a") as f:
            f.write(json.dumps(record) + "\n")
    return rows


if __name__ == "__main__":
    main()
