"""The slot engine against static `generate` batches: the same requests, the same slots.

Static path: the requests sorted by prompt length and cut into batches of `--slots` rows
within one prompt bucket (as `evaluate` planned its batches before the engine); each batch
is one `generate` call that runs until its longest row ends (its max_new_tokens is the
largest of its rows' limits; each row is then cut to its own limit, which leaves its tokens
unchanged: a row's token j never depends on how long the batch runs). Engine: one
`gkv_jax.Engine` with `--slots` slots, every request submitted with its own limit. Both run
once to compile, then are timed (`--repeats` interleaved runs each, the median reported);
the tokens of every request must be identical.

Mixes (long-tailed, as reasoning traces are):
  lognormal  the bundled model on held-out table-walk problems (greedy), each request's
             max_new_tokens drawn from a lognormal with median 9,000 and log-sigma 0.55
             capped at 32,768 (the shape of R1-Distill-Qwen-7B's AIME24 traces: mean about
             10k tokens, a few at the cap), scaled by the model's cap / 32,768.
  eos        EOS-driven lengths: a random-weights model of the bundled model's widths with a
             vocabulary of 256, sampled at temperature 1: it stops at its EOS after a
             geometric number of tokens (mean about the vocabulary), capped at --cap.
Shapes: `bundled` (the bundled model: 2 layers, D 64; lognormal mix), `r1-1.5b-4l`
(R1-Distill-Qwen-1.5B widths, 4 layers, random float32 weights; lognormal lengths) and
`r1-1.5b` (the whole R1-Distill-Qwen-1.5B preset, random weights in `--dtype`: the device
check's engine stage).

Reported per (shape, mix, path): useful tokens (generated tokens of all requests), wall
seconds, useful tokens/s, occupancy (decode steps that produced a request's token / slot
steps run), programs compiled, and the engine / static throughput ratio.

Usage:
  python benchmarks/engine_bench.py                       # both mixes, bundled shape
  python benchmarks/engine_bench.py --shape r1-1.5b-4l --requests 32 --cap 128
  python benchmarks/engine_bench.py --quick               # seconds: a smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import gkv_jax
from gkv_jax import Engine, EvictionConfig, generate
from gkv_jax.datasets import synthetic_examples
from gkv_jax.evaluation import format_prompt
from gkv_jax.generation_inputs import bucket_length
from gkv_jax.loading import bundled_model_dir
from gkv_jax.models import Transformer, preset

LOGNORMAL_MEDIAN, LOGNORMAL_SIGMA, R1_CAP = 9000, 0.55, 32768


def lognormal_limits(count: int, cap: int, seed: int) -> list[int]:
    """Per-request max_new_tokens: the R1 trace-length lognormal, scaled to `cap`."""
    rng = np.random.default_rng(seed)
    lengths = np.minimum(rng.lognormal(np.log(LOGNORMAL_MEDIAN), LOGNORMAL_SIGMA, count),
                         R1_CAP)
    return [max(1, int(round(n * cap / R1_CAP))) for n in lengths]


def workload(shape: str, mix: str, requests: int, cap: int, seed: int,
             dtype: str = "float32"):
    """(model, eviction, requests as dicts of prompt / max_new_tokens / seed / temperature,
    eos ids)."""
    bundled, tokenizer = gkv_jax.load(bundled_model_dir(), dtype="float32")
    if shape == "bundled" and mix == "lognormal":
        model = bundled
        prompts = [format_prompt(e, tokenizer) for e in synthetic_examples(requests)]
        limits, temperature, eos = lognormal_limits(requests, cap, seed), 0.0, None
    else:
        if shape == "bundled":
            config = _with(bundled.config, vocab_size=256)
        elif shape == "r1-1.5b-4l":
            config = _with(preset("deepseek-r1-distill-qwen-1.5b"), num_layers=4,
                           max_position_embeddings=4096)
        else:
            config = _with(preset("deepseek-r1-distill-qwen-1.5b"),
                           max_position_embeddings=cap + 256)
        model = Transformer(config, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(seed))
        rng = np.random.default_rng(seed)
        prompts = [rng.integers(3, min(config.vocab_size, 256), int(n)).tolist()
                   for n in rng.integers(20, 60, requests)]
        if mix == "eos":
            limits, temperature, eos = [cap] * requests, 1.0, [2]
        else:
            limits, temperature, eos = lognormal_limits(requests, cap, seed), 0.0, []
    eviction = EvictionConfig("gkv", budget=136, window=16, divide_length=16)
    items = [dict(prompt=p, max_new_tokens=m, seed=i, temperature=temperature)
             for i, (p, m) in enumerate(zip(prompts, limits, strict=True))]
    return model, eviction, items, eos


def _with(config, **changes):
    return dataclasses.replace(config, **changes)


def run_static(model, eviction, items, eos, slots: int) -> tuple[dict, dict]:
    """The static batches; returns ({request index: tokens}, stats)."""
    order = sorted(range(len(items)), key=lambda i: (len(items[i]["prompt"]), i))
    groups: dict[int, list[int]] = {}
    for i in order:
        groups.setdefault(bucket_length(len(items[i]["prompt"]), None), []).append(i)
    batches = [chunk[k:k + slots] for chunk in groups.values()
               for k in range(0, len(chunk), slots)]
    tokens, slot_steps, programs = {}, 0, set()
    start = time.perf_counter()
    for batch in batches:
        limit = max(items[i]["max_new_tokens"] for i in batch)
        out = generate(model, [items[i]["prompt"] for i in batch], eviction=eviction,
                       max_new_tokens=limit, seed=[items[i]["seed"] for i in batch],
                       temperature=items[batch[0]]["temperature"], eos_token_id=eos)
        programs.add((len(batch), out.stats["prompt_bucket"], limit))
        slot_steps += len(batch) * (out.stats["forwards"] - 1)
        for row, i in enumerate(batch):
            tokens[i] = out.tokens[row][:items[i]["max_new_tokens"]]
    seconds = time.perf_counter() - start
    return tokens, dict(seconds=seconds, slot_steps=slot_steps, programs=len(programs))


def run_engine(model, eviction, items, eos, slots: int) -> tuple[dict, dict]:
    engine = Engine(model, eviction=eviction, slots=slots,
                    max_new_tokens=max(i["max_new_tokens"] for i in items),
                    max_prompt_length=max(len(i["prompt"]) for i in items), eos_token_id=eos)
    ids = [engine.submit(**item) for item in items]
    start = time.perf_counter()
    outputs = engine.run()
    seconds = time.perf_counter() - start
    stats = engine.stats
    return ({k: outputs[i].tokens for k, i in enumerate(ids)},
            dict(seconds=seconds, slot_steps=stats["slot_steps"],
                 programs=stats["compiled_programs"], prefills=stats["prefills"]))


def measure(shape: str, mix: str, args) -> list[dict]:
    """Both paths on one workload (`args`: requests, cap, seed, slots, dtype); two rows."""
    model, eviction, items, eos = workload(shape, mix, args.requests, args.cap, args.seed,
                                           getattr(args, "dtype", "float32"))
    rows = []
    results = {}
    paths = (("static", run_static), ("engine", run_engine))
    for _, run in paths:
        run(model, eviction, items, eos, args.slots)  # compile and warm up
    timed = {path: [] for path, _ in paths}
    for _ in range(getattr(args, "repeats", 1)):  # interleaved: drifts hit both paths alike
        for path, run in paths:
            timed[path].append(run(model, eviction, items, eos, args.slots))
    for path, _ in paths:
        runs = sorted(timed[path], key=lambda r: r[1]["seconds"])
        tokens, stats = runs[len(runs) // 2]  # the median run
        results[path] = tokens
        useful = sum(len(t) for t in tokens.values())
        decode_steps = sum(max(len(t) - 1, 0) for t in tokens.values())
        rows.append(dict(shape=shape, mix=mix, path=path, slots=args.slots,
                         requests=len(items), useful_tokens=useful,
                         mean_length=useful / len(items),
                         max_length=max(len(t) for t in tokens.values()),
                         seconds=stats["seconds"], tokens_per_second=useful / stats["seconds"],
                         occupancy=decode_steps / max(stats["slot_steps"], 1),
                         programs=stats["programs"]))
    same = all(results["static"][k] == results["engine"][k] for k in results["static"])
    ratio = rows[1]["tokens_per_second"] / rows[0]["tokens_per_second"]
    for row in rows:
        row.update(identical_tokens=same, engine_over_static=ratio)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| shape | mix | path | requests | mean / max length | useful tokens | s | tok/s "
             "| occupancy | programs | engine / static | identical |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['mix']} | {r['path']} | {r['requests']} | "
                     f"{r['mean_length']:.0f} / {r['max_length']} | {r['useful_tokens']} | "
                     f"{r['seconds']:.2f} | {r['tokens_per_second']:.0f} | "
                     f"{r['occupancy']:.1%} | {r['programs']} | "
                     f"{r['engine_over_static']:.2f}x | {r['identical_tokens']} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=("bundled", "r1-1.5b-4l", "r1-1.5b"),
                        default="bundled")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="weights of the random-weights shapes")
    parser.add_argument("--mix", choices=("lognormal", "eos", "all"), default="all")
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--requests", type=int, default=512,
                        help="requests per mix (an AIME-sized pass@16 run is 480)")
    parser.add_argument("--cap", type=int, default=520, help="longest request (tokens)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed runs of each path, interleaved; the median is reported")
    parser.add_argument("--quick", action="store_true", help="16 requests, cap 64")
    parser.add_argument("--json", default=None, help="append the rows to this JSON-lines file")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.cap = 16, 64
    mixes = ("lognormal", "eos") if args.mix == "all" else (args.mix,)
    print(f"# {platform.node()} {jax.devices()[0].device_kind}, jax {jax.__version__}, "
          f"python {sys.version.split()[0]}; {' '.join(sys.argv)}")
    rows = [row for mix in mixes for row in measure(args.shape, mix, args)]
    print(markdown(rows))
    if args.json:
        with open(args.json, "a") as f:
            for row in rows:
                f.write(json.dumps({"bench": "engine", **row}) + "\n")


if __name__ == "__main__":
    main()
