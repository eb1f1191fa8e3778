"""Accuracy curves of distillation variants: held-out accuracy of the full cache and of the
trained policy against training steps, with each step's loss, gradient norm and largest
single-prediction KL, for several `DistillConfig` variants of one model side by side.

    python benchmarks/distill_curves.py --model gkv_jax/assets/reasoner --budget 68 \\
        --steps 100 --eval-every 25 --eval-problems 40 --output-dir runs/curves \\
        --variant "recipe:" --variant "lr3e-4:learning_rate=3e-4"

Each `--variant NAME:FIELD=VALUE,...` is a `DistillConfig` with those fields over the
defaults (an empty list: the default recipe). Writes OUTPUT_DIR/curves.jsonl (one row per
variant: the settings, the learning rate used, the history's losses and evaluations),
OUTPUT_DIR/curves.png (accuracy and loss against steps), and prints a table. The step-0
evaluation (the model before training) is shared by every variant.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def parse_variant(text: str) -> tuple[str, dict]:
    """"name:field=value,field=value" -> (name, {field: value}); values are Python
    literals (numbers, tuples, True/False/None)."""
    name, _, fields = text.partition(":")
    overrides = {}
    # split at the commas that start a new FIELD=, not those inside a tuple
    for item in filter(None, re.split(r",(?=\s*\w+\s*=)", fields)):
        key, _, value = item.partition("=")
        overrides[key.strip()] = ast.literal_eval(value.strip())
    return name.strip(), overrides


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--dataset", default="synthetic",
                        choices=["synthetic", "synthetic-chain"])
    parser.add_argument("--policy", default="gkv")
    parser.add_argument("--budget", type=int, required=True)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--divide-length", type=int, default=16)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--eval-problems", type=int, default=40)
    parser.add_argument("--num-examples", type=int, default=512)
    parser.add_argument("--variant", action="append", required=True,
                        help="NAME:FIELD=VALUE,... (DistillConfig fields over the defaults)")
    parser.add_argument("--output-dir", required=True)
    args = parser.parse_args()
    if os.path.exists(args.output_dir) and os.listdir(args.output_dir):
        parser.error(f"--output-dir {args.output_dir} is not empty (nothing is overwritten)")

    from gkv_jax import training
    from gkv_jax.cli.post_train_data import synthetic_pairs
    from gkv_jax.datasets import SYNTHETIC_LOOKUPS
    from gkv_jax.eviction import EvictionConfig
    from gkv_jax.loading import load

    model, tokenizer = load(args.model, dtype="float32")
    data = synthetic_pairs(tokenizer, args.num_examples,
                           lookup=SYNTHETIC_LOOKUPS[args.dataset])
    eviction = EvictionConfig(policy=args.policy, budget=args.budget, window=args.window,
                              divide_length=args.divide_length)
    os.makedirs(args.output_dir, exist_ok=True)

    def eval_fn_for(name):
        return training.evaluation_callback(
            tokenizer, args.dataset, policies=("full", args.policy), budgets=(args.budget,),
            window=args.window, divide_length=args.divide_length,
            num_problems=args.eval_problems, batch_size=args.eval_problems,
            output_dir=os.path.join(args.output_dir, name, "eval"))

    before = eval_fn_for("before")(model, 0)
    print(f"before: {before}", flush=True)
    rows = []
    for text in args.variant:
        name, overrides = parse_variant(text)
        config = training.DistillConfig(eviction=eviction, steps=args.steps,
                                        eval_every=args.eval_every, checkpoint_every=0,
                                        **overrides)
        started = time.perf_counter()
        _, history = training.distill(model, model, data, config,
                                      run_dir=os.path.join(args.output_dir, name, "run"),
                                      eval_fn=eval_fn_for(name), progress=False)
        seconds = time.perf_counter() - started
        recipe = next((e["recipe"] for e in history if "recipe" in e), {})
        steps = [e for e in history if "loss" in e]
        evals = [{"step": 0, **before}] + [{"step": e["step"], **e["eval"]}
                                           for e in history if "eval" in e]
        row = {"variant": name, "overrides": {k: repr(v) for k, v in overrides.items()},
               "learning_rate": overrides.get("learning_rate",
                                              recipe.get("learning_rate", {}).get("value")),
               "model": args.model, "dataset": args.dataset, "eviction": eviction.describe(),
               "steps": args.steps, "seconds": round(seconds, 1), "evals": evals,
               "loss": [round(e["loss"], 5) for e in steps],
               "grad_norm": [round(e["grad_norm"], 4) for e in steps],
               "max_token_kl": [round(e["max_token_kl"], 4) for e in steps],
               "command": " ".join(sys.argv)}
        rows.append(row)
        with open(os.path.join(args.output_dir, "curves.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{name}: lr {row['learning_rate']}, {seconds:.0f} s, " + "; ".join(
            f"step {e['step']}: " + ", ".join(f"{k} {v:.3f}" for k, v in e.items()
                                              if k != "step") for e in evals), flush=True)
    plot(rows, args, os.path.join(args.output_dir, "curves.png"))
    return 0


def plot(rows: list[dict], args, path: str) -> None:
    """Three panels: the policy's accuracy, the full cache's, and the loss (log scale)."""
    policy_key = f"{args.policy}@{args.budget}"
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for row in rows:
        steps = [e["step"] for e in row["evals"]]
        axes[0].plot(steps, [e.get(policy_key) for e in row["evals"]], marker="o",
                     label=row["variant"])
        axes[1].plot(steps, [e.get("full") for e in row["evals"]], marker="o",
                     label=row["variant"])
        axes[2].plot(range(1, len(row["loss"]) + 1), row["loss"], label=row["variant"])
    axes[0].set_title(f"{policy_key} accuracy ({args.eval_problems} held-out)")
    axes[1].set_title("full-cache accuracy")
    axes[2].set_title("loss (T^2 KL)")
    axes[2].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.suptitle(f"{os.path.basename(os.path.normpath(args.model))}: {args.dataset}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    raise SystemExit(main())
