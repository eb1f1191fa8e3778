"""Summaries of results rows: pass@k per config, `summary.csv`, the text table and the
accuracy-against-budget plot."""

from __future__ import annotations

import csv
import math
import textwrap
from collections.abc import Sequence
from typing import Any

from gkv_jax.evaluation.configs import config_name
from gkv_jax.eviction import EvictionConfig

SUMMARY_FILE = "summary.csv"
PLOT_FILE = "accuracy_vs_budget.png"
# Summary columns shown by `EvalReport.table()`: (header, key, format).
_TABLE_COLUMNS = (("config", "name", "{}"), ("window", "window", "{}"),
                  ("divide", "divide_length", "{}"), ("problems", "problems", "{}"),
                  ("samples", "samples", "{}"))
_TABLE_TAIL = (("tokens", "mean_generated_tokens", "{:.1f}"),
               ("tok/s", "tokens_per_second", "{:.1f}"),
               ("cache MiB", "cache_bytes", "mib"), ("full MiB", "full_cache_bytes", "mib"))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with n samples of which c are correct:
    1 - C(n - c, k) / C(n, k) (Chen et al., 2021).

        >>> pass_at_k(5, 2, 1), pass_at_k(5, 2, 2), pass_at_k(4, 3, 2)
        (0.4, 0.7, 1.0)
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def summarize(rows: Sequence[dict[str, Any]], configs: Sequence[EvictionConfig],
              samples: int, pass_k: Sequence[int] = (1,)) -> list[dict[str, Any]]:
    """One summary dict per config (see `EvalReport.summary`); pass@k averaged over
    problems, for k = 1 and each k <= samples of `pass_k`."""
    ks = sorted({1, *(k for k in pass_k if k <= samples)})
    summary = []
    for config in configs:
        own = [r for r in rows if r["config"] == config.describe()]
        per_problem: dict[str, list[bool]] = {}
        for r in own:
            per_problem.setdefault(r["problem"], []).append(bool(r["correct"]))
        entry: dict[str, Any] = {
            "name": config_name(config), "policy": config.policy, "budget": config.budget,
            "window": config.window, "divide_length": config.divide_length,
            "problems": len(per_problem), "samples": samples}
        for k in ks:
            entry[f"pass@{k}"] = _mean([pass_at_k(len(v), sum(v), k)
                                        for v in per_problem.values() if len(v) >= k])
        tokens = sum(r["generated_tokens"] for r in own)
        seconds = sum(r["decode_seconds"] for r in own)
        entry["mean_generated_tokens"] = _mean([r["generated_tokens"] for r in own])
        entry["tokens_per_second"] = tokens / seconds if seconds > 0 else float("nan")
        entry["cache_bytes"] = _mean([r["cache_bytes"] for r in own])
        entry["full_cache_bytes"] = _mean([r["full_cache_bytes"] for r in own])
        entry["config"] = config.describe()
        summary.append(entry)
    return summary


def write_summary_csv(summary: Sequence[dict[str, Any]], path: str) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)


def format_table(summary: Sequence[dict[str, Any]]) -> str:
    """Fixed-width text table of a summary: config, knobs, pass@k, tokens, speed, memory."""
    if not summary:
        return "(no results)"
    pass_columns = tuple((k, k, "{:.3f}") for k in summary[0] if k.startswith("pass@"))
    columns = _TABLE_COLUMNS + pass_columns + _TABLE_TAIL
    cells = [[header for header, _, _ in columns]]
    for entry in summary:
        cells.append([_format_cell(entry[key], fmt) for _, key, fmt in columns])
    widths = [max(len(row[j]) for row in cells) for j in range(len(columns))]
    lines = ["  ".join(c.ljust(w) if j == 0 else c.rjust(w)
                       for j, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _format_cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if fmt == "mib":
        return f"{value / 2**20:.2f}"
    return fmt.format(value)


def plot_title(model_name: str, dataset: str, problems: int, sequence_length: int) -> str:
    """The plot's title: which model, on what, how long the sequences may grow."""
    return (f"{model_name} on {dataset}: {problems} problems, "
            f"sequences up to {sequence_length} tokens")


# One marker per policy, so that lines lying on each other (all at 0) stay distinguishable.
_MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def accuracy_figure(summary: Sequence[dict[str, Any]], title: str = ""):
    """The matplotlib `Figure` of `plot_accuracy`.

    One budget: grouped bars, one per config (full included), each labelled with its
    pass@1. Several: pass@1 against budget (log2 axis), one line per evicting policy with
    its own marker and a small sideways offset, `full` a dashed horizontal line, and the
    legend below the axes, where it covers no data.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    budgets = sorted({e["budget"] for e in summary if e["budget"] is not None})
    if len(budgets) <= 1:
        _draw_bars(axes, summary, budgets)
    else:
        _draw_lines(axes, summary, budgets)
    axes.set_ylabel("pass@1")
    axes.set_ylim(0 if len(budgets) <= 1 else -0.04, 1.08)  # markers at 0 fully shown
    axes.set_title(textwrap.fill(title, 70), fontsize=10)
    axes.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    return figure


def _draw_bars(axes, summary, budgets) -> None:
    colors = _policy_colors(summary)
    values = [e["pass@1"] for e in summary]
    bars = axes.bar(range(len(summary)), [0 if math.isnan(v) else v for v in values],
                    color=[colors[e["policy"]] for e in summary], width=0.6)
    axes.bar_label(bars, labels=["-" if math.isnan(v) else f"{v:.1%}" for v in values],
                   padding=2, fontsize=9)
    # One budget, named on the axis: the ticks need only the policies (shorter, no overlap).
    policies = [e["policy"] for e in summary]
    names = policies if len(set(policies)) == len(policies) else [e["name"] for e in summary]
    axes.set_xticks(range(len(summary)), labels=names)
    where = f" at budget {budgets[0]} (kept tokens per layer and KV head)" if budgets else ""
    axes.set_xlabel(f"config{where}")


def _draw_lines(axes, summary, budgets) -> None:
    colors = _policy_colors(summary)
    policies = [p for p in dict.fromkeys(e["policy"] for e in summary) if p != "full"]
    for i, policy in enumerate(policies):
        points = sorted((e["budget"], e["pass@1"]) for e in summary if e["policy"] == policy)
        shift = 2 ** (0.04 * (i - (len(policies) - 1) / 2))  # a sideways nudge, in octaves
        axes.plot([b * shift for b, _ in points], [a for _, a in points], label=policy,
                  marker=_MARKERS[i % len(_MARKERS)], color=colors[policy], alpha=0.85)
    full = [e["pass@1"] for e in summary if e["policy"] == "full"]
    if full:
        axes.axhline(full[0], linestyle="--", color=colors["full"], label="full")
    axes.set_xscale("log", base=2)
    axes.minorticks_off()
    axes.set_xticks(budgets, labels=[str(b) for b in budgets])
    axes.set_xlabel("budget (kept tokens per layer and KV head)")
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=min(len(policies) + 1, 6),
                frameon=False)


def _policy_colors(summary) -> dict[str, str]:
    colors = {"full": "black"}
    for i, policy in enumerate(p for p in dict.fromkeys(e["policy"] for e in summary)
                               if p != "full"):
        colors[policy] = f"C{i % 10}"
    return colors


def plot_accuracy(summary: Sequence[dict[str, Any]], path: str, title: str = ""):
    """Saves `accuracy_figure(summary, title)` to `path` (png) and returns the figure."""
    figure = accuracy_figure(summary, title)
    figure.savefig(path, bbox_inches="tight")
    return figure


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
