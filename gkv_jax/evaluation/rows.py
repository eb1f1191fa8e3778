"""An evaluation's rows: one per (config, problem, sample), graded.

`engine_rows` generates the rows of one eviction config through one `gkv_jax.Engine`
(continuous batching: a finished row's slot takes the next request at once, so long-tailed
answer lengths do not leave most of a batch idle); the samples of a problem share one
prefill. Request (problem, sample s) is drawn with seed `seed + s`, so its row equals
`generate([prompt], seed=seed + s)` alone, and equals the row of a static batch
(`plan_batches` / `batch_rows`, what `evaluate` ran before the engine), whatever the slots.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Container, Sequence
from typing import Any

import numpy as np

from gkv_jax import grading
from gkv_jax.datasets import Example
from gkv_jax.engine import Engine
from gkv_jax.evaluation.configs import config_name
from gkv_jax.eviction import EvictionConfig
from gkv_jax.generation import padded_batch_size, resolve_mesh


def make_row(config: EvictionConfig, example: Example, sample: int, text: str,
             tokens: Sequence[int], decode_seconds: float, cache_bytes: float,
             full_cache_bytes: float) -> dict[str, Any]:
    """A graded results row (the fields of `results.jsonl`)."""
    return {
        "config": config.describe(), "name": config_name(config), "policy": config.policy,
        "budget": config.budget, "window": config.window,
        "divide_length": config.divide_length, "problem": example.id, "sample": sample,
        "answer": example.answer, "prediction": grading.extract(example.kind, text),
        "correct": grading.grade(example.kind, text, example.answer),
        "generated_tokens": len(tokens), "decode_seconds": decode_seconds,
        "cache_bytes": cache_bytes, "full_cache_bytes": full_cache_bytes, "text": text,
    }


def engine_rows(model, tokenizer, config: EvictionConfig, examples: Sequence[Example],
                prompts: Sequence[Sequence[int]], wanted: Container[tuple[int, int]],
                samples: int, *, max_new_tokens: int, temperature: float, top_p: float,
                top_k: int, seed: int, slots: int, prompt_buckets=None, mesh=None,
                on_rows: Callable[[list[dict[str, Any]]], None],
                on_request: Callable[[], None] = lambda: None) -> None:
    """Generates, grades and hands over (`on_rows`, in chunks of about `slots` rows, in
    finishing order) the rows of `config` for every (problem index, sample) in `wanted`.

    `decode_seconds` of a row is its share, by generated tokens, of the wall time between
    two chunks; `cache_bytes` is one slot's cache, `full_cache_bytes` what a full cache
    holds at the row's final length. `on_request()` is called once per finished row (a
    progress bar). Rows finished before an interruption are handed over before it
    propagates.
    """
    todo = [(i, s) for i in range(len(examples)) for s in range(samples) if (i, s) in wanted]
    if not todo:
        return
    engine = Engine(model, tokenizer, config,
                    slots=padded_batch_size(min(slots, len(todo)), resolve_mesh(model, mesh)),
                    max_new_tokens=max_new_tokens,
                    max_prompt_length=max(len(prompts[i]) for i, _ in todo),
                    prompt_buckets=prompt_buckets, mesh=mesh)
    owner = {}
    by_problem: dict[int, list[int]] = {}
    for i, s in todo:
        by_problem.setdefault(i, []).append(s)
    # Shortest prompts first, as the static planner does: one bucket's groups prefill together.
    for i in sorted(by_problem, key=lambda i: (len(prompts[i]), i)):
        ids = engine.submit_group(prompts[i], [seed + s for s in by_problem[i]],
                                  max_new_tokens=max_new_tokens, temperature=temperature,
                                  top_p=top_p, top_k=top_k)
        owner.update(zip(ids, ((i, s) for s in by_problem[i]), strict=True))
    per_token = _cache_bytes_per_token(model)
    slot_bytes = engine.stats["cache_bytes_per_slot"]
    chunk: list[tuple[dict[str, Any], int]] = []
    last = time.perf_counter()

    def flush():
        nonlocal chunk, last
        now = time.perf_counter()
        tokens = max(sum(n for _, n in chunk), 1)
        rows = [dict(row, decode_seconds=(now - last) * n / tokens) for row, n in chunk]
        chunk, last = [], now
        if rows:
            on_rows(rows)

    try:
        for event in engine.stream():
            if not event.finished:
                continue
            output = event.output
            i, s = owner[event.request_id]
            text = output.text if output.text is not None else ""
            chunk.append((make_row(config, examples[i], s, text, output.tokens, 0.0,
                                   slot_bytes,
                                   per_token * (len(prompts[i]) + len(output.tokens))),
                          len(output.tokens)))
            on_request()
            if len(chunk) >= engine.num_slots:  # a count, the same on every process
                flush()
    finally:
        flush()


def _cache_bytes_per_token(model) -> int:
    """Bytes one token's keys and values take in every layer of a full cache."""
    config = model.config
    return (config.num_layers * config.num_kv_heads * 2 * config.head_dim
            * np.dtype(model.dtype).itemsize)
