"""Prints a markdown table of which R1-Distill model fits which accelerator slice, from
`gkv_jax.sharding.memory.memory_plan` (shapes only: no device, no download):

    python scripts/memory_table.py [--batch 1 64] [--prompt-length 512] [--headroom 0.1]
        [--compile [--roofline] [--results benchmarks/memory_table_tpu.json]]

Each cell is the predicted GB (10^9 bytes) per device of the weights, the KV cache and the
eviction temporaries, whether that fits the device with the headroom kept free, and the
`data x model` mesh chosen for it: of the meshes whose `data` axis is at most the batch, the
fitting one with the largest `data` (the least communication), else the smallest total.

With `--compile` (needs libtpu: the `tpu` extra) every TPU cell's whole `generate` program
is also compiled for that slice on the plan's mesh (`gkv_jax.targets.compile_for`), and the
compiler's per-device total stands beside the plan's; the fit mark is then the compiler's.
Compiled cells are kept in the `--results` JSON, so a rerun compiles only what is new.
`--roofline` adds, for the gkv cells the compiler fitted, the decode step's bytes per device
(compiled alone) over the chip's published bandwidth: ESTIMATES of the step-time floor and of
the slice's tokens/s ceiling, not measurements.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

from gkv_jax.eviction import EvictionConfig
from gkv_jax.models.config import Llama3RopeScaling, ModelConfig
from gkv_jax.sharding.memory import MemoryPlan, memory_plan

GB = 10**9


def r1_distill(family: str, layers: int, hidden: int, mlp: int, heads: int, kv_heads: int,
               vocab: int) -> ModelConfig:
    """A DeepSeek-R1-Distill architecture (head dim 128, untied embeddings)."""
    llama = family == "llama"
    return ModelConfig(family=family, vocab_size=vocab, hidden_size=hidden,
                       intermediate_size=mlp, num_layers=layers, num_heads=heads,
                       num_kv_heads=kv_heads, head_dim=128, tie_word_embeddings=False,
                       qkv_bias=not llama, max_position_embeddings=131072,
                       rope_scaling=Llama3RopeScaling() if llama else None)


MODELS = {
    "R1-Distill-Qwen-1.5B": r1_distill("qwen2", 28, 1536, 8960, 12, 2, 151936),
    "R1-Distill-Qwen-7B": r1_distill("qwen2", 28, 3584, 18944, 28, 4, 152064),
    "R1-Distill-Llama-8B": r1_distill("llama", 32, 4096, 14336, 32, 8, 128256),
    "R1-Distill-Qwen-32B": r1_distill("qwen2", 64, 5120, 27648, 40, 8, 152064),
    "R1-Distill-Llama-70B": r1_distill("llama", 80, 8192, 28672, 64, 8, 128256),
}


@dataclasses.dataclass(frozen=True)
class Target:
    """An accelerator slice: `chips` devices of `memory_gb` GB each."""

    name: str
    chips: int
    memory_gb: float


# A TPU "v5p-8" slice counts TensorCores: it has 4 chips. Devices' memory as published (the
# TPU figures of `gkv_jax.targets.CHIPS`: v5e 16 GiB, v5p 95 GiB, v6e 32 GB).
TARGETS = (Target("TPU v5e-8", 8, 16 * 2**30 / 1e9), Target("TPU v5p-8", 4, 95 * 2**30 / 1e9),
           Target("TPU v6e-8", 8, 32), Target("1x H100", 1, 80), Target("8x H100", 8, 80))
COMPILE_TARGETS = {"TPU v5e-8": "v5e-8", "TPU v5p-8": "v5p-8", "TPU v6e-8": "v6e-8"}
RESULTS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "memory_table_tpu.json"
LENGTHS = (16384, 32768)  # generated tokens
BUDGET = 2048


def meshes(chips: int, batch: int) -> list[tuple[int, int]]:
    """Every (data, model) factorisation of `chips` with data <= batch (more data than
    sequences would only hold padding copies)."""
    return [(d, chips // d) for d in range(1, chips + 1) if chips % d == 0 and d <= batch]


def best_plan(config: ModelConfig, target: Target, batch: int, eviction, new_tokens: int,
              prompt_length: int, headroom: float) -> MemoryPlan:
    """The fitting plan with the largest `data` axis, else the smallest one."""
    platform = "tpu" if target.name in COMPILE_TARGETS else "gpu"
    plans = [memory_plan(config, mesh, batch, eviction, new_tokens, "bfloat16", prompt_length,
                         platform=platform) for mesh in meshes(target.chips, batch)]
    fitting = [p for p in plans if p.fits(target.memory_gb * GB, headroom)]
    if fitting:
        return max(fitting, key=lambda p: p.data)
    return min(plans, key=lambda p: p.total)


def cell(plan: MemoryPlan, target: Target, headroom: float, compiled: dict | None = None
         ) -> str:
    """"plan [compiler] fits mesh": the compiler's figure and verdict where it compiled."""
    mesh = f"{plan.data}×{plan.model}"
    if compiled is None:
        mark = "✓" if plan.fits(target.memory_gb * GB, headroom) else "✗"
        return f"{plan.total / GB:.1f} {mark} {mesh}"
    if not compiled["compiled"]:
        return f"{plan.total / GB:.1f} / refused ✗ {mesh}"
    mark = "✓" if compiled["fits"] else "✗"
    return f"{plan.total / GB:.1f} / {compiled['total_bytes'] / GB:.1f} {mark} {mesh}"


def compile_cell(config_name: str, target: Target, plan: MemoryPlan, batch: int, eviction,
                 new_tokens: int, prompt_length: int, headroom: float, results: dict,
                 results_path: pathlib.Path | None = None) -> dict:
    """The compiler's verdict on one TPU cell (`recorded` in `results`)."""
    from gkv_jax.targets import compile_for

    cache = eviction.describe() if eviction else "full"
    key = (f"{config_name}|{target.name}|batch {batch}|{cache}|{new_tokens}|prompt "
           f"{prompt_length}|{plan.data}x{plan.model}")
    def compile_it():
        report = compile_for(COMPILE_TARGETS[target.name], MODELS[config_name], batch=batch,
                             prompt_length=prompt_length, max_new_tokens=new_tokens,
                             eviction=eviction, mesh_shape=(plan.data, plan.model),
                             headroom=headroom, cost=False)
        return {"compiled": report.compiled, "error": report.error,
                "total_bytes": report.total_bytes if report.compiled else None,
                "fits": report.fits, "compile_seconds": round(report.compile_seconds, 1)}

    return recorded(key, compile_it, results, results_path)


def recorded(key: str, compile_it, results: dict, results_path: pathlib.Path | None) -> dict:
    """`results[key]`, compiled by `compile_it()` and saved first when missing (a `results`
    holding `"offline": True` never compiles: a missing cell is a KeyError)."""
    if key not in results and results.get("offline"):
        raise KeyError(f"{key} was never compiled: run python scripts/memory_table.py "
                       f"--compile --roofline")
    if key not in results:
        results[key] = compile_it()
        print(f"compiled {key}: {results[key]}", flush=True, file=sys.stderr)
        if results_path is not None:  # after each compile: an interrupted run keeps its cells
            results_path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    return results[key]


def columns() -> list[tuple[str, EvictionConfig | None, int]]:
    """(heading, eviction, new tokens) of each column."""
    gkv = EvictionConfig(policy="gkv", budget=BUDGET)
    return ([(f"gkv {BUDGET} (any length)", gkv, LENGTHS[-1])]
            + [(f"full {n // 1024}k", None, n) for n in LENGTHS])


def table(batch: int, prompt_length: int, headroom: float, results: dict | None = None,
          results_path: pathlib.Path | None = None) -> str:
    """One markdown table: a row per (model, target), a column per cache setting; with
    `results` (a dict of compiled cells, filled as it goes) the TPU cells are compiled."""
    headings = [name for name, _, _ in columns()]
    lines = [f"**batch {batch}** (GB per device, fits with {headroom:.0%} headroom, "
             "mesh data×model" + ("; TPU cells: plan / compiler" if results is not None
                                  else "") + ")", "",
             "| model | target | " + " | ".join(headings) + " |",
             "|---|---|" + "---|" * len(headings)]
    for model_name, config in MODELS.items():
        for target in TARGETS:
            cells = []
            for _, eviction, n in columns():
                plan = best_plan(config, target, batch, eviction, n, prompt_length, headroom)
                compiled = (compile_cell(model_name, target, plan, batch, eviction, n,
                                         prompt_length, headroom, results, results_path)
                            if results is not None and target.name in COMPILE_TARGETS
                            else None)
                cells.append(cell(plan, target, headroom, compiled))
            lines.append(f"| {model_name} | {target.name} ({target.chips}× "
                         f"{_memory(target)}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def step_cell(config_name: str, target: Target, plan: MemoryPlan, batch: int, eviction,
              prompt_length: int, results: dict, results_path: pathlib.Path | None) -> dict:
    """The compiled decode step's bytes per device (its weights and cache: what a step
    must read at least once), from `results` when already compiled."""
    from gkv_jax.targets import compile_for

    key = (f"step|{config_name}|{target.name}|batch {batch}|{eviction.describe()}|prompt "
           f"{prompt_length}|{plan.data}x{plan.model}")
    def compile_it():
        report = compile_for(COMPILE_TARGETS[target.name], MODELS[config_name], batch=batch,
                             prompt_length=prompt_length, max_new_tokens=LENGTHS[-1],
                             eviction=eviction, mesh_shape=(plan.data, plan.model),
                             program="decode_step", cost=False)
        return {"compiled": report.compiled, "error": report.error,
                "step_bytes": report.argument_bytes if report.compiled else None}

    return recorded(key, compile_it, results, results_path)


def roofline_table(batch: int, prompt_length: int, headroom: float, results: dict,
                   results_path: pathlib.Path | None = None) -> str:
    """ESTIMATES for the gkv cells the compiler fitted: the decode step's compiled bytes per
    device over the chip's published HBM bandwidth, a floor on the step time and a
    ceiling on the slice's tokens/s."""
    from gkv_jax.targets import get_target

    gkv = EvictionConfig(policy="gkv", budget=BUDGET)
    lines = [f"**Roofline estimates, gkv {BUDGET}, batch {batch}** (ESTIMATES from the "
             "compiler, not measurements: a decode step reads at least its weights and "
             "cache once, so it takes at least their bytes over the HBM bandwidth)", "",
             "| model | target | mesh | step bytes per device | step ≥ (ms) | "
             "tokens/s ≤ (slice) |", "|---|---|---|---:|---:|---:|"]
    for model_name, config in MODELS.items():
        for target in TARGETS:
            if target.name not in COMPILE_TARGETS:
                continue
            plan = best_plan(config, target, batch, gkv, LENGTHS[-1], prompt_length, headroom)
            whole = compile_cell(model_name, target, plan, batch, gkv, LENGTHS[-1],
                                 prompt_length, headroom, results, results_path)
            if not whole["fits"]:
                continue
            step = step_cell(model_name, target, plan, batch, gkv, prompt_length, results,
                             results_path)
            if not step["compiled"]:
                continue
            gbps = get_target(COMPILE_TARGETS[target.name]).figures.device_gbps
            floor = step["step_bytes"] / (gbps * 1e9)
            lines.append(f"| {model_name} | {target.name} | {plan.data}×{plan.model} | "
                         f"{step['step_bytes'] / GB:.2f} GB | {floor * 1e3:.2f} | "
                         f"{batch / floor:,.0f} |")
    return "\n".join(lines)


def _memory(target: Target) -> str:
    gib = target.memory_gb * GB / 2**30
    return f"{gib:.0f} GiB" if abs(gib - round(gib)) < 1e-9 else f"{target.memory_gb:g} GB"


def render(batches, prompt_length: int, headroom: float, results: dict | None = None,
           results_path: pathlib.Path | None = None, roofline: bool = False) -> str:
    """What the script prints: the header line, a table per batch, and the roofline
    estimates (with `results` and `roofline`)."""
    text = (f"bfloat16 weights and cache, prompt {prompt_length} tokens; gkv: budget "
            f"{BUDGET}, divide_length 128, window 16, XLA reference scoring.\n\n")
    text += "\n\n".join(table(b, prompt_length, headroom, results, results_path)
                        for b in batches)
    if results is not None and roofline:
        text += "\n\n" + "\n\n".join(roofline_table(b, prompt_length, headroom, results,
                                                      results_path) for b in batches)
    return text


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--prompt-length", type=int, default=512)
    parser.add_argument("--headroom", type=float, default=0.1)
    parser.add_argument("--compile", action="store_true",
                        help="also compile every TPU cell (needs libtpu)")
    parser.add_argument("--roofline", action="store_true",
                        help="with --compile: also the decode step's roofline estimates")
    parser.add_argument("--results", type=pathlib.Path, default=RESULTS,
                        help="JSON of compiled cells, read and extended")
    args = parser.parse_args(argv)
    results = None
    if args.compile:
        results = json.loads(args.results.read_text()) if args.results.exists() else {}
    print(render(args.batch, args.prompt_length, args.headroom, results, args.results,
                 args.roofline))


if __name__ == "__main__":
    main()
