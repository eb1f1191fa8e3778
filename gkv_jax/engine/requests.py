"""What the engine's host loop holds per request: the request as submitted (checked), its
output as it grows, and the events a stream yields."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from gkv_jax.eviction_record import EvictionRecord

FINISH_REASONS = ("eos", "length", "cancelled")


@dataclasses.dataclass
class RequestOutput:
    """One request's result.

    Attributes:
      request_id: what `Engine.submit` returned.
      prompt_ids: the prompt's token ids as fed.
      tokens: the generated ids, up to and including the first EOS.
      logprobs: the log-probability of each generated token under the distribution it was
        drawn from.
      text: the decoded tokens (None without a tokenizer).
      finish_reason: "eos", "length" (its max_new_tokens) or "cancelled".
      eviction_record: an `EvictionRecord` of one sequence (`Engine(record=True)`), equal
        to `generate([prompt], ..., return_eviction_record=True)`'s; None otherwise.
      seed: the seed its tokens were drawn with.
    """

    request_id: int
    prompt_ids: list[int]
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    text: str | None = None
    finish_reason: str | None = None
    eviction_record: EvictionRecord | None = None
    seed: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """What `Engine.stream()` yields: new tokens of one request, and its output once it
    has finished (then `finished` is True)."""

    request_id: int
    tokens: list[int]
    finished: bool
    output: RequestOutput | None = None


@dataclasses.dataclass
class Request:
    """A submitted request in the host loop (token ids and values already checked)."""

    request_id: int
    prompt_ids: list[int]
    bucket: int
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int  # uint32 value
    eos_ids: np.ndarray  # [E] int32, -1 padded
    output: RequestOutput
    cancelled: bool = False
    slot: int | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def append(self, tokens, log_probs) -> None:
        self.output.tokens.extend(int(t) for t in tokens)
        self.output.logprobs.extend(float(x) for x in log_probs)


@dataclasses.dataclass
class PromptGroup:
    """Requests that share one prompt, hence one prefill (the samples of one problem)."""

    prompt_ids: list[int]
    bucket: int
    members: list[Request]
