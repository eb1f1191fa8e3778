"""lm-evaluation-harness against `gkv-jax serve`, next to `gkv-jax eval` on the same problems.

Writes a local lm-eval task (a JSON-lines file of the bundled model's held-out problems and
a task YAML: no hub download), serves the bundled model on 127.0.0.1 with gkv at budget 136
(window 16, divide_length 16), runs lm-eval's `local-completions` model against it (text
requests, which the server tokenizes with the model's own tokenizer, BOS included as the
model was trained; greedy; the answer extracted with the task's own rule, the two digits
after the last `ans `), then runs `gkv-jax eval` on the same problems with the same
eviction, and prints both accuracies.

Usage:
  python benchmarks/lm_eval_serve.py [--num-problems 64] [--workdir DIR] [--results FILE]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TASK = "gkv_bundled_walk"
DATA_FILE = "problems.jsonl"
EVICTION = dict(policy="gkv", budget=136, window=16, divide_length=16)
MAX_NEW_TOKENS = 520  # `gkv-jax eval`'s default for the synthetic task
NO_ANSWER = "[invalid]"  # lm-eval's regex filter when nothing matches


def write_task(directory: Path, num_problems: int) -> Path:
    """The task directory: the problems as JSON lines and the task's YAML."""
    from gkv_jax.datasets import synthetic_examples

    task_dir = Path(directory) / "lm_eval_task"
    task_dir.mkdir(parents=True, exist_ok=True)
    with open(task_dir / DATA_FILE, "w") as f:
        for example in synthetic_examples(num_problems):
            f.write(json.dumps({"id": example.id, "question": example.question,
                                "answer": example.answer}) + "\n")
    data = json.dumps(str((task_dir / DATA_FILE).resolve()))
    (task_dir / f"{TASK}.yaml").write_text(f"""\
task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["</s>"]
  max_gen_toks: {MAX_NEW_TOKENS}
  do_sample: false
  temperature: 0.0
filter_list:
  - name: extract
    filter:
      - function: regex
        regex_pattern: "ans (\\\\d\\\\d)(?!\\\\d)"
        group_select: -1
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")
    return task_dir


def harness_accuracy(directory: Path, num_problems: int, slots: int = 8) -> dict:
    """lm-eval's `local-completions` over the served bundled model."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    import gkv_jax
    from gkv_jax.eviction import EvictionConfig
    from gkv_jax.loading import bundled_model_dir
    from gkv_jax.serve.server import BackgroundServer, build_app

    task_dir = write_task(directory, num_problems)
    model, tokenizer = gkv_jax.load(bundled_model_dir(), progress=False)
    app = build_app(model, tokenizer, EvictionConfig(**EVICTION), slots=slots,
                    max_tokens=MAX_NEW_TOKENS, model_name="bundled")
    with BackgroundServer(app) as server:
        started = time.perf_counter()
        results = lm_eval.simple_evaluate(
            model="local-completions",
            model_args={"model": "bundled", "base_url": server.url + "/v1/completions",
                        # text requests: the server tokenizes them with the model's own
                        # tokenizer (BOS included, as `gkv-jax eval` prompts the model)
                        "tokenizer_backend": None, "tokenized_requests": False,
                        "num_concurrent": slots,
                        "max_gen_toks": MAX_NEW_TOKENS, "max_length": 1024,
                        "max_retries": 1},
            tasks=[TASK], task_manager=TaskManager(include_path=str(task_dir)),
            log_samples=True)
        seconds = time.perf_counter() - started
    metrics = results["results"][TASK]
    samples = results["samples"][TASK]
    return {"exact_match": metrics["exact_match,extract"], "seconds": seconds,
            "answered": len(samples),
            "texts": {s["doc"]["id"]: s["resps"][0][0] for s in samples},
            "predictions": {s["doc"]["id"]: s["filtered_resps"][0] for s in samples}}


def eval_accuracy(directory: Path, num_problems: int) -> dict:
    """`gkv-jax eval` on the same problems with the same eviction (its CLI, greedy)."""
    from gkv_jax.loading import bundled_model_dir

    output = Path(directory) / "gkv_jax_eval"
    command = [sys.executable, "-m", "gkv_jax.cli", "eval", "--model",
               str(bundled_model_dir()), "--dataset", "synthetic", "--num-problems",
               str(num_problems), "--policies", EVICTION["policy"], "--budgets",
               str(EVICTION["budget"]), "--window", str(EVICTION["window"]),
               "--divide-length", str(EVICTION["divide_length"]), "--output-dir", str(output)]
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, text=True,
                   env={**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS",
                                                                       "cpu")})
    seconds = time.perf_counter() - started
    with open(output / "summary.csv") as f:
        row = next(csv.DictReader(f))
    with open(output / "results.jsonl") as f:
        rows = [json.loads(line) for line in f]
    return {"accuracy": float(row["pass@1"]), "seconds": seconds,
            "texts": {r["problem"]: r["text"] for r in rows},
            "predictions": {r["problem"]: r["prediction"] or NO_ANSWER for r in rows}}


def agreement(harness: dict, ours: dict) -> dict:
    """Problems where the two runs generated the same text, and extracted the same answer."""
    ids = sorted(ours["texts"])
    return {"problems": len(ids),
            "same_text": sum(harness["texts"].get(i) == ours["texts"][i] for i in ids),
            "same_answer": sum(harness["predictions"].get(i) == ours["predictions"][i]
                               for i in ids)}


def _figures(run: dict) -> dict:
    return {k: v for k, v in run.items() if k not in ("texts", "predictions")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-problems", type=int, default=64)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--results", default=None)
    args = parser.parse_args()
    directory = Path(args.workdir or tempfile.mkdtemp(prefix="lm_eval_serve_"))
    harness = harness_accuracy(directory, args.num_problems)
    ours = eval_accuracy(directory, args.num_problems)
    print(f"{args.num_problems} held-out problems of the bundled task, eviction {EVICTION}, "
          "greedy")
    print("| harness | accuracy | seconds |")
    print("|---|---:|---:|")
    print(f"| lm-eval `local-completions` against `gkv-jax serve` | "
          f"{harness['exact_match']:.4f} | {harness['seconds']:.1f} |")
    print(f"| `gkv-jax eval` | {ours['accuracy']:.4f} | {ours['seconds']:.1f} |")
    agree = agreement(harness, ours)
    print(f"same generated text on {agree['same_text']} of {agree['problems']} problems, same "
          f"extracted answer on {agree['same_answer']}")
    same = abs(harness["exact_match"] - ours["accuracy"]) < 1e-9
    print("the same accuracy" if same else "THE ACCURACIES DIFFER")
    if args.results:
        with open(args.results, "a") as out:
            out.write(json.dumps({"bench": "lm_eval_serve", "num_problems": args.num_problems,
                                  "eviction": EVICTION, "agreement": agree,
                                  "lm_eval": _figures(harness),
                                  "gkv_jax_eval": _figures(ours)}) + "\n")
    raise SystemExit(0 if same else 1)


if __name__ == "__main__":
    main()
