"""Load test of `gkv-jax serve`: many concurrent `openai` clients, every answer checked.

Starts the server on 127.0.0.1 (in this process, on a free port) with the bundled model,
then sends REQUESTS completions from CLIENTS threads, each an `openai.OpenAI` client: mixed
prompt lengths (a problem, its start, or two problems), mixed `max_tokens`, greedy and
sampled, a third of them streamed, every one with its own seed. Then checks that each
request was answered exactly once and that its tokens equal `generate` alone for its prompt
and seed (one batched `generate` per `max_tokens` and temperature: its row b equals
`generate([prompt_b], seed=seed_b)`), and reports latency percentiles and throughput.

Usage:
  python benchmarks/serve_load.py [--requests 200] [--clients 32] [--slots 16]
      [--results FILE.jsonl]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

MAX_TOKENS = (24, 64, 160, 320)
TEMPERATURES = (0.0, 0.7)
EVICTION = dict(policy="gkv", budget=136, window=16, divide_length=16)


def plan_requests(count: int, seed: int = 0) -> list[dict[str, Any]]:
    """The requests: held-out problems of the bundled task (a whole one, its first 12
    characters, or two in a row: prompts of about 36, 12 and 72 tokens), mixed limits,
    samplers and streaming."""
    import random

    from gkv_jax.datasets import synthetic_examples

    rng = random.Random(seed)
    questions = [e.question for e in synthetic_examples(count + 1, seed=seed + 1)]
    shapes = (lambda i: questions[i], lambda i: questions[i][:12],
              lambda i: questions[i] + questions[i + 1])
    return [{"id": i, "prompt": rng.choice(shapes)(i), "max_tokens": rng.choice(MAX_TOKENS),
             "temperature": rng.choice(TEMPERATURES), "seed": rng.randrange(2**32),
             "stream": i % 3 == 0} for i in range(count)]


def send(client, request: dict[str, Any]) -> dict[str, Any]:
    """One request through the openai client; its token ids, text and latency."""
    started = time.perf_counter()
    kwargs = dict(model="bundled", prompt=request["prompt"], max_tokens=request["max_tokens"],
                  temperature=request["temperature"], seed=request["seed"],
                  extra_body={"return_token_ids": True})
    if request["stream"]:
        tokens, text, first = [], "", None
        for chunk in client.completions.create(stream=True, **kwargs):
            first = first or time.perf_counter()
            tokens += chunk.choices[0].model_extra.get("token_ids") or []
            text += chunk.choices[0].text
    else:
        choice = client.completions.create(**kwargs).choices[0]
        tokens, text, first = choice.model_extra["token_ids"], choice.text, None
    done = time.perf_counter()
    return {"id": request["id"], "tokens": tokens, "text": text, "seconds": done - started,
            "first_token_seconds": None if first is None else first - started}


def run_load(requests: list[dict[str, Any]], clients: int, slots: int) -> dict[str, Any]:
    """Serves `requests` from `clients` threads; returns the answers and the timings."""
    import openai

    import gkv_jax
    from gkv_jax.eviction import EvictionConfig
    from gkv_jax.loading import bundled_model_dir
    from gkv_jax.serve.server import BackgroundServer, build_app

    model, tokenizer = gkv_jax.load(bundled_model_dir(), progress=False)
    app = build_app(model, tokenizer, EvictionConfig(**EVICTION), slots=slots,
                    max_tokens=max(MAX_TOKENS), max_queue=len(requests), model_name="bundled")
    local = threading.local()

    def client():
        if not hasattr(local, "client"):
            local.client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused",
                                         max_retries=0, timeout=600)
        return local.client

    with BackgroundServer(app) as server:
        send(client(), {**requests[0], "stream": False})  # compiles the engine's programs
        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            answers = list(pool.map(lambda r: send(client(), r), requests))
        wall = time.perf_counter() - started
    return {"answers": answers, "wall_seconds": wall, "model": model, "tokenizer": tokenizer}


def references(requests: list[dict[str, Any]], model, tokenizer) -> dict[int, list[int]]:
    """`generate` alone for every request (batched by limit and temperature)."""
    import gkv_jax
    from gkv_jax.eviction import EvictionConfig

    out = {}
    for limit in MAX_TOKENS:
        for temperature in TEMPERATURES:
            group = [r for r in requests
                     if r["max_tokens"] == limit and r["temperature"] == temperature]
            if not group:
                continue
            result = gkv_jax.generate(model, [r["prompt"] for r in group], tokenizer,
                                      eviction=EvictionConfig(**EVICTION),
                                      max_new_tokens=limit, temperature=temperature,
                                      seed=[r["seed"] for r in group])
            out.update({r["id"]: tokens for r, tokens in zip(group, result.tokens, strict=True)})
    return out


def check(requests, answers, reference) -> list[str]:
    """Problems found: lost, duplicated or unequal answers (empty when all is well)."""
    problems = []
    ids = [a["id"] for a in answers]
    if sorted(ids) != [r["id"] for r in requests]:
        problems.append(f"answered ids differ from the requests' ({len(ids)} answers)")
    for answer in answers:
        if answer["tokens"] != reference[answer["id"]]:
            problems.append(f"request {answer['id']}: tokens differ from generate alone")
    return problems


def summary(answers, wall: float) -> dict[str, float]:
    latencies = sorted(a["seconds"] for a in answers)
    firsts = sorted(a["first_token_seconds"] for a in answers
                    if a["first_token_seconds"] is not None)

    def percentile(values, q):
        return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]

    tokens = sum(len(a["tokens"]) for a in answers)
    return {"requests": len(answers), "wall_seconds": wall,
            "requests_per_second": len(answers) / wall, "tokens": tokens,
            "tokens_per_second": tokens / wall,
            "latency_p50": percentile(latencies, 0.5), "latency_p99": percentile(latencies, 0.99),
            "latency_mean": statistics.fmean(latencies),
            "first_token_p50": percentile(firsts, 0.5) if firsts else None,
            "first_token_p99": percentile(firsts, 0.99) if firsts else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--results", default=None)
    args = parser.parse_args()
    requests = plan_requests(args.requests)
    result = run_load(requests, args.clients, args.slots)
    problems = check(requests, result["answers"],
                     references(requests, result["model"], result["tokenizer"]))
    figures = summary(result["answers"], result["wall_seconds"])
    print(f"{args.requests} requests from {args.clients} clients, {args.slots} slots, "
          f"eviction {EVICTION}")
    print("| requests | wall (s) | requests/s | tokens | tokens/s | latency p50 (s) | "
          "p99 (s) | streamed: first token p50 (s) | p99 (s) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    f = figures
    print(f"| {f['requests']} | {f['wall_seconds']:.1f} | {f['requests_per_second']:.2f} | "
          f"{f['tokens']} | {f['tokens_per_second']:.0f} | {f['latency_p50']:.2f} | "
          f"{f['latency_p99']:.2f} | {f['first_token_p50']:.2f} | {f['first_token_p99']:.2f} |")
    print("every answer equals generate alone, none lost or duplicated" if not problems
          else "PROBLEMS:\n" + "\n".join(problems))
    if args.results:
        with open(args.results, "a") as out:
            out.write(json.dumps({"bench": "serve_load", "clients": args.clients,
                                  "slots": args.slots, "host": platform.node(),
                                  "problems": problems, **figures}) + "\n")
    raise SystemExit(1 if problems else 0)


if __name__ == "__main__":
    main()
