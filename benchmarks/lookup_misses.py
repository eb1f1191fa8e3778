"""Why a compressed cache fails on the synthetic tasks: the first wrong character of each
greedy trace, and, where it is a looked-up value, whether the table entry that line needed
was still in the cache when it was predicted (its prompt copy, or a copy an earlier trace
line wrote), per layer.

    python benchmarks/lookup_misses.py --model gkv_jax/assets/reasoner_chain \\
        --dataset synthetic-chain --budget 68 --num-problems 20

Problems of the validation seed (2): neither trained on nor held out. Prints the counts; a
layer counts an entry as present if any of its KV heads still holds it.
"""

from __future__ import annotations

import argparse
import collections

import numpy as np

LINE = 10  # characters (tokens) per trace line: "ii K v ab\n"
COLUMNS = {0: "line number", 1: "line number", 3: "key", 5: "value", 7: "state",
           8: "state"}  # the others are spaces and the newline


def first_error(text: str, truth: str) -> int | None:
    """Offset of the first character where the trace leaves the reference, None if none."""
    return next((k for k, (x, y) in enumerate(zip(text, truth, strict=False)) if x != y),
                None if len(text) >= len(truth) else len(text))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--dataset", default="synthetic-chain",
                        choices=["synthetic", "synthetic-chain"])
    parser.add_argument("--budget", type=int, required=True)
    parser.add_argument("--num-problems", type=int, default=20)
    args = parser.parse_args()

    from gkv_jax import synthetic
    from gkv_jax.cli.post_train_data import VALIDATION_SEED
    from gkv_jax.datasets import SYNTHETIC_LOOKUPS
    from gkv_jax.eviction import EvictionConfig
    from gkv_jax.generation import generate
    from gkv_jax.loading import load

    model, tokenizer = load(args.model, dtype="float32")
    problems = synthetic.problems(VALIDATION_SEED, args.num_problems,
                                  lookup=SYNTHETIC_LOOKUPS[args.dataset])
    eviction = EvictionConfig(policy="gkv", budget=args.budget, window=16, divide_length=16)
    out = generate(model, [p.prompt for p in problems], tokenizer, eviction=eviction,
                   max_new_tokens=520, return_eviction_record=True)
    record = out.eviction_record
    kinds, present, right_lines = collections.Counter(), collections.Counter(), []
    for b, problem in enumerate(problems):
        offset = first_error(out.texts[b], problem.completion)
        if offset is None:
            kinds["none (right)"] += 1
            right_lines.append(problem.num_steps)
            continue
        line, column = divmod(offset, LINE)
        right_lines.append(line)
        kind = "answer line" if line >= problem.num_steps else COLUMNS.get(column, "layout")
        kinds[kind] += 1
        if kind != "value":
            continue
        states = problem.states()
        digit = problem.read_digit(line, states[line])
        prompt_ids = out.prompt_ids[b]
        # BOS, then "Kv " per entry in the prompt's order: the value of entry j at 3j + 2.
        prompt_value = 3 * problem.order.index(digit) + 2
        assert tokenizer.decode([prompt_ids[prompt_value]]).strip() == str(problem.table[digit])
        query = len(prompt_ids) + offset - 1  # the position whose output is the value
        copies = [len(prompt_ids) + LINE * k + 5 for k in range(line)
                  if problem.read_digit(k, states[k]) == digit]
        present["read before in the trace"] += bool(copies)
        for layer in range(record.visible_until.shape[0]):
            visible = record.visible_until[layer, b] > query  # [K, T]
            present[(layer, "prompt entry")] += bool(visible[:, prompt_value].any())
            present[(layer, "a trace copy")] += bool(copies) and bool(
                visible[:, copies].any())
    print(f"{args.model} {eviction.describe()} on {args.num_problems} validation problems")
    print(f"lines right before the first error: median {np.median(right_lines):.1f}")
    print("first error:", ", ".join(f"{k} {v}" for k, v in kinds.most_common()))
    values = kinds["value"]
    print(f"of the {values} wrong values, the entry needed was "
          f"{values - present['read before in the trace']} times never read before;")
    for layer in range(record.visible_until.shape[0]):
        print(f"  layer {layer}: prompt entry in the cache {present[(layer, 'prompt entry')]}, "
              f"a trace copy {present[(layer, 'a trace copy')]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
