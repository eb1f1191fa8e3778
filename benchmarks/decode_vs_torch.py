"""Decode speed side by side in one process: `gkv_jax.generate` against `transformers` eager.

The same random weights (a `transformers` Qwen2 model, float32, converted with
`gkv_jax.conversion.from_hf`), the same prompts, greedy, no EOS, so both generate exactly
`--max-new-tokens` tokens per row; ours must produce the same tokens as `transformers` under
the full cache (checked, reported). Runs are interleaved (transformers, ours full, ours full
with the decode steps as before issue 18: over the stacked [L, ...] weights and attending
over the whole buffer (our own baseline), ours gkv, then again) and the median of
`--repeats` is reported, with the spread.

Next to it, a bare chain of the decode step's weight reads: for every layer the q/k/v/o and
MLP matrix-vector products and the LM head, with nothing else, in XLA (jit, the weights in
our layout, once as separate per-layer arrays and once stacked [L, ...] under a layer scan)
and in torch (`F.linear`, torch's layout). And the weights-read roofline: the
bytes one decode step must read (every weight but the untied embedding) over the measured
copy bandwidth of a large numpy array.

Usage:
  python benchmarks/decode_vs_torch.py                      # both shapes below, ~10 min
  python benchmarks/decode_vs_torch.py --shape small --batch 8
  python benchmarks/decode_vs_torch.py --shape r1-1.5b-4l --batch 1 4 --max-new-tokens 48

Shapes: `small` (the bundled model's size: 4 layers, hidden 256, 4/2 heads of 64, MLP 768,
vocab 4096) and `r1-1.5b-4l` (DeepSeek-R1-Distill-Qwen-1.5B widths with 4 layers: hidden 1536,
12/2 heads of 128, MLP 8960, vocab 151936, untied; 654M parameters).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import generate_bench  # noqa: E402  (sibling scripts)
import xla_cpu_matvec_bench  # noqa: E402

SHAPES = {
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=4096,
                  tie_word_embeddings=False),
    "r1-1.5b-4l": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=4,
                       num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                       tie_word_embeddings=False),
}


def hf_model(shape: str, seed: int = 0):
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.Qwen2Config(**SHAPES[shape], max_position_embeddings=32768,
                                      rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None,
                                      pad_token_id=None)
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # peaked logits: greedy decoding has no near-ties
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.copy_(torch.randn_like(p) / np.sqrt(p.shape[-1]) * 1.5)
    return model


def torch_generate(model, prompts: np.ndarray, max_new_tokens: int):
    """transformers' greedy generate with its dynamic cache: (tokens [B, M], seconds)."""
    import torch

    ids = torch.as_tensor(prompts)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                             eos_token_id=None, pad_token_id=0)
    seconds = time.perf_counter() - start
    return out[:, prompts.shape[1]:].numpy(), seconds


def ours_generate(model, prompts: np.ndarray, max_new_tokens: int, eviction,
                  before: bool = False):
    """`generate`; `before` runs the decode steps as before issue 18 (our own baseline): over
    the stacked [L, ...] weights (the layer scan) and attending over the whole buffer
    (`grouped_attention` over all C slots) instead of `live_block_attention`."""
    from gkv_jax import generate

    if before:  # a distinct program: `decode_as_before` acts when a program is traced
        eviction = eviction or __import__("gkv_jax").EvictionConfig(policy="full")
        eviction = dataclasses.replace(eviction, divide_length=eviction.divide_length + 1)
    with generate_bench.decode_as_before() if before else contextlib.nullcontext():
        start = time.perf_counter()
        out = generate(model, prompts.tolist(), eviction=eviction,
                       max_new_tokens=max_new_tokens, eos_token_id=[])
        seconds = time.perf_counter() - start
    return np.asarray(out.tokens), seconds, out.stats


def weight_bytes(model) -> int:
    """Bytes a decode step reads: every weight but the (gathered) untied embedding."""
    params = model.params()
    import jax

    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    if "lm_head" in params:
        total -= params["embedding"].size * params["embedding"].dtype.itemsize
    return int(total)


def copy_bandwidth(num_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes per second of a large numpy copy (read + write counted once each)."""
    source = np.ones(num_bytes // 8, np.float64)
    target = np.empty_like(source)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(target, source)
        best = min(best, time.perf_counter() - start)
    return 2 * num_bytes / best


def matvec_chain(model, batch: int, repeats: int = 5) -> dict[str, float]:
    """Milliseconds of one pass of the decode step's weight products (no attention, no
    norms), in XLA with our layouts and in torch with its own."""
    import jax
    import jax.numpy as jnp

    params = model.params()
    layers, head = params["layers"], params["lm_head"]
    L = layers["q_proj"].shape[0]

    def layer(x, p):
        q = jnp.einsum("bd,dnh->bnh", x, p["q_proj"])
        k = jnp.einsum("bd,dkh->bkh", x, p["k_proj"])
        v = jnp.einsum("bd,dkh->bkh", x, p["v_proj"])
        o = jnp.einsum("bnh,nhd->bd", q, p["o_proj"])
        h = jax.nn.silu(o @ p["gate_proj"]) * (o @ p["up_proj"])
        return x + h @ p["down_proj"] + 0 * (k.sum() + v.sum())

    @jax.jit
    def stacked_chain(x, layers, head):  # the layer scan over [L, ...] weights
        x, _ = jax.lax.scan(lambda x, p: (layer(x, p), None), x, layers)
        return x @ head

    @jax.jit
    def per_layer_chain(x, layers, head):  # separate arrays per layer
        for p in layers:
            x = layer(x, p)
        return x @ head

    def timed(fn, *args):
        return xla_cpu_matvec_bench.timed(lambda: jax.block_until_ready(fn(*args)), repeats)

    x = jnp.ones((batch, head.shape[0]), head.dtype)
    split = jax.block_until_ready(
        [{k: v[i] + 0 for k, v in layers.items()} for i in range(L)])
    xla_stacked_ms = timed(stacked_chain, x, layers, head)
    xla_ms = timed(per_layer_chain, x, split, head)
    del split

    D = layers["q_proj"].shape[1]
    weights = [{name: np.asarray(layers[f"{name}_proj"][i]).reshape(shape) for name, shape in
                (("q", (D, -1)), ("k", (D, -1)), ("v", (D, -1)), ("o", (-1, D)),
                 ("gate", (D, -1)), ("up", (D, -1)), ("down", (-1, D)))}
               for i in range(L)] + [{"head": np.asarray(head)}]
    return {"xla_ms": xla_ms, "xla_stacked_ms": xla_stacked_ms,
            "torch_ms": xla_cpu_matvec_bench.torch_chain_ms(weights, batch, repeats)}


def run_shape(shape: str, batches: list[int], max_new_tokens: int, prompt_length: int,
              budget: int, divide_length: int, repeats: int) -> list[dict]:
    import torch

    from gkv_jax import EvictionConfig, conversion

    torch.set_num_threads(os.cpu_count() or 1)
    hf = hf_model(shape)
    model = conversion.from_hf(hf)
    gkv = EvictionConfig(policy="gkv", budget=budget, divide_length=divide_length)
    bandwidth = copy_bandwidth()
    rows = []
    for batch in batches:
        prompts = np.random.default_rng(batch).integers(
            0, SHAPES[shape]["vocab_size"], (batch, prompt_length)).astype(np.int64)
        ours_generate(model, prompts, max_new_tokens, None)  # compile
        ours_generate(model, prompts, max_new_tokens, None, before=True)
        ours_generate(model, prompts, max_new_tokens, gkv)
        ours_generate(model, prompts, max_new_tokens, gkv, before=True)
        times = {"transformers": [], "full": [], "full_before": [], "gkv": [],
                 "gkv_before": []}
        same = True
        for _ in range(repeats):
            reference, seconds = torch_generate(hf, prompts, max_new_tokens)
            times["transformers"].append(seconds)
            tokens, seconds, _ = ours_generate(model, prompts, max_new_tokens, None)
            times["full"].append(seconds)
            same &= bool(np.array_equal(tokens, reference))
            tokens, seconds, _ = ours_generate(model, prompts, max_new_tokens, None,
                                               before=True)
            times["full_before"].append(seconds)
            same &= bool(np.array_equal(tokens, reference))
            _, seconds, _ = ours_generate(model, prompts, max_new_tokens, gkv)
            times["gkv"].append(seconds)
            _, seconds, _ = ours_generate(model, prompts, max_new_tokens, gkv, before=True)
            times["gkv_before"].append(seconds)
        tok = batch * max_new_tokens
        speed = {k: tok / statistics.median(v) for k, v in times.items()}
        spread = {k: (max(v) - min(v)) / statistics.median(v) for k, v in times.items()}
        chain = matvec_chain(model, batch)
        roofline = bandwidth / weight_bytes(model) * batch
        rows.append({"shape": shape, "batch": batch, "max_new_tokens": max_new_tokens,
                     "prompt_length": prompt_length, "budget": budget,
                     "divide_length": divide_length, "tokens_per_s": speed,
                     "spread": spread, "same_tokens_as_transformers": same,
                     "matvec_chain_ms": chain, "copy_gbps": bandwidth / 1e9,
                     "roofline_tokens_per_s": roofline})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| shape | batch | transformers tok/s | ours full, before | "
             "ours full | ours gkv, before | ours gkv | same tokens | "
             "matvec chain XLA per-layer / XLA stacked / torch (ms) | roofline tok/s |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        s = r["tokens_per_s"]
        t = s["transformers"]
        lines.append(
            f"| {r['shape']} | {r['batch']} | {t:.1f} | "
            f"{s['full_before']:.1f} ({s['full_before'] / t:.2f}x) "
            f"| {s['full']:.1f} ({s['full'] / t:.2f}x) "
            f"| {s['gkv_before']:.1f} ({s['gkv_before'] / t:.2f}x) "
            f"| {s['gkv']:.1f} ({s['gkv'] / t:.2f}x, budget {r['budget']}) | "
            f"{'yes' if r['same_tokens_as_transformers'] else 'NO'} | "
            f"{r['matvec_chain_ms']['xla_ms']:.1f} / "
            f"{r['matvec_chain_ms']['xla_stacked_ms']:.1f} / "
            f"{r['matvec_chain_ms']['torch_ms']:.1f} | "
            f"{r['roofline_tokens_per_s']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), action="append")
    parser.add_argument("--batch", type=int, nargs="+", default=None)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", default=None, help="append JSON lines here")
    args = parser.parse_args(argv)
    plan = {"small": ([1, 8], 256, 64, 32), "r1-1.5b-4l": ([1, 4], 48, 48, 16)}
    rows = []
    for shape in args.shape or ["small", "r1-1.5b-4l"]:
        batches, max_new, budget, divide = plan[shape]
        rows += run_shape(shape, args.batch or batches, args.max_new_tokens or max_new,
                          args.prompt_length, budget, divide, args.repeats)
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {sys.version.split()[0]}")
    print(table(rows))
    if args.results:
        with open(args.results, "a", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps({"benchmark": "decode_vs_torch", **r}) + "\n")


if __name__ == "__main__":
    main()
