"""Markdown tables of an evaluation's `summary.csv`: pass@1 per policy and budget, the mean
generated tokens (a wrong trace often stops early or runs to `max_new_tokens`) and cache
memory; for the synthetic task also, from `results.jsonl` next to it, how many trace lines
come out right before the first wrong one (a graded view of where each policy breaks) and
which part of that first wrong line is wrong.

    python benchmarks/accuracy_table.py runs/eval/reasoner/summary.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from collections import defaultdict

from gkv_jax import synthetic


def markdown(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table, the first column left-aligned and the others right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def pivot(rows: list[dict], field: str, fmt: str) -> str:
    """One row per policy, one column per budget; `full` (no budget) gets its own column."""
    budgets = sorted({int(r["budget"]) for r in rows if r["budget"]})
    cells: dict[str, dict[str, str]] = defaultdict(dict)
    for r in rows:
        cells[r["policy"]][r["budget"] or "full"] = format(float(r[field]), fmt)
    header = ["policy", "full cache"] + [f"budget {b}" for b in budgets]
    full = cells.get("full", {}).get("full", "-")
    return markdown(header, [[policy, full] + [by_budget.get(str(b), "-") for b in budgets]
                             for policy, by_budget in cells.items() if policy != "full"])


def graded_rows(rows: list[dict]) -> list[tuple[dict, synthetic.Problem, list[str], int | None]]:
    """Each synthetic row of `results.jsonl` with its problem, its written lines (padded with
    empty ones to the reference's length) and the index of its first line that differs from
    the reference's 50 trace lines and answer line (None if none does)."""
    count = 1 + max(int(r["problem"].split("-")[1]) for r in rows)
    problems = synthetic.problems(0, count)
    graded = []
    for r in rows:
        problem = problems[int(r["problem"].split("-")[1])]
        reference = problem.completion.split("\n")[:synthetic.NUM_STEPS + 1]
        written = r["text"].split("\n") + [""] * len(reference)
        wrong = next((i for i, line in enumerate(reference) if written[i] != line), None)
        graded.append((r, problem, written, wrong))
    return graded


def correct_lines(graded: list[tuple]) -> list[dict]:
    """Per config (summary-like rows): mean number of trace lines right before the first
    wrong one, over `graded_rows`."""
    lines_right: dict[tuple, list[int]] = defaultdict(list)
    for r, _, _, wrong in graded:
        right = synthetic.NUM_STEPS if wrong is None else min(wrong, synthetic.NUM_STEPS)
        lines_right[(r["policy"], r["budget"])].append(right)
    return [{"policy": policy, "budget": "" if budget is None else str(budget),
             "lines": sum(v) / len(v)} for (policy, budget), v in lines_right.items()]


FIELDS = ("line number", "key", "entry", "state")  # the parts of a line "ii K v ab"
KINDS = (*FIELDS, "answer", "after answer", "none")


def first_error_kind(problem: synthetic.Problem, text: str, written: list[str],
                     wrong: int | None) -> str:
    """Where a generation first goes wrong: the first part of its first wrong trace line
    that differs (`FIELDS`), the answer after 50 right lines ("answer"), only after a right
    answer ("after answer": text between the answer and EOS, which grading ignores), or
    nowhere ("none")."""
    if wrong is not None and wrong < synthetic.NUM_STEPS:
        reference = problem.completion.split("\n")[wrong].split(" ")
        parts = written[wrong].split(" ") + [""] * len(FIELDS)
        return next(field for field, got, want in zip(FIELDS, parts, reference, strict=False)
                    if got != want)
    if synthetic.extract_answer(written[synthetic.NUM_STEPS]) != problem.answer:
        return "answer"
    if wrong is not None or text != problem.completion:
        return "after answer"
    return "none"


def first_errors(graded: list[tuple]) -> list[dict]:
    """Per config: how many problems first go wrong in each of `KINDS`."""
    counts: dict[tuple, dict[str, int]] = defaultdict(lambda: dict.fromkeys(KINDS, 0))
    for r, problem, written, wrong in graded:
        counts[(r["policy"], r["budget"])][first_error_kind(problem, r["text"], written,
                                                            wrong)] += 1
    return [{"config": policy if budget is None else f"{policy}@{budget}", **kinds}
            for (policy, budget), kinds in counts.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("summary", help="summary.csv written by gkv_jax.evaluate")
    args = parser.parse_args()
    with open(args.summary) as f:
        rows = list(csv.DictReader(f))
    print("pass@1 (exact answers):\n")
    print(pivot(rows, "pass@1", ".3f"))
    print("\nmean generated tokens:\n")
    print(pivot(rows, "mean_generated_tokens", ".0f"))
    print("\ncache MiB per sequence (keys, values and eviction state):\n")
    rows_mib = [dict(r, cache_mib=float(r["cache_bytes"]) / 2**20) for r in rows]
    print(pivot(rows_mib, "cache_mib", ".2f"))
    with open(os.path.join(os.path.dirname(args.summary), "results.jsonl")) as f:
        results = [json.loads(line) for line in f]
    if all(r["problem"].startswith("synthetic-") for r in results):
        print(f"\nsynthetic: trace lines right before the first wrong one (of "
              f"{synthetic.NUM_STEPS}):\n")
        graded = graded_rows(results)
        print(pivot(correct_lines(graded), "lines", ".1f"))
        print("\nsynthetic: where the first wrong line is wrong (problems per config):\n")
        errors = first_errors(graded)
        print(markdown(list(errors[0]), [[str(v) for v in row.values()] for row in errors]))


if __name__ == "__main__":
    main()
