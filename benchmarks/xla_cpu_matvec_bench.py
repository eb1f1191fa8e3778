"""What XLA:CPU offers for the decode step's weight products, against torch, one table.

The decode step at batch 1-4 is a chain of matrix-vector products that read every weight
once (for each layer q, k, v, o, gate, up, down, then the LM head). This script times that
bare chain (no attention, no norms) at R1-Distill-Qwen-1.5B widths with 4 layers, in:

* torch `F.linear` (its [out, in] layout, float32): the reference;
* XLA with our layouts ([in, out]: `x @ W`), float32, separate per-layer arrays;
* XLA with torch's layout ([out, in], contracting the contiguous axis: `W @ x`);
* XLA with our layouts and the LM head alone transposed;
* XLA with bfloat16 weights and float32 accumulation (`preferred_element_type`);

and each XLA variant under several XLA:CPU flag sets (`XLA_FLAGS`, read when the backend
starts, so each flag set runs in its own subprocess): the default, oneDNN
(`--xla_cpu_use_onednn=true`), XNNPACK off (`--xla_cpu_use_xnnpack=false`), the YNN / XNN
dot fusions off (`--xla_cpu_experimental_ynn_fusion_type=` / `..._xnn_fusion_type=`),
flush-to-zero, the thunk runtime off, and the Eigen multi-threading off. Median of
`--repeats` runs, milliseconds per chain; a flag this jaxlib rejects is reported as such.

Usage:
  python benchmarks/xla_cpu_matvec_bench.py --results benchmarks/results.jsonl  # ~5 min
  python benchmarks/xla_cpu_matvec_bench.py --quick                            # seconds
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

WIDTHS = dict(hidden=1536, heads=12, kv_heads=2, head_dim=128, mlp=8960, vocab=151936, layers=4)
QUICK_WIDTHS = dict(hidden=256, heads=4, kv_heads=2, head_dim=64, mlp=768, vocab=4096,
                    layers=2)
FLAG_SETS = {
    "default": "",
    "onednn": "--xla_cpu_use_onednn=true",
    "no xnnpack": "--xla_cpu_use_xnnpack=false",
    "no ynn dot fusion": "--xla_cpu_experimental_ynn_fusion_type=",
    "no xnn dot fusion": "--xla_cpu_experimental_xnn_fusion_type=",
    "flush to zero": "--xla_cpu_ftz=true",
    "no thunk runtime": "--xla_cpu_use_thunk_runtime=false",
    "no eigen threads": "--xla_cpu_multi_thread_eigen=false",
}


def random_weights(w: dict, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Per-layer weights in our [in, out] layout (heads flattened), plus the LM head."""
    rng = np.random.default_rng(seed)
    D, F = w["hidden"], w["mlp"]
    Q, KV = w["heads"] * w["head_dim"], w["kv_heads"] * w["head_dim"]

    def m(i, o):
        return (rng.standard_normal((i, o), np.float32) / np.sqrt(i)).astype(np.float32)

    layers = [dict(q=m(D, Q), k=m(D, KV), v=m(D, KV), o=m(Q, D), gate=m(D, F), up=m(D, F),
                   down=m(F, D)) for _ in range(w["layers"])]
    return layers + [dict(head=m(D, w["vocab"]))]


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def xla_variants(weights, batch: int, repeats: int) -> dict[str, float]:
    import jax
    import jax.numpy as jnp

    def chain(x, layers, head, transposed: set[str], dtype):
        def dot(x, w, name):  # x [B, in]; w [in, out], or [out, in] when transposed
            spec = "bi,oi->bo" if name in transposed else "bi,io->bo"
            return jnp.einsum(spec, x.astype(dtype), w,
                              preferred_element_type=jnp.float32)

        for p in layers:
            q = dot(x, p["q"], "q")
            k, v = dot(x, p["k"], "k"), dot(x, p["v"], "v")
            o = dot(q, p["o"], "o")
            h = jax.nn.silu(dot(o, p["gate"], "gate")) * dot(o, p["up"], "up")
            x = x + dot(h, p["down"], "down") + 0 * (k.sum() + v.sum())
        return dot(x, head, "head")

    all_names = {"q", "k", "v", "o", "gate", "up", "down", "head"}
    variants = {"ours [in, out] f32": (set(), jnp.float32),
                "torch layout [out, in] f32": (all_names, jnp.float32),
                "LM head transposed f32": ({"head"}, jnp.float32),
                "ours [in, out] bf16 weights": (set(), jnp.bfloat16)}
    x = jnp.ones((batch, weights[0]["q"].shape[0]), jnp.float32)
    out = {}
    for name, (transposed, dtype) in variants.items():
        layers = [{k: jnp.asarray(v.T if k in transposed else v, dtype) for k, v in p.items()}
                  for p in weights[:-1]]
        head = weights[-1]["head"]
        head = jnp.asarray(head.T if "head" in transposed else head, dtype)
        fn = jax.jit(functools.partial(chain, transposed=transposed, dtype=dtype))
        out[name] = timed(functools.partial(lambda f, *a: jax.block_until_ready(f(*a)), fn,
                                            x, layers, head), repeats)
        del layers, head
    return out


def torch_chain_ms(weights, batch: int, repeats: int) -> float:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    F = torch.nn.functional
    layers = [{k: torch.as_tensor(np.ascontiguousarray(v.T)) for k, v in p.items()}
              for p in weights]
    x = torch.ones((batch, weights[0]["q"].shape[0]))

    def run():
        with torch.no_grad():
            h_ = x
            for p in layers[:-1]:
                q = F.linear(h_, p["q"])
                F.linear(h_, p["k"]), F.linear(h_, p["v"])
                o = F.linear(q, p["o"])
                h = F.silu(F.linear(o, p["gate"])) * F.linear(o, p["up"])
                h_ = h_ + F.linear(h, p["down"])
            return F.linear(h_, layers[-1]["head"])

    return timed(run, repeats)


def worker(args) -> None:
    widths = QUICK_WIDTHS if args.quick else WIDTHS
    weights = random_weights(widths)
    result = {}
    try:
        for batch in args.batch:
            result[str(batch)] = xla_variants(weights, batch, args.repeats)
    except Exception as error:  # a flag the backend rejects
        result = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
    print("RESULT " + json.dumps(result), flush=True)


def run_flag_set(flags: str, args) -> dict:
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, __file__, "--worker", "--repeats", str(args.repeats),
               "--batch", *map(str, args.batch)] + (["--quick"] if args.quick else [])
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"error": (done.stderr or done.stdout).strip().splitlines()[-1][:300]
            if (done.stderr or done.stdout).strip() else f"exit {done.returncode}"}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--flags", nargs="*", default=list(FLAG_SETS),
                        help=f"flag sets to run, of {list(FLAG_SETS)}")
    parser.add_argument("--quick", action="store_true", help="tiny widths, 2 flag sets")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--results", default=None, help="append a JSON line here")
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.quick:
        args.flags, args.repeats = ["default", "flush to zero"], 2
    widths = QUICK_WIDTHS if args.quick else WIDTHS
    torch_ms = {str(b): torch_chain_ms(random_weights(widths), b, args.repeats)
                for b in args.batch}
    rows = {}
    for name in args.flags:
        rows[name] = run_flag_set(FLAG_SETS[name], args)
        print(name, json.dumps(rows[name]), flush=True)
    print("\ntorch F.linear: " + ", ".join(f"batch {b}: {ms:.1f} ms"
                                            for b, ms in torch_ms.items()))
    variants = next((list(r[str(args.batch[0])]) for r in rows.values() if "error" not in r),
                    [])
    head = "| XLA_FLAGS | batch | " + " | ".join(variants) + " |"
    print(head + "\n|---|---:|" + "---:|" * len(variants))
    for name, r in rows.items():
        for b in args.batch:
            if "error" in r:
                print(f"| {name} | {b} | {r['error']} |")
                continue
            cells = [f"{ms:.1f} ({torch_ms[str(b)] / ms:.2f}x)" for ms in r[str(b)].values()]
            print(f"| {name} | {b} | " + " | ".join(cells) + " |")
    if args.results:
        record = {"benchmark": "xla_cpu_matvec_bench", "widths": widths,
                  "command": " ".join(sys.argv), "cpu_count": os.cpu_count(),
                  "machine": platform.machine(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "torch_ms": torch_ms, "xla_ms": rows,
                  "flag_sets": {k: FLAG_SETS[k] for k in args.flags}}
        with open(args.results, "a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
