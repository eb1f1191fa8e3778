"""The OpenAI request bodies the server accepts, checked field by field.

Every check raises `BadRequest` naming the field (OpenAI's `param`) and the allowed range,
which the app answers with a 400 and an OpenAI-style error body; nothing is queued. The
checks mirror the engine's own (sampling values, token ids, lengths), so a request that
passes them is one the engine takes.
"""

from __future__ import annotations

import dataclasses
import secrets
from typing import Any

MAX_SAMPLES = 16  # `n`: samples of one prompt (they share one prefill)
MAX_PROMPTS = 64  # prompts of one completions request (a list)
MAX_STOP = 8  # stop strings and stop token ids, each
MAX_STOP_LENGTH = 256  # characters of one stop string


class BadRequest(ValueError):
    """A request the server refuses (HTTP 400), naming the field."""

    def __init__(self, param: str | None, message: str, status: int = 400,
                 code: str = "invalid_request_error"):
        super().__init__(message)
        self.param, self.message, self.status, self.code = param, message, status, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.code, "param": self.param,
                          "code": None}}


@dataclasses.dataclass(frozen=True)
class Sampling:
    """What every prompt of one request is sampled with."""

    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    n: int
    stop: tuple[str, ...]
    stop_token_ids: tuple[int, ...]
    logprobs: bool
    stream: bool
    return_token_ids: bool


@dataclasses.dataclass(frozen=True)
class ParsedRequest:
    """A checked request: its prompts (token ids, rendered already) and its sampling."""

    model: str
    prompts: list[list[int]]
    sampling: Sampling
    chat: bool


def parse_completion(body: Any, tokenizer, model_name: str, max_tokens: int,
                     max_prompt_length: int, vocab_size: int) -> ParsedRequest:
    """`/v1/completions`: `prompt` is a string, token ids, or a list of either."""
    body = _object(body)
    _check_model(body, model_name)
    if "prompt" not in body:
        raise BadRequest("prompt", "prompt is required")
    prompt = body["prompt"]
    if isinstance(prompt, str) or _is_id_list(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and len(prompt) <= MAX_PROMPTS and all(
            isinstance(p, str) or _is_id_list(p) for p in prompt):
        prompts = prompt
    else:
        raise BadRequest("prompt", f"prompt must be a string, a list of token ids, or a list "
                                   f"of 1 to {MAX_PROMPTS} of those")
    ids = [_encode(p, tokenizer, vocab_size) for p in prompts]
    if body.get("echo"):
        raise BadRequest("echo", "echo is not supported (the server returns only the "
                                 "generated text)")
    logprobs = body.get("logprobs")
    if logprobs is not None and (not _is_int(logprobs) or not 0 <= logprobs <= 1):
        raise BadRequest("logprobs", "logprobs must be null, 0 or 1: the server reports the "
                                     f"log-probability of each sampled token, got {logprobs!r}")
    sampling = _sampling(body, max_tokens, logprobs=logprobs is not None)
    _check_lengths(ids, max_prompt_length, sampling)
    return ParsedRequest(str(body.get("model") or model_name), ids, sampling, chat=False)


def parse_chat(body: Any, tokenizer, model_name: str, max_tokens: int,
               max_prompt_length: int, vocab_size: int) -> ParsedRequest:
    """`/v1/chat/completions`: `messages` rendered with the tokenizer's chat template."""
    body = _object(body)
    _check_model(body, model_name)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages", "messages must be a non-empty list of {role, content}")
    for i, message in enumerate(messages):
        if (not isinstance(message, dict) or message.get("role") not in
                ("system", "user", "assistant") or not isinstance(message.get("content"), str)):
            raise BadRequest(f"messages[{i}]", "each message needs a role (system, user or "
                                               "assistant) and a string content")
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        raise BadRequest("messages", "the served model's tokenizer has no chat template; "
                                     "use /v1/completions")
    rendered = tokenizer.apply_chat_template(
        [{"role": m["role"], "content": m["content"]} for m in messages],
        add_generation_prompt=True, tokenize=True)
    if isinstance(rendered, dict) or hasattr(rendered, "keys"):
        rendered = rendered["input_ids"]
    ids = [list(rendered)]
    top = body.get("top_logprobs")
    if top is not None and (not _is_int(top) or not 0 <= top <= 1):
        raise BadRequest("top_logprobs", "top_logprobs must be null, 0 or 1: the server "
                                         f"reports the sampled token's log-probability, got "
                                         f"{top!r}")
    logprobs = body.get("logprobs", False)
    if not isinstance(logprobs, bool):
        raise BadRequest("logprobs", f"logprobs must be true or false, got {logprobs!r}")
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    sampling = _sampling({**body, "max_tokens": limit}, max_tokens, logprobs=logprobs)
    _check_lengths(ids, max_prompt_length, sampling)
    return ParsedRequest(str(body.get("model") or model_name), ids, sampling, chat=True)


# ---------------------------------------------------------------------------- the fields
def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise BadRequest(None, "the request body must be a JSON object")
    return body


def _check_model(body: dict, model_name: str) -> None:
    model = body.get("model")
    if model is not None and model != model_name:
        raise BadRequest("model", f"model {model!r} is not served here; this server serves "
                                  f"{model_name!r} (see /v1/models)")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_id_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(_is_int(t) for t in value)


def _encode(prompt, tokenizer, vocab_size: int) -> list[int]:
    if isinstance(prompt, str):
        if not prompt:
            raise BadRequest("prompt", "prompt is empty")
        if tokenizer is None:
            raise BadRequest("prompt", "the served model has no tokenizer; send token ids")
        return list(tokenizer(prompt)["input_ids"])
    bad = next((t for t in prompt if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise BadRequest("prompt", f"token id {bad} is outside [0, {vocab_size})")
    return list(prompt)


def _number(body: dict, field: str, default: float, low: float, high: float,
            low_open: bool = False) -> float:
    value = body.get(field)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
            (low < value if low_open else low <= value) and value <= high):
        bracket = "(" if low_open else "["
        raise BadRequest(field, f"{field} must be a number in {bracket}{low}, {high}], got "
                                f"{value!r}")
    return float(value)


def _sampling(body: dict, max_tokens: int, logprobs: bool) -> Sampling:
    limit = body.get("max_tokens")
    if limit is None:
        limit = max_tokens
    elif not _is_int(limit) or not 1 <= limit <= max_tokens:
        raise BadRequest("max_tokens", f"max_tokens must be an integer in [1, {max_tokens}] "
                                       f"(the server's --max-tokens), got {limit!r}")
    n = body.get("n", 1)
    if n is None:
        n = 1
    if not _is_int(n) or not 1 <= n <= MAX_SAMPLES:
        raise BadRequest("n", f"n must be an integer in [1, {MAX_SAMPLES}], got {n!r}")
    seed = body.get("seed")
    if seed is None:
        seed = secrets.randbits(32)
    elif not _is_int(seed) or not 0 <= seed < 2**32:
        raise BadRequest("seed", f"seed must be an integer in [0, 2**32), got {seed!r}")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream", f"stream must be true or false, got {stream!r}")
    return Sampling(
        max_tokens=int(limit),
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        seed=int(seed), n=int(n), stop=_stop(body.get("stop")),
        stop_token_ids=_stop_token_ids(body.get("stop_token_ids")),
        logprobs=logprobs, stream=stream,
        return_token_ids=bool(body.get("return_token_ids", False)))


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if (not isinstance(stops, list) or len(stops) > MAX_STOP or not all(
            isinstance(s, str) and 0 < len(s) <= MAX_STOP_LENGTH for s in stops)):
        raise BadRequest("stop", f"stop must be a string or a list of at most {MAX_STOP} "
                                 f"non-empty strings of at most {MAX_STOP_LENGTH} characters")
    return tuple(stops)


def _stop_token_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_STOP or not all(
            _is_int(t) and t >= 0 for t in value):
        raise BadRequest("stop_token_ids", f"stop_token_ids must be a list of at most "
                                           f"{MAX_STOP} token ids")
    return tuple(value)


def _check_lengths(prompts: list[list[int]], max_prompt_length: int,
                   sampling: Sampling) -> None:
    for ids in prompts:
        if not ids:
            raise BadRequest("prompt", "prompt is empty")
        if len(ids) > max_prompt_length:
            raise BadRequest("prompt", f"the prompt has {len(ids)} tokens; this server takes "
                                       f"at most {max_prompt_length}")
