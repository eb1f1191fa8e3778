"""`evaluate`: generates the rows of an evaluation that are not stored yet (each eviction
config's through one `gkv_jax.Engine`, `rows.engine_rows`), grades and stores them, and
reports the summary. `plan_batches` / `batch_rows` are the static path (fixed `generate`
batches, one prompt bucket each) that the engine replaced; they stay as its reference.

`engine_rows` is looked up here, in `gkv_jax.evaluation.run`: a test that replaces it
patches this module.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from collections.abc import Container, Sequence
from typing import Any

from tqdm.auto import tqdm

from gkv_jax.datasets import Example
from gkv_jax.distributed import is_main_process
from gkv_jax.evaluation.configs import check_positive, config_name, eviction_configs
from gkv_jax.evaluation.prompts import format_prompts, load_examples, resolve_max_new_tokens
from gkv_jax.evaluation.rows import engine_rows, make_row
from gkv_jax.evaluation.store import (
    RESULTS_FILE,
    append_results,
    check_settings,
    claim_output_dir,
    problem_fingerprints,
    read_results,
    row_key,
    shared_rows,
    weights_fingerprint,
)
from gkv_jax.evaluation.summary import (
    PLOT_FILE,
    SUMMARY_FILE,
    format_table,
    plot_accuracy,
    plot_title,
    summarize,
    write_summary_csv,
)
from gkv_jax.eviction import EvictionConfig
from gkv_jax.generation import resolve_mesh
from gkv_jax.generation_inputs import bucket_length
from gkv_jax.sampling import SamplingParams


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
             progress: bool = True, model_name: str | None = None, mesh=None) -> EvalReport:
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
      batch_size: the engine's slots: rows decoded together (at most the rows to run; a
        finished row's slot takes the next row at once).
      chat_template: None = by dataset kind (math: the tokenizer's chat template; synthetic:
        BOS + prompt, as the bundled model was trained).
      system_prompt: None = by kind (math: `R1_SYSTEM_PROMPT`; synthetic: none); "" = none.
        Without a chat template it is prepended to the question, a blank line between.
      prompt_buckets: padded prompt lengths, as in `generate`.
      output_dir: where results.jsonl, summary.csv, accuracy_vs_budget.png and
        settings.json go: a new or empty directory (marked as an evaluation's by a
        `.gkv-jax-eval` file), or a previous evaluation's; any other directory is refused
        (ValueError), so no file of the user's is replaced. Rows already in results.jsonl
        are not generated again, provided settings.json shows they were made with these
        settings, these weights (a checksum of every parameter) and these problems (a hash
        of each problem's id, question, answer and prompt tokens); otherwise ValueError,
        before any generation. In a multi-process job (`gkv_jax.distributed`) every process
        makes the same call; process 0 alone reads and writes output_dir (its own disk: the
        directory need not be shared) and hands every process its rows, so all return the
        same report.
      progress: show a progress bar over batches and print the table and paths at the end
        (process 0 only).
      model_name: the model's name in the plot's title (None = its family and size).
      mesh: a `jax.sharding.Mesh` (`gkv_jax.sharding.make_mesh`) to run every batch on, as
        `generate(..., mesh=)` does: rows over `data` (a batch that `data` does not divide
        is padded, the padding rows dropped), weights over `model`. None = the mesh the
        model is on, if any.

    Raises:
      ValueError: naming the parameter, before any generation: an unknown policy or
        dataset, a bad budget or knob, samples/batch_size/pass_k < 1, bad sampling values,
        a prompt plus max_new_tokens beyond the context, a dataset the tokenizer cannot
        encode, an output_dir that is a file, holds files that are not an evaluation's, or
        holds a run with other settings, or a model sharded over another mesh than `mesh`.
    """
    configs = eviction_configs(policies, budgets, window, divide_length)
    mesh = resolve_mesh(model, mesh)
    check_positive("samples", samples)
    check_positive("batch_size", batch_size)
    pass_k = (pass_k,) if isinstance(pass_k, numbers.Integral) else tuple(pass_k)
    for k in pass_k:
        check_positive("pass_k", k)
    SamplingParams.create(temperature, top_p, top_k)
    examples, label = load_examples(dataset, num_problems)
    prompts = format_prompts(examples, tokenizer, chat_template, system_prompt)
    max_new_tokens = resolve_max_new_tokens(max_new_tokens, examples, prompts, model)

    main = is_main_process()
    claim_output_dir(output_dir)  # new, empty or an evaluation's own; nothing else is written
    results_path = os.path.join(output_dir, RESULTS_FILE)
    done = {row_key(r): r for r in read_results(results_path)}
    check_settings(output_dir, has_results=bool(done), settings={
        "dataset": label, "max_new_tokens": max_new_tokens, "temperature": float(temperature),
        "top_p": float(top_p), "top_k": int(top_k), "seed": int(seed),
        "chat_template": chat_template, "system_prompt": system_prompt,
        "model": f"{getattr(model, 'config', None)!r} {getattr(model, 'dtype', None)}",
        "weights": weights_fingerprint(model),
        "problems": problem_fingerprints(examples, prompts)})
    pending = {config: {(i, s) for i, e in enumerate(examples) for s in range(samples)
                        if (config.describe(), e.id, s) not in done} for config in configs}

    with tqdm(total=sum(map(len, pending.values())), desc=f"eval {label}", unit="row",
              disable=not (progress and main)) as bar:
        def store(rows):
            new_rows = shared_rows(rows)
            append_results(results_path, new_rows)
            done.update((row_key(r), r) for r in new_rows)

        for config in (c for c in configs if pending[c]):
            bar.set_postfix_str(config_name(config))
            engine_rows(model, tokenizer, config, examples, prompts, pending[config], samples,
                        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                        top_k=top_k, seed=seed, slots=batch_size,
                        prompt_buckets=prompt_buckets, mesh=mesh, on_rows=store,
                        on_request=lambda: bar.update(1))

    rows = [done[key] for key in report_keys(configs, examples, samples)]
    title = plot_title(model_name or _model_description(model), label, len(examples),
                       max(map(len, prompts)) + max_new_tokens)
    report = _write_report(rows, configs, samples, pass_k, output_dir, title)
    if progress and main:
        print(report.table())
        print(f"results: {report.results_path}\nsummary: {report.summary_path}\n"
              f"plot:    {report.plot_path}")
    return report


def plan_batches(prompt_lengths: Sequence[int], configs: Sequence[EvictionConfig],
                 samples: int, batch_size: int,
                 prompt_buckets: Sequence[int] | None = None) -> list[Batch]:
    """Every batch of the static path, in run order: config, sample, prompt bucket, chunk.

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


def batch_prompts(batch: Batch, prompts: Sequence[list[int]]) -> list[list[int]]:
    """The prompts of a static batch, padded with repeats of its first; it runs with
    `generate(..., seed=[seed + batch.sample] * batch.size)`, one seed per row, which gives
    each row the row `evaluate` stores."""
    rows = [prompts[i] for i in batch.indices]
    return rows + [rows[0]] * (batch.size - len(rows))


def report_keys(configs: Sequence[EvictionConfig], examples: Sequence[Example],
                samples: int) -> list[tuple[str, str, int]]:
    """The row keys an evaluation reports, by config, problem and sample."""
    return [(config.describe(), example.id, sample)
            for config in configs for example in examples for sample in range(samples)]


def _key(batch: Batch, example: Example) -> tuple[str, str, int]:
    return batch.config.describe(), example.id, batch.sample


def batch_rows(batch: Batch, out, examples: Sequence[Example],
               done: Container = ()) -> list[dict[str, Any]]:
    """The graded results rows of a static batch's real (not padding) rows not already in
    `done` (the static path: `out` is `generate`'s output for `batch`).

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
        rows.append(make_row(
            config, example, batch.sample, text, tokens,
            decode_seconds=float(stats["run_seconds"]) * len(tokens) / batch_tokens,
            cache_bytes=stats["cache_bytes"] / batch.size,
            full_cache_bytes=stats["full_cache_bytes"] / batch.size))
    return rows


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
    if is_main_process():
        write_summary_csv(summary, report.summary_path)
        plot_accuracy(summary, report.plot_path, title=title)
    return report
