"""Decode speed on one accelerator: `generate` at R1-Distill-Qwen-1.5B, `full` vs gkv, against
the memory-bandwidth roofline and `transformers` on the same device.

The device check's decode stage (`benchmarks/device_check.py` runs it; `python
benchmarks/decode_device_bench.py [--dry-run]` runs it alone and prints JSON):

  rows         `generate` on the whole 28-layer R1-Distill-Qwen-1.5B preset (random bfloat16
               weights), a 64-token random prompt, greedy, `eos_token_id=[]` (every row
               generates exactly max_new_tokens), batch 1 and 64, `full` and gkv budget 2048
               (window 16, divide_length 128), 4,096 and 16,384 new tokens, plus gkv with
               the other eviction implementation (the Pallas kernels vs the XLA reference)
               at batch 64 and 4,096. Rows run most important first (`rows_in_order`): the
               targets' rows and the full row transformers is compared with, then the
               comparison, then the rest.
               One `generate` call per row: `generate` compiles ahead of time and reports
               compile and run seconds apart, and a run of thousands of steps dwarfs any
               first-run cost.
  roofline     bytes one decode step must read (`generate_bench.bytes_per_step`: every weight
               but the untied embedding, plus the KV slots attention reads: budget +
               divide_length for gkv, prompt + max_new_tokens / 2 for `full`) / step
               seconds / the device's peak bandwidth (`PEAK_BANDWIDTH_GBPS` by device kind;
               for a kind not in the table, a measured jitted copy of a large array).
  transformers `transformers.Qwen2ForCausalLM` with the same architecture (all layers, random
               bfloat16 weights, sdpa attention, its default dynamic cache), greedy
               `generate` on the same device: only where torch sees that device (CUDA for a
               GPU backend; the CPU in the dry run), else {"skipped": reason}. Its decode step
               = (time of M2 new tokens - time of M1) / (M2 - M1), with the prompt chosen so
               the mean context of those steps equals that of our `full` row at the same
               batch and the shortest length; compared with that row's step time.

Every row carries a time estimate (`estimate_row_seconds`); a row that would overrun the
caller's deadline is recorded as {"skipped": "time budget"} instead of run.

`--dry-run` (CPU): the same code at tiny sizes (1 layer, hidden 64, vocab 256, 48 new tokens,
batch 2, gkv budget 32: the rows the targets read, one batch and one length, so the speed
ratio's and the roofline's rows coincide in shape); its numbers only show that the code
works.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import generate_bench  # noqa: E402  (a sibling script, not a package)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from gkv_jax.eviction import EvictionConfig  # noqa: E402
from gkv_jax.generation import generate  # noqa: E402
from gkv_jax.models import ModelConfig, Transformer  # noqa: E402
from gkv_jax.pallas_kernels import resolve_implementation  # noqa: E402

# Peak HBM bandwidth in GB/s (vendor specs), by a lower-case substring of the device kind;
# the first match wins, so the specific parts come before the generic name.
PEAK_BANDWIDTH_GBPS: tuple[tuple[str, float], ...] = (
    ("h200", 4800.0),
    ("h100 pcie", 2000.0),
    ("h100 nvl", 3900.0),
    ("h100", 3350.0),  # SXM
    ("v5 lite", 819.0), ("v5e", 819.0),
    ("v5p", 2765.0),
    ("v6 lite", 1640.0), ("v6e", 1640.0),
)
KIND_EXACT_GBPS = {"tpu v5": 2765.0}  # JAX names a v5p "TPU v5"


@dataclasses.dataclass(frozen=True)
class Sizes:
    """One mode's decode sizes."""

    preset: str | None
    overrides: tuple[str, ...]
    dtype: str
    prompt_length: int
    budget: int
    divide_length: int
    batches: tuple[int, ...]       # the smallest gives the roofline row
    lengths: tuple[int, ...]       # max_new_tokens; the largest gives the speed-ratio row
    torch_batches: tuple[int, ...]
    torch_new_tokens: tuple[int, int]  # (M1, M2): two generate calls, the step is the slope
    copy_bytes: int                # the measured-bandwidth copy
    whole_grid: bool               # every (batch, length, policy) and the other eviction
                                   # implementation; else only the rows the targets and the
                                   # transformers comparison read
    # time-estimate defaults until a row of the same policy has been measured
    compile_seconds: float
    step_overhead_seconds: float
    bandwidth_efficiency: float
    transformers_seconds: float    # the whole transformers comparison


DEVICE = Sizes(
    preset="deepseek-r1-distill-qwen-1.5b", overrides=(), dtype="bfloat16", prompt_length=64,
    budget=2048, divide_length=128, batches=(1, 64), lengths=(4096, 16384),
    torch_batches=(1, 64), torch_new_tokens=(16, 144), copy_bytes=1 << 30, whole_grid=True,
    compile_seconds=40.0, step_overhead_seconds=3e-4, bandwidth_efficiency=0.5,
    transformers_seconds=60.0)
DRY_RUN = Sizes(
    preset=None, overrides=("num_layers=1", "hidden_size=64", "intermediate_size=128",
                            "num_heads=2", "num_kv_heads=1", "head_dim=32", "vocab_size=256"),
    dtype="float32", prompt_length=8, budget=32, divide_length=16, batches=(2,),
    lengths=(48,), torch_batches=(2,), torch_new_tokens=(2, 6), copy_bytes=1 << 24,
    whole_grid=False, compile_seconds=3.0, step_overhead_seconds=1e-3,
    bandwidth_efficiency=0.5, transformers_seconds=20.0)


# ------------------------------------------------------------------------------ rows
def rows_in_order(sizes: Sizes, kernels_by_default: bool
                  ) -> tuple[list[generate_bench.Run], list[generate_bench.Run]]:
    """(first, rest): the rows that run before the transformers comparison, most important
    first, and those after it.

    First: the speed ratio's pair (largest batch and length, gkv then full), the roofline's
    row (smallest batch, shortest length, full) and the full row transformers is compared
    with at the largest batch. Rest (with `sizes.whole_grid`): gkv at the largest batch and
    shortest length, then with the other eviction implementation (the Pallas kernels when
    implementation=None runs the XLA reference here, `kernels_by_default` False, else the
    reference), then the other cells of batches x lengths x {full, gkv}.
    """
    small, large = min(sizes.batches), max(sizes.batches)
    short, long = min(sizes.lengths), max(sizes.lengths)
    full = EvictionConfig(policy="full")
    gkv = EvictionConfig(policy="gkv", budget=sizes.budget, divide_length=sizes.divide_length)
    other = dataclasses.replace(gkv, implementation="xla" if kernels_by_default else "pallas")
    Run = generate_bench.Run
    first = list(dict.fromkeys([  # without repeats (one batch or one length)
        Run(large, long, gkv), Run(large, long, full), Run(small, short, full),
        Run(large, short, full)]))
    if not sizes.whole_grid:
        return first, []
    grid = [Run(large, short, gkv), Run(large, short, other)] + [
        Run(b, n, e) for b in sorted(sizes.batches) for n in sorted(sizes.lengths)
        for e in (gkv, full)]
    return first, [run for run in dict.fromkeys(grid) if run not in first]


def implementation_name(eviction: EvictionConfig) -> str:
    """"xla" or "pallas": what the eviction runs here ("xla" for `full`, which never evicts)."""
    if not eviction.evicts:
        return "xla"
    return "pallas" if resolve_implementation(eviction.implementation).use_pallas else "xla"


def describe_run(run: generate_bench.Run) -> dict[str, Any]:
    return {"batch": run.batch, "max_new_tokens": run.max_new_tokens,
            "policy": run.eviction.policy, "label": run.label,
            "implementation": implementation_name(run.eviction),
            "eviction": run.eviction.describe()}


# ------------------------------------------------------------------------------ bandwidth
def table_bandwidth_gbps(device_kind: str) -> float | None:
    """The peak bandwidth of a known device kind, None for one not in the table."""
    kind = device_kind.lower().strip()
    if kind in KIND_EXACT_GBPS:
        return KIND_EXACT_GBPS[kind]
    for pattern, gbps in PEAK_BANDWIDTH_GBPS:
        if pattern in kind:
            return gbps
    return None


def copy_bandwidth_gbps(num_bytes: int, repeats: int = 5) -> float:
    """GB/s of a jitted elementwise copy of a `num_bytes` float32 array (read + write)."""
    source = jnp.zeros((num_bytes // 4,), jnp.float32)
    copy = jax.jit(lambda x: x + 1.0)
    jax.block_until_ready(copy(source))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(copy(source))
        best = min(best, time.perf_counter() - start)
    return 2 * num_bytes / best / 1e9


def peak_bandwidth(device_kind: str, copy_bytes: int) -> dict[str, Any]:
    gbps = table_bandwidth_gbps(device_kind)
    if gbps is not None:
        return {"gbps": gbps, "source": f"spec table ({device_kind})"}
    return {"gbps": copy_bandwidth_gbps(copy_bytes),
            "source": f"measured: jitted copy of {copy_bytes / 2**20:.0f} MiB "
                      f"({device_kind} is not in the table)"}


# ------------------------------------------------------------------------------ estimates
@dataclasses.dataclass
class Calibration:
    """What the time estimates learn from measured rows, per policy: the last compile time
    and measured / modelled run time."""

    compile_seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    run_scale: dict[str, float] = dataclasses.field(default_factory=dict)

    def learn(self, policy: str, compile_seconds: float, run_seconds: float,
              modelled_run_seconds: float) -> None:
        self.compile_seconds[policy] = compile_seconds
        if modelled_run_seconds > 0:
            self.run_scale[policy] = min(10.0, max(0.2, run_seconds / modelled_run_seconds))


def modelled_run_seconds(config: ModelConfig, itemsize: int, run: generate_bench.Run,
                         sizes: Sizes, bandwidth_gbps: float) -> float:
    """Forwards x (per-step overhead + modelled bytes / (efficiency x bandwidth))."""
    traffic = generate_bench.bytes_per_step(config, itemsize, run, sizes.prompt_length)
    step = sizes.step_overhead_seconds + (traffic["weight_bytes"] + traffic["kv_bytes"]) / (
        sizes.bandwidth_efficiency * bandwidth_gbps * 1e9)
    return run.max_new_tokens * step


def estimate_row_seconds(config: ModelConfig, itemsize: int, run: generate_bench.Run,
                         sizes: Sizes, bandwidth_gbps: float, calibration: Calibration
                         ) -> float:
    policy = run.eviction.policy
    compile_seconds = calibration.compile_seconds.get(policy, sizes.compile_seconds)
    scale = calibration.run_scale.get(policy, 1.0)
    return compile_seconds + scale * modelled_run_seconds(config, itemsize, run, sizes,
                                                          bandwidth_gbps)


# ------------------------------------------------------------------------------ measuring
def build_model(sizes: Sizes) -> tuple[str, ModelConfig, Transformer]:
    name, config = generate_bench.build_config(sizes.preset, list(sizes.overrides))
    model = Transformer(config, dtype=getattr(jnp, sizes.dtype), rngs=nnx.Rngs(0))
    return name, config, model


def measure_row(model: Transformer, config: ModelConfig, run: generate_bench.Run,
                sizes: Sizes, bandwidth_gbps: float) -> dict[str, Any]:
    """One `generate` call: speed, cache, and the roofline fraction."""
    prompts = generate_bench.random_prompts(config, run.batch, sizes.prompt_length, 0)
    stats = generate(model, prompts, eviction=run.eviction, max_new_tokens=run.max_new_tokens,
                     eos_token_id=[]).stats
    expected = run.batch * run.max_new_tokens
    if stats["generated_tokens"] != expected:
        raise RuntimeError(f"{run.label}: generated {stats['generated_tokens']} tokens, "
                           f"expected {expected}")
    itemsize = jnp.dtype(sizes.dtype).itemsize
    traffic = generate_bench.bytes_per_step(config, itemsize, run, sizes.prompt_length)
    step_seconds = stats["run_seconds"] / stats["forwards"]
    moved = traffic["weight_bytes"] + traffic["kv_bytes"]
    return {"prompt_length": sizes.prompt_length,
            "mean_context": sizes.prompt_length + run.max_new_tokens / 2,
            "tokens_per_second": stats["tokens_per_second"],
            "step_seconds": step_seconds, "run_seconds": stats["run_seconds"],
            "forwards": stats["forwards"],
            "compile_seconds_first_call": stats["compile_seconds"],
            "cache_bytes": stats["cache_bytes"], "full_cache_bytes": stats["full_cache_bytes"],
            "capacity": stats["capacity"], "compressions": stats["compressions"], **traffic,
            "roofline_gbps": bandwidth_gbps,
            "roofline_fraction": moved / step_seconds / (bandwidth_gbps * 1e9),
            "peak_bytes_in_use": peak_bytes_in_use()}


def peak_bytes_in_use() -> int | None:
    """The device's peak bytes in use so far in this process (None where not reported,
    as on the CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def decode_rows(runs: list[generate_bench.Run], sizes: Sizes, model: Transformer,
                config: ModelConfig, bandwidth_gbps: float, calibration: Calibration,
                remaining: Callable[[], float], log: Callable[[str], None]
                ) -> list[dict[str, Any]]:
    """`runs` in order; a row whose estimate exceeds `remaining()` seconds is skipped."""
    itemsize = jnp.dtype(sizes.dtype).itemsize
    rows = []
    for run in runs:
        entry = describe_run(run)
        estimate = estimate_row_seconds(config, itemsize, run, sizes, bandwidth_gbps,
                                        calibration)
        entry["estimated_seconds"] = round(estimate, 1)
        left = remaining()
        if estimate > left:
            entry.update(skipped="time budget", remaining_seconds=round(left, 1))
            log(f"decode batch {run.batch}, {run.max_new_tokens} tokens, {run.label}: "
                f"skipped (estimate {estimate:.0f} s > {left:.0f} s left)")
            rows.append(entry)
            continue
        try:
            entry.update(measure_row(model, config, run, sizes, bandwidth_gbps))
            calibration.learn(run.eviction.policy, entry["compile_seconds_first_call"],
                              entry["run_seconds"],
                              modelled_run_seconds(config, itemsize, run, sizes,
                                                   bandwidth_gbps))
            done = (f"{entry['tokens_per_second']:.1f} tokens/s, step "
                    f"{1e3 * entry['step_seconds']:.2f} ms, roofline "
                    f"{100 * entry['roofline_fraction']:.0f}%, compile "
                    f"{entry['compile_seconds_first_call']:.1f} s")
        except Exception as error:  # a row that fails (e.g. out of memory) is a result too
            entry["error"] = describe_error(error)
            done = f"error: {entry['error'].splitlines()[-1][:200]}"
        rows.append(entry)
        log(f"decode batch {run.batch}, {run.max_new_tokens} tokens, {run.label} "
            f"({entry['implementation']}): {done}")
    return rows


def describe_error(error: Exception) -> str:
    import traceback

    return "".join(traceback.format_exception_only(type(error), error)).strip()[-2000:]


# ------------------------------------------------------------------------------ transformers
def torch_device(backend: str) -> tuple[str | None, str]:
    """(torch device, None's reason): torch must see the device JAX runs on."""
    if backend not in ("gpu", "cpu"):
        return None, f"no torch device for the {backend} backend"
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as error:
        return None, f"torch / transformers not importable: {error}"
    if backend == "cpu":
        return "cpu", ""
    if not torch.cuda.is_available():
        return None, f"torch {torch.__version__} sees no CUDA device"
    return "cuda", ""


def hf_model(config: ModelConfig, dtype: str, device: str):
    """A random-weights `transformers` Qwen2 model with `config`'s architecture, on `device`."""
    import torch
    import transformers

    if config.family != "qwen2" or config.rope_scaling is not None:
        raise ValueError(f"the transformers comparison builds Qwen2 models, got {config.family}")
    hf_config = transformers.Qwen2Config(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim, rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta, max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings, bos_token_id=None, eos_token_id=None,
        pad_token_id=None, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.Qwen2ForCausalLM(hf_config)
    return model.to(getattr(torch, dtype)).eval()


def torch_generate_seconds(model, batch: int, prompt_length: int, new_tokens: int,
                           device: str) -> float:
    """Seconds of one greedy `generate` of exactly `new_tokens` tokens per row."""
    import torch

    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, vocab, (batch, prompt_length), generator=generator).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             eos_token_id=None, pad_token_id=0)
    sync()
    seconds = time.perf_counter() - start
    if out.shape != (batch, prompt_length + new_tokens):
        raise RuntimeError(f"transformers generated {tuple(out.shape)}, expected "
                           f"{(batch, prompt_length + new_tokens)}")
    return seconds


def comparable_row(ours: list[dict[str, Any]], batch: int, sizes: Sizes
                   ) -> dict[str, Any] | None:
    """Our `full` row at `batch` and the shortest length (None if it did not run)."""
    for row in ours:
        if (row["batch"] == batch and row["policy"] == "full"
                and row["max_new_tokens"] == min(sizes.lengths) and "step_seconds" in row):
            return row
    return None


def transformers_comparison(sizes: Sizes, config: ModelConfig, ours: list[dict[str, Any]],
                            backend: str, remaining: Callable[[], float],
                            log: Callable[[str], None]) -> dict[str, Any]:
    """transformers' decode step time next to ours, or {"skipped": reason}."""
    if sizes.transformers_seconds > remaining():
        log("transformers: skipped (time budget)")
        return {"skipped": "time budget", "estimated_seconds": sizes.transformers_seconds}
    device, reason = torch_device(backend)
    if device is None:
        log(f"transformers: skipped ({reason})")
        return {"skipped": reason}
    import torch

    m1, m2 = sizes.torch_new_tokens
    mean_new = (m1 + m2) / 2
    result: dict[str, Any] = {
        "device": device, "torch": torch.__version__,
        "model": (f"transformers.Qwen2ForCausalLM, our config's architecture "
                  f"({config.num_layers} layers), random {sizes.dtype} weights, sdpa"),
        "method": (f"greedy generate with the default dynamic cache, {m1} and {m2} new tokens "
                   f"after a warm-up call; step = (t({m2}) - t({m1})) / {m2 - m1}; the prompt "
                   "length makes the mean context of those steps equal our full row's at the "
                   "same batch and the shortest length"),
        "rows": []}
    start = time.perf_counter()
    try:
        import transformers

        result["transformers"] = transformers.__version__
        model = hf_model(config, sizes.dtype, device)
    except Exception as error:
        result["error"] = describe_error(error)
        log(f"transformers: error building the model: {result['error'].splitlines()[-1]}")
        return result
    result["build_seconds"] = round(time.perf_counter() - start, 2)
    for batch in sizes.torch_batches:
        context = sizes.prompt_length + min(sizes.lengths) / 2
        prompt_length = max(1, round(context - mean_new))
        entry: dict[str, Any] = {"batch": batch, "prompt_length": prompt_length,
                                 "mean_context": prompt_length + mean_new,
                                 "new_tokens": [m1, m2]}
        try:
            torch_generate_seconds(model, batch, prompt_length, m1, device)  # warm-up
            t1 = torch_generate_seconds(model, batch, prompt_length, m1, device)
            t2 = torch_generate_seconds(model, batch, prompt_length, m2, device)
            entry["step_seconds"] = max(t2 - t1, 0.0) / (m2 - m1)
            entry["seconds"] = [t1, t2]
            ours_row = comparable_row(ours, batch, sizes)
            if ours_row is not None and entry["step_seconds"] > 0:
                entry["ours_step_seconds"] = ours_row["step_seconds"]
                entry["ours_mean_context"] = ours_row["mean_context"]
                entry["speedup"] = entry["step_seconds"] / ours_row["step_seconds"]
            done = (f"step {1e3 * entry['step_seconds']:.2f} ms, ours "
                    + (f"{entry['speedup']:.2f}x faster" if "speedup" in entry
                       else "not measured"))
        except Exception as error:
            entry["error"] = describe_error(error)
            done = f"error: {entry['error'].splitlines()[-1][:200]}"
        result["rows"].append(entry)
        log(f"transformers batch {batch}, context {entry['mean_context']:.0f}: {done}")
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


# ------------------------------------------------------------------------------ stage
def decode_stage(dry_run: bool, remaining: Callable[[], float],
                 log: Callable[[str], None] = print, transformers: bool = True
                 ) -> dict[str, Any]:
    """The decode stage: setup, the first rows, the transformers comparison, the rest."""
    sizes = DRY_RUN if dry_run else DEVICE
    start = time.perf_counter()
    name, config, model = build_model(sizes)
    device_kind = jax.devices()[0].device_kind
    bandwidth = peak_bandwidth(device_kind, sizes.copy_bytes)
    setup = {"model": name, "layers": config.num_layers, "hidden_size": config.hidden_size,
             "parameters": config.num_parameters(), "dtype": sizes.dtype,
             "weights": "random", "prompt_length": sizes.prompt_length,
             "budget": sizes.budget, "divide_length": sizes.divide_length,
             "peak_bandwidth": bandwidth,
             "build_seconds": round(time.perf_counter() - start, 2)}
    log(f"decode: built {name} ({config.num_parameters() / 1e6:.1f} M parameters) in "
        f"{setup['build_seconds']:.1f} s; peak bandwidth {bandwidth['gbps']:.0f} GB/s "
        f"({bandwidth['source']})")
    first, rest = rows_in_order(sizes, resolve_implementation(None).use_pallas)
    calibration = Calibration()
    rows = decode_rows(first, sizes, model, config, bandwidth["gbps"], calibration,
                       remaining, log)
    comparison = (transformers_comparison(sizes, config, rows, jax.default_backend(),
                                          remaining, log)
                  if transformers else {"skipped": "not requested"})
    rows += decode_rows(rest, sizes, model, config, bandwidth["gbps"], calibration,
                        remaining, log)
    estimates = against_reports(list(zip(first + rest, rows, strict=True)), config, sizes,
                                remaining, log)
    return {"setup": setup, "rows": rows, "transformers": comparison,
            "against_reports": estimates}


def report_rows(pairs: list[tuple[generate_bench.Run, dict[str, Any]]]
                ) -> list[tuple[generate_bench.Run, dict[str, Any]]]:
    """The measured rows compared with a compiler report: the smallest batch's longest
    full-cache row and the largest batch's longest gkv row (at most two compiles)."""
    ran = [(run, row) for run, row in pairs if "step_seconds" in row]
    chosen = []
    for policy, pick in (("full", min), ("gkv", max)):
        rows = [(run, row) for run, row in ran if run.eviction.policy == policy]
        if rows:
            batch = pick(run.batch for run, _ in rows)
            chosen.append(max(((run, row) for run, row in rows if run.batch == batch),
                              key=lambda pair: pair[0].max_new_tokens))
    return chosen


def against_reports(pairs: list[tuple[generate_bench.Run, dict[str, Any]]],
                    config: ModelConfig, sizes: Sizes, remaining: Callable[[], float],
                    log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Each chosen measured row beside `compile_for("attached", ...)`'s report of the same
    `generate` program: the compiler's memory per device against the device's peak bytes
    in use, and the report's ESTIMATED step floor (step bytes / published bandwidth)
    against the measured step."""
    from gkv_jax.targets import compile_for, get_target

    # The step floor needs the chip's published bandwidth; without it (a CPU) the cost
    # analysis' extra compiles would estimate nothing.
    cost = get_target("attached").figures.hbm_gbps > 0
    out = []
    for run, row in report_rows(pairs):
        entry = describe_run(run)
        needed = 3 * row["compile_seconds_first_call"] + 10  # generate, a step, an evict
        if needed > remaining():
            out.append({**entry, "skipped": "time budget"})
            log(f"against the report, {run.label} batch {run.batch}: skipped (time budget)")
            continue
        try:
            report = compile_for("attached", config, batch=run.batch,
                                 prompt_length=sizes.prompt_length,
                                 max_new_tokens=run.max_new_tokens, eviction=run.eviction,
                                 dtype=sizes.dtype, cost=cost)
        except Exception as error:  # recorded, as a benchmark row's failure is
            out.append({**entry, "error": describe_error(error)})
            continue
        floor = report.step_seconds_floor
        entry.update(
            measured_step_seconds=row["step_seconds"],
            estimated_step_seconds_floor=floor,
            measured_over_floor=(row["step_seconds"] / floor if floor else None),
            measured_peak_bytes_in_use=row.get("peak_bytes_in_use"),
            compiler_bytes_per_device=report.total_bytes if report.compiled else None,
            compiler_error=report.error, weight_copies=len(report.weight_copies))
        out.append(entry)
        log(f"against the report, {run.label} batch {run.batch}, {run.max_new_tokens} "
            f"tokens: step measured {1e3 * row['step_seconds']:.3f} ms, estimated floor "
            + (f"{1e3 * floor:.3f} ms" if floor else "none (no published bandwidth)")
            + f"; memory: compiler {report.total_bytes / 2**30:.2f} GiB per device, "
            f"measured peak " + (f"{row['peak_bytes_in_use'] / 2**30:.2f} GiB"
                                 if row.get("peak_bytes_in_use") else "not reported"))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes (CPU)")
    parser.add_argument("--budget-seconds", type=float, default=float("inf"),
                        help="skip rows that would not finish within this many seconds")
    parser.add_argument("--no-transformers", action="store_true")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    result = decode_stage(args.dry_run,
                          lambda: args.budget_seconds - (time.perf_counter() - start),
                          lambda line: print(f"[{time.perf_counter() - start:7.1f} s] {line}",
                                             flush=True),
                          transformers=not args.no_transformers)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
