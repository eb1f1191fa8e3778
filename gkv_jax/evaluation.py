"""`gkv_jax.evaluate`: accuracy of eviction policies and budgets on a dataset, resumable.

    report = gkv_jax.evaluate(model, tokenizer, "aime24", policies=("full", "gkv"),
                              budgets=(512, 1024), samples=8, pass_k=(1, 8),
                              temperature=0.6, top_p=0.95, max_new_tokens=16384)
    print(report.table())

Every (policy, budget) is one `EvictionConfig`; every (config, problem, sample) one row of
`output_dir/results.jsonl`, appended and flushed after each batch, so an interrupted run
started again with the same arguments skips the rows already there and reproduces the rows
an uninterrupted run would have written. Problems are sorted by prompt length and batched
within one prompt-length bucket, every batch padded to the same number of rows, so a
config compiles one decode program per bucket.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import numbers
import os
import textwrap
from collections.abc import Container, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from gkv_jax import grading
from gkv_jax.datasets import Example, load_dataset
from gkv_jax.eviction import POLICIES, EvictionConfig, get_policy
from gkv_jax.generation import _encode, bucket_length, generate
from gkv_jax.sampling import SamplingParams

R1_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
# max_new_tokens=None: this per dataset kind, capped at the model's context.
DEFAULT_MAX_NEW_TOKENS = {"synthetic": 520, "math": 16384}
RESULTS_FILE = "results.jsonl"
SUMMARY_FILE = "summary.csv"
PLOT_FILE = "accuracy_vs_budget.png"
SETTINGS_FILE = "settings.json"
# Summary columns shown by `EvalReport.table()`: (header, key, format).
_TABLE_COLUMNS = (("config", "name", "{}"), ("window", "window", "{}"),
                  ("divide", "divide_length", "{}"), ("problems", "problems", "{}"),
                  ("samples", "samples", "{}"))
_TABLE_TAIL = (("tokens", "mean_generated_tokens", "{:.1f}"),
               ("tok/s", "tokens_per_second", "{:.1f}"),
               ("cache MiB", "cache_bytes", "mib"), ("full MiB", "full_cache_bytes", "mib"))


@dataclasses.dataclass(frozen=True)
class Batch:
    """One `generate` call: examples `indices` (one prompt bucket) as sample `sample` of
    `config`, padded with repeats of the first prompt to `size` rows."""

    config: EvictionConfig
    sample: int
    bucket: int
    indices: tuple[int, ...]
    size: int


@dataclasses.dataclass
class EvalReport:
    """What `evaluate` returns.

    Attributes:
      rows: one dict per (config, problem, sample) of this evaluation, in config, problem
        and sample order (the rows of `results.jsonl` it asked for).
      summary: one dict per config: name, policy, budget, window, divide_length, config
        (its full description), problems, samples, pass@k for each k, mean_generated_tokens,
        tokens_per_second, cache_bytes and full_cache_bytes (per sequence).
      results_path, summary_path, plot_path: results.jsonl, summary.csv and
        accuracy_vs_budget.png in the output directory.
    """

    rows: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    results_path: str
    summary_path: str
    plot_path: str

    def table(self) -> str:
        """The summary as a fixed-width text table."""
        return format_table(self.summary)


def evaluate(model, tokenizer, dataset: str | Sequence[Example] = "synthetic", *,
             policies: Sequence[str] | str = ("full", "gkv"), budgets: Sequence[int] = (128,),
             window: int | None = None, divide_length: int | None = None,
             num_problems: int | None = None, samples: int = 1,
             pass_k: Sequence[int] | int = (1,),
             max_new_tokens: int | None = None, temperature: float = 0.0, top_p: float = 1.0,
             top_k: int = 0, seed: int = 0, batch_size: int = 16,
             chat_template: bool | None = None, system_prompt: str | None = None,
             prompt_buckets: Sequence[int] | None = None, output_dir: str = "runs/eval",
             progress: bool = True, model_name: str | None = None) -> EvalReport:
    """Generates answers to a dataset under each eviction config, grades and summarizes them.

    Args:
      model: a `gkv_jax.Transformer`. tokenizer: its `transformers` tokenizer.
      dataset: a name of `gkv_jax.datasets.DATASETS` ("synthetic", "aime24", "aime25",
        "amc23", "math500"), a path to a `.jsonl` file of `question`/`answer`, or a list of
        `Example`s.
      policies: eviction policies ("full" runs once, whatever the budgets), or a
        comma-separated string. budgets: kept tokens per layer and KV head (ints, numpy
        integers included).
      window: the observation window of snapkv, rkv and gkv (None = their default).
      divide_length: decode steps between compressions, for every policy (None = default).
      num_problems: the first n problems (None = all; synthetic: 200).
      samples: generations per problem; sample s uses seed `seed + s`.
      pass_k: the k of pass@k to report (a sequence, or one int); those above `samples` are
        skipped (pass@1 always).
      max_new_tokens: None = 520 for synthetic, 16384 for math, capped at the context.
      temperature, top_p, top_k, seed: as in `generate`.
      batch_size: rows per `generate` call (at most the number of problems).
      chat_template: None = by dataset kind (math: the tokenizer's chat template; synthetic:
        BOS + prompt, as the bundled model was trained).
      system_prompt: None = by kind (math: `R1_SYSTEM_PROMPT`; synthetic: none); "" = none.
        Without a chat template it is prepended to the question, a blank line between.
      prompt_buckets: padded prompt lengths, as in `generate`.
      output_dir: where results.jsonl, summary.csv, accuracy_vs_budget.png and
        settings.json go; rows already in results.jsonl are not generated again, provided
        settings.json shows they were made with these settings, these weights (a checksum
        of every parameter) and these problems (a hash of each problem's id, question,
        answer and prompt tokens); otherwise ValueError, before any generation.
      progress: show a progress bar over batches and print the table and paths at the end.
      model_name: the model's name in the plot's title (None = its family and size).

    Raises:
      ValueError: naming the parameter, before any generation: an unknown policy or
        dataset, a bad budget or knob, samples/batch_size/pass_k < 1, bad sampling values,
        a prompt plus max_new_tokens beyond the context, or an output_dir holding a run with
        other settings.
    """
    configs = eviction_configs(policies, budgets, window, divide_length)
    _check_positive("samples", samples)
    _check_positive("batch_size", batch_size)
    pass_k = (pass_k,) if isinstance(pass_k, numbers.Integral) else tuple(pass_k)
    for k in pass_k:
        _check_positive("pass_k", k)
    SamplingParams.create(temperature, top_p, top_k)
    examples, label = _examples(dataset, num_problems)
    prompts = [format_prompt(e, tokenizer, chat_template, system_prompt) for e in examples]
    max_new_tokens = resolve_max_new_tokens(max_new_tokens, examples, prompts, model)
    batches = plan_batches([len(p) for p in prompts], configs, samples, batch_size,
                           prompt_buckets)

    os.makedirs(output_dir, exist_ok=True)
    results_path = os.path.join(output_dir, RESULTS_FILE)
    done = {row_key(r): r for r in read_results(results_path)}
    check_settings(output_dir, has_results=bool(done), settings={
        "dataset": label, "max_new_tokens": max_new_tokens, "temperature": float(temperature),
        "top_p": float(top_p), "top_k": int(top_k), "seed": int(seed),
        "chat_template": chat_template, "system_prompt": system_prompt,
        "model": f"{getattr(model, 'config', None)!r} {getattr(model, 'dtype', None)}",
        "weights": weights_fingerprint(model),
        "problems": problem_fingerprints(examples, prompts)})
    pending = [b for b in batches if any(_key(b, examples[i]) not in done for i in b.indices)]

    with tqdm(total=len(pending), desc=f"eval {label}", unit="batch",
              disable=not progress) as bar:
        for batch in pending:
            bar.set_postfix_str(config_name(batch.config))
            out = generate(model, _batch_prompts(batch, prompts), tokenizer=tokenizer,
                           eviction=batch.config, max_new_tokens=max_new_tokens,
                           temperature=temperature, top_p=top_p, top_k=top_k,
                           seed=seed + batch.sample, prompt_buckets=prompt_buckets)
            new_rows = batch_rows(batch, out, examples, done)
            append_results(results_path, new_rows)
            done.update((row_key(r), r) for r in new_rows)
            bar.update(1)

    rows = [done[key] for key in report_keys(configs, examples, samples)]
    title = plot_title(model_name or _model_description(model), label, len(examples),
                       max(map(len, prompts)) + max_new_tokens)
    report = _write_report(rows, configs, samples, pass_k, output_dir, title)
    if progress:
        print(report.table())
        print(f"results: {report.results_path}\nsummary: {report.summary_path}\n"
              f"plot:    {report.plot_path}")
    return report


# --------------------------------------------------------------------------------------------
# Configs, prompts and batches.


def eviction_configs(policies: Sequence[str] | str, budgets: Sequence[int] | int,
                     window: int | None = None, divide_length: int | None = None
                     ) -> list[EvictionConfig]:
    """One `EvictionConfig` per (policy, budget); "full" once. Raises ValueError early."""
    if isinstance(policies, str):
        policies = [p.strip() for p in policies.split(",") if p.strip()]
    budgets = [budgets] if isinstance(budgets, numbers.Integral) else list(budgets)
    # numpy integers (a sweep built with np.arange) as plain ints, for json and describe().
    budgets = [int(b) if isinstance(b, numbers.Integral) and not isinstance(b, bool) else b
               for b in budgets]
    policies = list(dict.fromkeys(policies))
    if not policies:
        raise ValueError(f"policies: give at least one of {POLICIES}")
    for policy in policies:
        if policy not in POLICIES:
            raise ValueError(f"policies: unknown policy {policy!r}; valid policies are "
                             f"{', '.join(POLICIES)}")
    common = {} if divide_length is None else {"divide_length": divide_length}
    configs = []
    for policy in policies:
        if not get_policy(policy).evicts:
            configs.append(EvictionConfig(policy=policy, **common))
            continue
        if not budgets:
            raise ValueError(f"budgets: policy {policy!r} needs at least one budget")
        for budget in dict.fromkeys(budgets):
            knobs = dict(common, budget=budget)
            # A sweep's window is the observation window; h2o's (the current query) and
            # streaming's (the recent tail) mean something else and keep their own.
            if window is not None and get_policy(policy).window_role == "observation":
                knobs["window"] = window
            configs.append(EvictionConfig(policy=policy, **knobs))
    return configs


def config_name(config: EvictionConfig) -> str:
    """A short name: "full" or "policy@budget"."""
    return config.policy if not config.evicts else f"{config.policy}@{config.budget}"


def format_prompt(example: Example, tokenizer, chat_template: bool | None = None,
                  system_prompt: str | None = None) -> list[int]:
    """The prompt token ids of an example (see `evaluate` for the None defaults)."""
    use_template = example.kind == "math" if chat_template is None else chat_template
    if system_prompt is None:
        system_prompt = R1_SYSTEM_PROMPT if example.kind == "math" else ""
    if use_template:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("chat_template: the tokenizer has no chat template; pass "
                             "chat_template=False")
        return _encode(tokenizer, example.question, True, system_prompt or None)
    text = f"{system_prompt}\n\n{example.question}" if system_prompt else example.question
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    return bos + list(tokenizer(text, add_special_tokens=False)["input_ids"])


def resolve_max_new_tokens(max_new_tokens: int | None, examples: Sequence[Example],
                           prompts: Sequence[Sequence[int]], model) -> int:
    """The given value, checked against the context, or the kind's default capped to fit."""
    context = model.config.max_position_embeddings
    longest = max(len(p) for p in prompts)
    if max_new_tokens is None:
        default = max(DEFAULT_MAX_NEW_TOKENS[e.kind] for e in examples)
        return max(1, min(default, context - longest))
    _check_positive("max_new_tokens", max_new_tokens)
    if longest + max_new_tokens > context:
        raise ValueError(f"max_new_tokens: the longest prompt ({longest} tokens) + "
                         f"{max_new_tokens} exceeds the model's context ({context})")
    return max_new_tokens


def plan_batches(prompt_lengths: Sequence[int], configs: Sequence[EvictionConfig],
                 samples: int, batch_size: int,
                 prompt_buckets: Sequence[int] | None = None) -> list[Batch]:
    """Every batch of the run, in run order: config, sample, prompt bucket, chunk.

    Problems are sorted by prompt length (then index) and chunked within their bucket;
    every batch has `min(batch_size, number of problems)` rows, so a (config, bucket)
    compiles once. The plan depends only on its arguments (a resumed run re-plans the same
    batches, so a sampled row gets the same random stream as in an uninterrupted run).
    """
    order = sorted(range(len(prompt_lengths)), key=lambda i: (prompt_lengths[i], i))
    groups: dict[int, list[int]] = {}
    for i in order:
        groups.setdefault(bucket_length(prompt_lengths[i], prompt_buckets), []).append(i)
    size = min(batch_size, len(prompt_lengths))
    chunks = [(bucket, tuple(indices[start:start + size]))
              for bucket, indices in sorted(groups.items())
              for start in range(0, len(indices), size)]
    return [Batch(config, sample, bucket, chunk, size)
            for config in configs for sample in range(samples) for bucket, chunk in chunks]


def _batch_prompts(batch: Batch, prompts: Sequence[list[int]]) -> list[list[int]]:
    rows = [prompts[i] for i in batch.indices]
    return rows + [rows[0]] * (batch.size - len(rows))


def report_keys(configs: Sequence[EvictionConfig], examples: Sequence[Example],
                samples: int) -> list[tuple[str, str, int]]:
    """The row keys an evaluation reports, by config, problem and sample."""
    return [(config.describe(), example.id, sample)
            for config in configs for example in examples for sample in range(samples)]


# --------------------------------------------------------------------------------------------
# Results file.


def row_key(row: dict[str, Any]) -> tuple[str, str, int]:
    """A results row's identity: (config description, problem id, sample)."""
    return row["config"], row["problem"], row["sample"]


def _key(batch: Batch, example: Example) -> tuple[str, str, int]:
    return batch.config.describe(), example.id, batch.sample


def batch_rows(batch: Batch, out, examples: Sequence[Example],
               done: Container = ()) -> list[dict[str, Any]]:
    """The graded results rows of a batch's real (not padding) rows not already in `done`.

    `decode_seconds` is the row's share of the batch's run time (by generated tokens);
    `cache_bytes`, `full_cache_bytes` are the batch's divided by its rows.
    """
    config, stats = batch.config, out.stats
    batch_tokens = max(int(stats["generated_tokens"]), 1)
    rows = []
    for row_index, i in enumerate(batch.indices):
        example = examples[i]
        if _key(batch, example) in done:
            continue
        text, tokens = out.texts[row_index], out.tokens[row_index]
        rows.append({
            "config": config.describe(), "name": config_name(config), "policy": config.policy,
            "budget": config.budget, "window": config.window,
            "divide_length": config.divide_length, "problem": example.id,
            "sample": batch.sample, "answer": example.answer,
            "prediction": grading.extract(example.kind, text),
            "correct": grading.grade(example.kind, text, example.answer),
            "generated_tokens": len(tokens),
            "decode_seconds": float(stats["run_seconds"]) * len(tokens) / batch_tokens,
            "cache_bytes": stats["cache_bytes"] / batch.size,
            "full_cache_bytes": stats["full_cache_bytes"] / batch.size,
            "text": text,
        })
    return rows


def read_results(path: str) -> list[dict[str, Any]]:
    """The rows of a results file (none if it does not exist).

    A last line without its newline (a write cut off by an interruption) is dropped from
    the file; any other line that is not JSON raises ValueError naming the line.
    """
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    complete = data[:data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    rows = []
    for line_number, line in enumerate(complete.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            reason = getattr(err, "msg", None) or f"not UTF-8: {err.reason}"
            raise ValueError(f"{path}, line {line_number}: not a results row ({reason})"
                             ) from None
    return rows


def append_results(path: str, rows: Sequence[dict[str, Any]]) -> None:
    """Appends rows as JSON lines and flushes them to disk."""
    if not rows:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(row) + "\n" for row in rows))
        f.flush()
        os.fsync(f.fileno())


def check_settings(output_dir: str, settings: dict[str, Any], has_results: bool) -> None:
    """Checks that a resumed run is the run whose rows are already in `output_dir`.

    Compared with `settings.json`: every setting (dataset, max_new_tokens, sampling, prompt
    formatting, model config and dtype, weights fingerprint), and `settings["problems"]`
    (id -> fingerprint) on the problems both runs share, so an edited, reordered or
    extended dataset file cannot pass its old rows off as answers to the new problems. A
    settings.json written before fingerprints existed is refused too: its rows cannot be
    checked. Without results yet, (re)writes `settings.json`; on a resume, adds the
    fingerprints of problems it did not have (a larger num_problems).

    Raises:
      ValueError: what differs, and how to start fresh (another output_dir, or delete it).
    """
    path = os.path.join(output_dir, SETTINGS_FILE)
    settings = json.loads(json.dumps(settings))
    if not has_results or not os.path.exists(path):
        _write_json(path, settings)
        return
    saved = _read_settings(path)
    differing = [f"{key}: {saved[key]!r} there, {value!r} now"
                 + (" (another checkpoint, or changed weights)" if key == "weights" else "")
                 for key, value in settings.items()
                 if key != "problems" and key in saved and saved[key] != value]
    missing = [key for key in ("weights", "problems") if key in settings and key not in saved]
    if missing:
        differing.append(f"{SETTINGS_FILE} has no {' or '.join(missing)} fingerprint "
                         "(written by an older gkv-jax), so its rows cannot be checked")
    saved_problems = saved.get("problems") or {}
    problems = settings.get("problems") or {}
    changed = [pid for pid, h in problems.items() if pid in saved_problems
               and saved_problems[pid] != h]
    if changed:
        differing.append(
            f"{len(changed)} problem(s) differ from the ones answered there, first "
            f"{changed[0]!r} (an edited, reordered or replaced dataset file, or another "
            "tokenizer or prompt format)")
    if differing:
        raise ValueError(
            f"output_dir: {output_dir} holds results of another run "
            f"({'; '.join(differing)}); to start fresh, use another output_dir "
            f"(--output-dir) or delete {output_dir} yourself")
    if any(pid not in saved_problems for pid in problems):
        _write_json(path, {**saved, "problems": {**saved_problems, **problems}})


def weights_fingerprint(model) -> str:
    """A short hash of a model's parameters: each weight's name, shape, dtype and two
    checksums of its bits (a plain and a position-weighted sum, modulo 2**32).

    Integer sums of the bits are exact and order-free, so the fingerprint is the same on
    every backend and sharding; they are computed where the weights live, and only two
    numbers per weight come back to the host.
    """
    params = model.params()
    checksums = jax.device_get(_bit_checksums(params))
    parts = [f"{jax.tree_util.keystr(path)} {tuple(leaf.shape)} {jnp.dtype(leaf.dtype).name} "
             f"{' '.join(str(int(c)) for c in sums)}"
             for (path, leaf), sums in zip(jax.tree_util.tree_leaves_with_path(params),
                                           jax.tree.leaves(checksums, is_leaf=_is_pair),
                                           strict=True)]
    return _hash("\n".join(sorted(parts)))


def problem_fingerprints(examples: Sequence[Example],
                         prompts: Sequence[Sequence[int]]) -> dict[str, str]:
    """id -> short hash of the problem's kind, question, answer and prompt token ids."""
    return {e.id: _hash(json.dumps([e.kind, e.question, e.answer, [int(t) for t in p]]))
            for e, p in zip(examples, prompts, strict=True)}


_POSITION_MODULUS = 65521  # position weights 1..65521: a moved value changes the sum


@jax.jit
def _bit_checksums(params):
    def checksums(x):
        width = min(jnp.dtype(x.dtype).itemsize, 4)
        bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * width}"))
        bits = bits.reshape(-1).astype(jnp.uint32)
        weights = jnp.arange(bits.size, dtype=jnp.uint32) % _POSITION_MODULUS + 1
        return bits.sum(dtype=jnp.uint32), (bits * weights).sum(dtype=jnp.uint32)
    return jax.tree.map(checksums, params)


def _is_pair(x) -> bool:
    return isinstance(x, tuple)


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _read_settings(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a settings file ({err}); delete the output "
                         "directory or use another output_dir") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: not a settings file (expected a JSON object)")
    return saved


def _write_json(path: str, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)


# --------------------------------------------------------------------------------------------
# Summary: pass@k, csv, table, plot.


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


def _model_description(model) -> str:
    """The title's model when no model_name is given: its family and size."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "num_parameters"):
        return "model"
    count = config.num_parameters()
    size = next(f"{count / scale:.3g}{unit}" for scale, unit in
                ((1e9, "B"), (1e6, "M"), (1e3, "k"), (1, "")) if count >= scale or scale == 1)
    return f"{config.family} model ({size} parameters)"


def _write_report(rows, configs, samples, pass_k, output_dir, title) -> EvalReport:
    summary = summarize(rows, configs, samples, pass_k)
    report = EvalReport(rows=rows, summary=summary,
                        results_path=os.path.join(output_dir, RESULTS_FILE),
                        summary_path=os.path.join(output_dir, SUMMARY_FILE),
                        plot_path=os.path.join(output_dir, PLOT_FILE))
    write_summary_csv(summary, report.summary_path)
    plot_accuracy(summary, report.plot_path, title=title)
    return report


# --------------------------------------------------------------------------------------------
# Small helpers.


def _examples(dataset, num_problems) -> tuple[list[Example], str]:
    if isinstance(dataset, str | os.PathLike):
        return load_dataset(os.fspath(dataset), num_problems), os.fspath(dataset)
    examples = list(dataset)
    if not examples or not all(isinstance(e, Example) for e in examples):
        raise ValueError("dataset must be a dataset name, a .jsonl path or a non-empty list "
                         "of gkv_jax.datasets.Example")
    if num_problems is not None:
        _check_positive("num_problems", num_problems)
        examples = examples[:num_problems]
    if len({e.id for e in examples}) != len(examples):
        raise ValueError("dataset: example ids must be unique")
    return examples, "custom"


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
