"""Cost of the exact eviction masks: the record in `generate()`, and the masked
teacher-forced forward + backward with "dense" vs "segments" attention.

1. Record overhead. `generate()` on the bundled reasoning model (held-out problems, greedy,
   float32, gkv with window 16 and divide_length 16) with and without
   `return_eviction_record=True`, interleaved, each program compiled and warmed up first;
   tokens/s is the median over `--repeats` runs of each.
2. Masked forward + backward. `jax.grad` of the summed `token_log_probs` of one sequence
   (prompt 128 tokens, T = 1k / 4k) under gkv masks replayed on random tokens, for a model
   of DeepSeek-R1-Distill-Qwen-1.5B widths (D 1536, 12 query / 2 KV heads, head dim 128, MLP
   8960) with few layers and a small vocabulary (the LM head is chunked identically in both
   and is not what differs; a 152k vocabulary would only add the same time to both). Time is
   the median of `--repeats` runs after a warm-up; memory is XLA's compiled
   `memory_analysis()` of the program (temporaries + outputs + arguments), which is what it
   allocates at its peak.
3. Memory of the record against a dense [L, K, T, T] boolean mask, for the 7B preset.

Usage:
  python benchmarks/eviction_record_bench.py --results benchmarks/results.jsonl
  python benchmarks/eviction_record_bench.py --quick        # seconds, tiny sizes
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import gkv_jax
from gkv_jax import training
from gkv_jax.datasets import load_dataset
from gkv_jax.evaluation import format_prompt
from gkv_jax.eviction import EvictionConfig
from gkv_jax.loading import bundled_model_dir
from gkv_jax.models import ModelConfig, Transformer, preset


def record_overhead(batch: int, budgets: list[int], max_new_tokens: int, repeats: int):
    model, tokenizer = gkv_jax.load(bundled_model_dir(), dtype="float32")
    prompts = [format_prompt(p, tokenizer)
               for p in load_dataset("synthetic", num_problems=batch)]
    rows = []
    for budget in budgets:
        eviction = EvictionConfig(policy="gkv", budget=budget, window=16, divide_length=16)
        speeds = {False: [], True: []}
        for flag in (False, True):  # compile and warm up
            gkv_jax.generate(model, prompts, eviction=eviction, max_new_tokens=max_new_tokens,
                             eos_token_id=[], return_eviction_record=flag)
        for _ in range(repeats):
            for flag in (False, True):
                out = gkv_jax.generate(model, prompts, eviction=eviction,
                                       max_new_tokens=max_new_tokens, eos_token_id=[],
                                       return_eviction_record=flag)
                assert out.stats["compile_seconds"] == 0.0
                speeds[flag].append(out.stats["tokens_per_second"])
        plain, recorded = statistics.median(speeds[False]), statistics.median(speeds[True])
        rows.append(dict(budget=budget, batch=batch, max_new_tokens=max_new_tokens,
                         plain_tok_s=plain, record_tok_s=recorded,
                         record_bytes=out.eviction_record.num_bytes(),
                         compressions=out.stats["compressions"],
                         plain_runs=speeds[False], record_runs=speeds[True]))
    return rows


def _memory_bytes(compiled) -> int:
    analysis = compiled.memory_analysis()
    return int(analysis.temp_size_in_bytes + analysis.output_size_in_bytes
               + analysis.argument_size_in_bytes)


def masked_backward(layers: int, vocab: int, lengths: list[int], budget: int, repeats: int,
                    widths: ModelConfig | None = None):
    base = widths or preset("deepseek-r1-distill-qwen-1.5b")
    config = ModelConfig(**{**base.__dict__, "num_layers": layers, "vocab_size": vocab,
                            "tie_word_embeddings": False})
    model = Transformer(config, dtype=jnp.float32)
    params = model.params()
    eviction = EvictionConfig(policy="gkv", budget=budget, divide_length=128)
    rows = []
    for T in lengths:
        rng = np.random.default_rng(T)
        prompt = rng.integers(0, vocab, 128).tolist()
        completion = rng.integers(0, vocab, T - 128 + 1).tolist()
        batch = training.batch_from_completions([prompt], [completion], width=128)
        until = training.replay_evictions(model, eviction, batch, attention_impl="segments")
        batch = batch.with_visible_until(until, eviction)
        for impl in ("dense", "segments"):
            def loss(p, impl=impl, batch=batch):
                return -jnp.sum(training.token_log_probs_from_params(
                    config, p, batch, attention_impl=impl))
            program = jax.jit(jax.value_and_grad(loss))
            start = time.perf_counter()
            compiled = program.lower(params).compile()
            compile_s = time.perf_counter() - start
            value, grads = compiled(params)
            jax.block_until_ready(grads)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                jax.block_until_ready(compiled(params))
                times.append(time.perf_counter() - start)
            rows.append(dict(T=int(batch.tokens.shape[1]), impl=impl, layers=layers,
                             vocab=vocab, budget=budget, seconds=statistics.median(times),
                             runs=times, compile_seconds=compile_s,
                             memory_bytes=_memory_bytes(compiled), loss=float(value)))
    return rows


def record_memory(tokens: list[int]):
    config = preset("deepseek-r1-distill-qwen-7b")
    L, K = config.num_layers, config.num_kv_heads
    return [dict(preset="deepseek-r1-distill-qwen-7b", T=T, record_bytes=L * K * T * 4,
                 dense_mask_bytes=L * K * T * T) for T in tokens]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--results", default=None, help="append the JSON rows to this file")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, seconds")
    args = parser.parse_args(argv)
    if args.quick:
        overhead = record_overhead(2, [68], 64, 1)
        tiny = ModelConfig(family="qwen2", vocab_size=64, hidden_size=64,
                           intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                           head_dim=16, max_position_embeddings=1024, qkv_bias=True)
        backward = masked_backward(2, 64, [256], 64, 1, widths=tiny)
    else:
        overhead = record_overhead(8, [68, 136], 520, args.repeats)
        backward = masked_backward(args.layers, args.vocab, args.lengths, 512, args.repeats)
    memory = record_memory([4096, 16384])

    print(f"jax {jax.__version__} on {jax.default_backend()}, {platform.processor() or 'cpu'}, "
          f"python {sys.version.split()[0]}")
    print("\n| gkv budget | batch x new tokens | tok/s without record | tok/s with record "
          "| ratio | record bytes |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in overhead:
        print(f"| {r['budget']} | {r['batch']} x {r['max_new_tokens']} | "
              f"{r['plain_tok_s']:.0f} | {r['record_tok_s']:.0f} | "
              f"{r['record_tok_s'] / r['plain_tok_s']:.3f} | {r['record_bytes']:,} |")
    print("\n| T | attention | fwd+bwd seconds | compiled memory (MiB) | loss |")
    print("|---:|---|---:|---:|---:|")
    for r in backward:
        print(f"| {r['T']} | {r['impl']} | {r['seconds']:.2f} | "
              f"{r['memory_bytes'] / 2**20:,.0f} | {r['loss']:.3f} |")
    print("\n| 7B preset, T | record [L, K, T] int32 | dense mask [L, K, T, T] bool | ratio |")
    print("|---:|---:|---:|---:|")
    for r in memory:
        print(f"| {r['T']} | {r['record_bytes'] / 2**20:,.1f} MiB | "
              f"{r['dense_mask_bytes'] / 2**30:,.1f} GiB | "
              f"{r['dense_mask_bytes'] / r['record_bytes']:,.0f}x |")
    if args.results:
        with open(args.results, "a") as f:
            for kind, rows in (("record_overhead", overhead), ("masked_backward", backward),
                               ("record_memory", memory)):
                for row in rows:
                    f.write(json.dumps({"bench": "eviction_record", "kind": kind,
                                        "quick": args.quick, **row}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
