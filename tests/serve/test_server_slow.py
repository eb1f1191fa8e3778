"""The server under load, and stopped by a signal (slow; the fast siblings are in
test_server.py: the same exactness on single requests, cancellation and the 429).

* 200 requests from 32 concurrent `openai` clients, mixed lengths and samplers, a third
  streamed: none lost or duplicated, every answer equal to `generate` alone.
* `gkv-jax serve` as a subprocess: SIGTERM while a stream runs ends the stream cleanly and
  the process exits 0.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import serve_load  # noqa: E402

pytestmark = pytest.mark.slow


def test_200_requests_from_32_clients_are_each_answered_once_and_exactly():
    requests = serve_load.plan_requests(200)
    result = serve_load.run_load(requests, clients=32, slots=16)
    reference = serve_load.references(requests, result["model"], result["tokenizer"])
    assert serve_load.check(requests, result["answers"], reference) == []
    figures = serve_load.summary(result["answers"], result["wall_seconds"])
    print(json.dumps(figures))  # shown with -s; the benchmark records them
    assert figures["latency_p99"] >= figures["latency_p50"] > 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_ends_open_streams_and_the_process_cleanly(tmp_path):
    from gkv_jax.loading import bundled_model_dir

    port = _free_port()
    log = open(tmp_path / "serve.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "gkv_jax.cli", "serve", "--model", str(bundled_model_dir()),
         "--served-model-name", "bundled", "--policy", "gkv", "--budget", "136",
         "--slots", "2", "--max-tokens", "400", "--port", str(port),
         "--shutdown-timeout", "3"], stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                assert process.poll() is None, (tmp_path / "serve.log").read_text()
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.5)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        stream = client.completions.create(model="bundled", prompt="H5 I9 E1 A1",
                                           max_tokens=400, temperature=0, stream=True)
        chunks = iter(stream)
        next(chunks)
        process.send_signal(signal.SIGTERM)
        ended = time.monotonic()
        try:
            for _ in chunks:  # the stream finishes, or is closed after the grace period
                pass
        except (openai.APIError, Exception):  # noqa: BLE001 (a closed connection is fine)
            pass
        assert process.wait(timeout=60) == 0, (tmp_path / "serve.log").read_text()
        assert time.monotonic() - ended < 60
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
