"""`gkv-jax serve` with the official `openai` client, on 127.0.0.1 only: every answer's
tokens equal `generate` alone for its prompt and seed (completions and chat, streamed and
not, n samples, log-probs); stop strings, cancellation mid-stream, a full queue (429), and
bad requests (400 naming the field) leave every other request unchanged."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

import gkv_jax  # noqa: E402
from gkv_jax import EvictionConfig  # noqa: E402
from gkv_jax.datasets import synthetic_examples  # noqa: E402
from gkv_jax.loading import bundled_model_dir  # noqa: E402
from gkv_jax.serve.server import BackgroundServer, build_app  # noqa: E402

EVICTION = EvictionConfig("gkv", budget=136, window=16, divide_length=16)
MAX_TOKENS = 40
NAME = "bundled"
QUESTIONS = [e.question for e in synthetic_examples(4)]


@pytest.fixture(scope="module")
def bundled():
    return gkv_jax.load(bundled_model_dir(), progress=False)


@pytest.fixture(scope="module")
def server(bundled):
    model, tokenizer = bundled
    app = build_app(model, tokenizer, EVICTION, slots=4, max_tokens=MAX_TOKENS,
                    max_queue=8, model_name=NAME)
    with BackgroundServer(app) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def alone(bundled, prompt, seed, temperature=0.0, max_tokens=MAX_TOKENS, **kwargs):
    model, tokenizer = bundled
    return gkv_jax.generate(model, [prompt], tokenizer, eviction=EVICTION,
                            max_new_tokens=max_tokens, temperature=temperature, seed=seed,
                            return_logprobs=True, **kwargs)


def token_ids(choice) -> list[int]:
    return choice.model_extra["token_ids"]


def post(server, path: str, data: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(server.url + path, data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def metric(server, name: str) -> float:
    text = urllib.request.urlopen(server.url + "/metrics", timeout=10).read().decode()
    values = [float(line.split()[-1]) for line in text.splitlines()
              if line.startswith(name + " ") or line.startswith(name + "{")]
    return sum(values)


def wait_until_idle(server, timeout: float = 30.0) -> None:
    """Until no sample runs (a stop string's cancellation ends after its answer)."""
    deadline = time.monotonic() + timeout
    while metric(server, "gkv_running") > 0:
        assert time.monotonic() < deadline, "the server stayed busy"
        time.sleep(0.05)


def test_completions_equal_generate_alone_streamed_or_not(server, client, bundled):
    greedy = client.completions.create(model=NAME, prompt=QUESTIONS[0], max_tokens=MAX_TOKENS,
                                       temperature=0, seed=1, logprobs=1,
                                       extra_body={"return_token_ids": True})
    reference = alone(bundled, QUESTIONS[0], seed=1)
    choice = greedy.choices[0]
    assert token_ids(choice) == reference.tokens[0]
    assert choice.text == reference.texts[0]
    assert choice.finish_reason == "length"
    assert choice.logprobs.token_logprobs == pytest.approx(reference.logprobs[0], abs=1e-5)
    assert greedy.usage.completion_tokens == MAX_TOKENS
    assert greedy.usage.prompt_tokens == len(reference.prompt_ids[0])

    stream = client.completions.create(model=NAME, prompt=QUESTIONS[1], max_tokens=25,
                                       temperature=0.8, top_p=0.95, seed=7, stream=True,
                                       extra_body={"return_token_ids": True})
    chunks = list(stream)
    reference = alone(bundled, QUESTIONS[1], seed=7, temperature=0.8, top_p=0.95,
                      max_tokens=25)
    assert sum((c.choices[0].model_extra.get("token_ids") or [] for c in chunks), []) \
        == reference.tokens[0]
    assert "".join(c.choices[0].text for c in chunks) == reference.texts[0]
    assert chunks[-1].choices[0].finish_reason == "length"
    assert len(chunks) > 2  # streamed as cycles complete, not in one piece


def test_chat_and_n_samples_equal_generate_alone_with_seeds_seed_plus_j(client, bundled):
    _, tokenizer = bundled
    messages = [{"role": "user", "content": QUESTIONS[2]}]
    answer = client.chat.completions.create(model=NAME, messages=messages, max_tokens=24,
                                            temperature=1.0, seed=100, n=3,
                                            extra_body={"return_token_ids": True})
    ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                             tokenize=True)["input_ids"])
    for j, choice in enumerate(answer.choices):
        reference = alone(bundled, ids, seed=100 + j, temperature=1.0, max_tokens=24)
        assert choice.index == j
        assert token_ids(choice) == reference.tokens[0]
        assert choice.message.content == reference.texts[0]
    streamed = client.chat.completions.create(model=NAME, messages=messages, max_tokens=24,
                                              temperature=1.0, seed=101, stream=True)
    chunks = list(streamed)
    assert chunks[0].choices[0].delta.role == "assistant"
    reference = alone(bundled, ids, seed=101, temperature=1.0, max_tokens=24)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reference.texts[0]


def test_a_stop_string_ends_the_answer_before_it(client, bundled):
    reference = alone(bundled, QUESTIONS[3], seed=0)
    stop = reference.texts[0].splitlines()[1][:4]  # the second line's start
    answer = client.completions.create(model=NAME, prompt=QUESTIONS[3], max_tokens=MAX_TOKENS,
                                       temperature=0, stop=[stop],
                                       extra_body={"return_token_ids": True})
    choice = answer.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.text == reference.texts[0][:reference.texts[0].index(stop)]
    assert token_ids(choice) == reference.tokens[0][:len(token_ids(choice))]


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    (json.dumps({"model": "other", "prompt": "A1"}).encode(), 400, "model"),
    (json.dumps({"prompt": "A1", "temperature": -1}).encode(), 400, "temperature"),
    (json.dumps({"prompt": "A1", "top_p": 0}).encode(), 400, "top_p"),
    (json.dumps({"prompt": "A1", "max_tokens": MAX_TOKENS + 1}).encode(), 400, "max_tokens"),
    (json.dumps({"prompt": "A1", "n": 0}).encode(), 400, "n"),
    (json.dumps({"prompt": "A1", "logprobs": 5}).encode(), 400, "logprobs"),
    (json.dumps({"prompt": "A1", "seed": -3}).encode(), 400, "seed"),
    (json.dumps({"prompt": "A1", "stop": [""]}).encode(), 400, "stop"),
    (json.dumps({"prompt": [1, 10**6]}).encode(), 400, "prompt"),
    (json.dumps({"prompt": "A1 " * 2000}).encode(), 400, "prompt"),
    (json.dumps({"max_tokens": 3}).encode(), 400, "prompt"),
])
def test_bad_requests_get_400_naming_the_field(server, body, status, param):
    code, answer = post(server, "/v1/completions", body)
    assert code == status
    assert answer["error"]["param"] == param
    assert answer["error"]["message"]


def test_bad_chat_requests_name_the_field(server):
    code, answer = post(server, "/v1/chat/completions",
                        json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode())
    assert (code, answer["error"]["param"]) == (400, "messages[0]")
    code, answer = post(server, "/v1/chat/completions",
                        json.dumps({"messages": [{"role": "user", "content": "A1"}],
                                    "top_logprobs": 3}).encode())
    assert (code, answer["error"]["param"]) == (400, "top_logprobs")


def test_models_health_and_metrics(server, client):
    models = client.models.list().data
    assert [m.id for m in models] == [NAME]
    assert models[0].model_extra["eviction"]["policy"] == "gkv"
    assert models[0].model_extra["eviction"]["budget"] == 136
    assert models[0].model_extra["slots"] == 4
    health = json.loads(urllib.request.urlopen(server.url + "/health", timeout=10).read())
    assert health == {"status": "ok"}
    assert metric(server, "gkv_slots") == 4
    assert metric(server, "gkv_requests_total") > 0
    assert metric(server, "gkv_generated_tokens_total") > 0


def test_a_client_leaving_mid_stream_cancels_its_request_and_frees_the_slot(server, client,
                                                                              bundled):
    wait_until_idle(server)
    cancelled = metric(server, "gkv_samples_finished_total{reason=\"cancelled\"}")
    stream = client.completions.create(model=NAME, prompt=QUESTIONS[0], max_tokens=MAX_TOKENS,
                                       temperature=0, stream=True)
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 30
    while metric(server, "gkv_samples_finished_total{reason=\"cancelled\"}") == cancelled:
        assert time.monotonic() < deadline, "the request was not cancelled"
        time.sleep(0.1)
    assert metric(server, "gkv_slots_busy") == 0
    after = client.completions.create(model=NAME, prompt=QUESTIONS[0], max_tokens=MAX_TOKENS,
                                      temperature=0, extra_body={"return_token_ids": True})
    assert token_ids(after.choices[0]) == alone(bundled, QUESTIONS[0], seed=0).tokens[0]


def test_a_full_queue_answers_429_and_serves_the_rest(bundled):
    model, tokenizer = bundled
    app = build_app(model, tokenizer, EVICTION, slots=1, max_tokens=MAX_TOKENS, max_queue=0,
                    model_name=NAME)
    with BackgroundServer(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        stream = client.completions.create(model=NAME, prompt=QUESTIONS[0],
                                           max_tokens=MAX_TOKENS, temperature=0, stream=True)
        first = next(iter(stream))  # the one slot is taken
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model=NAME, prompt=QUESTIONS[1], max_tokens=4)
        rest = "".join(c.choices[0].text for c in stream)
        assert first.choices[0].text + rest == alone(bundled, QUESTIONS[0], seed=0).texts[0]
        served = threading.Event()

        def later():
            client.completions.create(model=NAME, prompt=QUESTIONS[1], max_tokens=4)
            served.set()
        thread = threading.Thread(target=later)
        thread.start()
        thread.join(60)
        assert served.is_set()  # the slot is free again
