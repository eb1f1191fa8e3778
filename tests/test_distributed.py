"""Several processes, one job: `gkv_jax.distributed.initialize`'s checks, and two processes of
4 CPU devices each running `generate` and `evaluate` on meshes over all 8 devices, compared
with each other and with one process (the worker is tests/distributed_worker.py)."""

from __future__ import annotations

import csv
import json
import os
import re
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import jax
import numpy as np
import pytest

from gkv_jax import distributed
from gkv_jax.conversion import to_hf
from gkv_jax.evaluation import run as evaluation_run
from gkv_jax.evaluation.rows import make_row
from tests import distributed_worker

REPO = Path(__file__).resolve().parent.parent
WORKER_TIMEOUT_S = 600


@pytest.fixture
def fresh(monkeypatch):
    """`distributed` as in a new process, with `jax.distributed.initialize` recorded instead
    of run."""
    calls = []
    monkeypatch.setattr(distributed, "_STARTED", None)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    return calls


@pytest.mark.parametrize("kwargs, message", [
    (dict(coordinator_address="localhost", num_processes=2, process_id=0), "host:port"),
    (dict(coordinator_address=":1234", num_processes=2, process_id=0), "host:port"),
    (dict(coordinator_address="host:0", num_processes=2, process_id=0), "host:port"),
    (dict(coordinator_address="host:65536", num_processes=2, process_id=0), "host:port"),
    (dict(coordinator_address=("host", 1), num_processes=2, process_id=0), "host:port"),
    (dict(coordinator_address="host:1", num_processes=0, process_id=0),
     r"num_processes must be an integer >= 1, got 0"),
    (dict(coordinator_address="host:1", num_processes=2.0, process_id=0), "num_processes"),
    (dict(coordinator_address="host:1", num_processes=True, process_id=0), "num_processes"),
    (dict(coordinator_address="host:1", num_processes=2, process_id=2),
     r"process_id must be an integer in \[0, 2\), got 2"),
    (dict(coordinator_address="host:1", num_processes=2, process_id=-1), "process_id"),
    (dict(coordinator_address="host:1", num_processes=2), "without process_id"),
    (dict(num_processes=2, process_id=1), "without coordinator_address"),
])
def test_initialize_rejects_bad_arguments_before_touching_jax(fresh, kwargs, message):
    with pytest.raises(ValueError, match=message):
        distributed.initialize(**kwargs)
    assert fresh == []


def test_initialize_once_then_same_call_is_a_no_op(fresh, monkeypatch):
    name = "jax_cpu_collectives_implementation"
    before = getattr(jax.config, name)
    jax.config.update(name, None)
    try:
        distributed.initialize("[::1]:1234", 2, 1, local_device_ids=0)
        assert getattr(jax.config, name) == "gloo"  # CPU processes need a collectives backend
    finally:
        jax.config.update(name, before)
    distributed.initialize("[::1]:1234", 2, 1, local_device_ids=[0])
    assert fresh == [dict(coordinator_address="[::1]:1234", num_processes=2, process_id=1,
                          local_device_ids=[0])]
    with pytest.raises(RuntimeError, match="already called with other arguments"):
        distributed.initialize("[::1]:1234", 2, 0)
    # Auto-detection (TPU pods, SLURM) passes no arguments at all.
    monkeypatch.setattr(distributed, "_STARTED", None)
    distributed.initialize()
    assert fresh[-1]["coordinator_address"] is None
    monkeypatch.setattr(distributed, "_STARTED", None)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    with pytest.raises(RuntimeError, match="already initialized"):
        distributed.initialize()


def _scripted_rows(model, tokenizer, config, examples, prompts, wanted, samples, *, on_rows,
                   **kwargs):
    """Each row answers its prompt's length; nothing compiled."""
    on_rows([make_row(config, examples[i], s, f"#### {len(prompts[i])}", [1, 2, 3], 0.5, 64,
                      128) for i in range(len(examples)) for s in range(samples)
             if (i, s) in wanted])


class _CharTokenizer:
    """Just what `format_prompt` needs of a tokenizer."""

    bos_token_id = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 64 for c in text]}


def test_only_process_0_touches_output_dir(tmp_path, monkeypatch):
    """A process other than 0 creates, writes and reads nothing of output_dir (it would get
    process 0's files by broadcast), yet reports what process 0 reports."""
    model = types.SimpleNamespace(params=lambda: {"w": np.ones(3, np.float32)},
                                  config=types.SimpleNamespace(max_position_embeddings=64))
    tokenizer = _CharTokenizer()
    monkeypatch.setattr(evaluation_run, "engine_rows", _scripted_rows)
    kwargs = dict(policies="full", num_problems=2, max_new_tokens=8, progress=False)
    main = evaluation_run.evaluate(model, tokenizer, output_dir=str(tmp_path / "main"),
                                   **kwargs)
    assert sorted(os.listdir(tmp_path / "main")) == sorted(
        [".gkv-jax-eval", "accuracy_vs_budget.png", "results.jsonl", "settings.json",
         "summary.csv"])
    monkeypatch.setattr(jax, "process_index", lambda *args: 1)
    other = evaluation_run.evaluate(model, tokenizer, output_dir=str(tmp_path / "other"),
                                    **kwargs)
    assert sorted(os.listdir(tmp_path)) == ["main"]
    assert other.rows == main.rows and len(main.rows) == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _worker_env() -> dict[str, str]:
    """This process's environment with 4 CPU devices instead of the conftest's 8."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                   env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=4".strip()
    return env


def _run_two_processes(tmp_path: Path, output_dir: Path, checkpoint: Path) -> list[dict]:
    """Both workers' results; a failure or a timeout kills both and shows their output."""
    address = f"localhost:{_free_port()}"
    logs = [tmp_path / f"worker{rank}.log" for rank in range(2)]
    workers = []
    try:
        for rank, log in enumerate(logs):
            command = [sys.executable, "-m", "tests.distributed_worker",
                       str(tmp_path / f"worker{rank}.json"), str(output_dir),
                       str(checkpoint), address, "2", str(rank)]
            with open(log, "w") as out:
                workers.append(subprocess.Popen(command, cwd=REPO, env=_worker_env(),
                                                stdout=out, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + WORKER_TIMEOUT_S
        for process in workers:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for process in workers:
            if process.poll() is None:
                process.kill()
                process.wait()
    codes = [process.returncode for process in workers]
    if codes != [0, 0]:
        output = "\n".join(f"--- worker {rank} ---\n{log.read_text()[-6000:]}"
                           for rank, log in enumerate(logs))
        pytest.fail(f"worker exit codes {codes} (-9: killed after {WORKER_TIMEOUT_S} s):\n"
                    f"{output}")
    return [json.loads((tmp_path / f"worker{rank}.json").read_text()) for rank in range(2)]


def _without(rows, *fields):
    return [{k: v for k, v in r.items() if k not in fields} for r in rows]


@pytest.mark.slow
def test_two_processes_generate_and_evaluate_as_one(tmp_path):
    output_dir = tmp_path / "eval"
    checkpoint = tmp_path / "checkpoint"
    to_hf(distributed_worker.tiny_model(), checkpoint)
    first, second = _run_two_processes(tmp_path, output_dir, checkpoint)
    reference = distributed_worker.run_cases(str(tmp_path / "reference"), meshes=(None,),
                                             checkpoint=str(checkpoint))

    assert (first["process_index"], second["process_index"]) == (0, 1)
    assert first["process_count"] == second["process_count"] == 2
    # The load: each process read about half of the checkpoint (its own blocks; the KV
    # projections and norms, not split, whole), and the shards of both are the one-process
    # load's.
    loads = [first.pop("load"), second.pop("load")]
    alone_load = reference["load"]
    assert all(load["bytes_copied"] <= 0.6 * alone_load["bytes_copied"] for load in loads), (
        [load["bytes_copied"] for load in loads], alone_load["bytes_copied"])
    assert sum(load["bytes_copied"] for load in loads) >= alone_load["bytes_copied"]
    for name, shards in alone_load["shards"].items():
        assert sorted(loads[0]["shards"][name] + loads[1]["shards"][name]) == sorted(
            shards), name
    # Every process gets every row of every output back, the same on both.
    assert first == {**second, "process_index": 0}
    alone = reference["generate"]["none"]
    assert set(first["generate"]) == {f"{d}x{m}" for d, m in distributed_worker.MESHES}
    for name, out in first["generate"].items():
        assert out["devices"] == 8, name
        for field in ("tokens", "kept_positions", "visible_until", "compressions"):
            assert out[field] == alone[field], (name, field)
        assert len(out["tokens"]) == len(distributed_worker.PROMPT_LENGTHS)
        for row, row_alone in zip(out["logprobs"], alone["logprobs"], strict=True):
            np.testing.assert_allclose(row, row_alone, atol=1e-4)
    assert alone["compressions"] > 0  # the budget was reached: evictions happened

    # The evaluation and its resumption: the rows of one process, timings aside.
    timed = ("decode_seconds",)
    for run, run_alone in zip(first["evaluate"], reference["evaluate"], strict=True):
        assert _without(run["rows"], *timed) == _without(run_alone["rows"], *timed)
        assert (_without(run["summary"], "tokens_per_second")
                == _without(run_alone["summary"], "tokens_per_second"))
    initial, resumed = first["evaluate"]
    kept = {(r["config"], r["problem"]): r for r in initial["rows"]}
    reread = [r for r in resumed["rows"] if (r["config"], r["problem"]) in kept]
    assert reread == list(kept.values())  # read back from process 0's file, not regenerated
    assert len(resumed["rows"]) == len(initial["rows"]) + 2  # 1 problem more, 2 configs

    # Process 0 alone wrote output_dir: each row once, the files whole.
    assert sorted(os.listdir(output_dir)) == sorted(
        [".gkv-jax-eval", "accuracy_vs_budget.png", "results.jsonl", "settings.json",
         "summary.csv"])
    lines = (output_dir / "results.jsonl").read_text().splitlines()
    assert sorted(lines) == sorted(json.dumps(r) for r in resumed["rows"])
    settings = json.loads((output_dir / "settings.json").read_text())
    assert len(settings["problems"]) == distributed_worker.EVAL_PROBLEMS + 1
    with open(output_dir / "summary.csv", newline="") as f:
        summary = list(csv.DictReader(f))
    assert [float(s["pass@1"]) for s in summary] == [s["pass@1"] for s in resumed["summary"]]
    assert (output_dir / "accuracy_vs_budget.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
