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


def as_generate_output(outputs: list[RequestOutput], *, prompt_bucket: int,
                       eos_ids, eviction=None, stats: dict[str, Any] | None = None):
    """Engine outputs as one `GenerateOutput` (rows in the given order), as `generate` of
    their prompts would return it: tokens, log-probs, texts, prompt ids, and the eviction
    records stacked to [L, B, K, P_max + M] (padded with NEVER), so that
    `gkv_jax.training.batch_from_generation` trains on engine rollouts."""
    from gkv_jax.eviction_record import NEVER
    from gkv_jax.generation_outputs import GenerateOutput

    record = None
    if outputs and all(o.eviction_record is not None for o in outputs):
        width = max(o.eviction_record.visible_until.shape[3] for o in outputs)
        rows = [np.pad(o.eviction_record.visible_until,
                       ((0, 0), (0, 0), (0, 0), (0, width - o.eviction_record.visible_until
                                                 .shape[3])), constant_values=NEVER)
                for o in outputs]
        record = EvictionRecord(
            visible_until=np.concatenate(rows, axis=1),
            prompt_lengths=np.asarray([len(o.prompt_ids) for o in outputs], np.int32),
            lengths=np.asarray([len(o.tokens) for o in outputs], np.int32),
            eviction=eviction if eviction is not None else outputs[0].eviction_record.eviction)
    texts = [o.text for o in outputs] if outputs and outputs[0].text is not None else None
    return GenerateOutput(
        tokens=[list(o.tokens) for o in outputs], texts=texts,
        logprobs=[list(o.logprobs) for o in outputs], kept_positions=None,
        stats={"prompt_bucket": prompt_bucket, "eos_token_ids": [int(e) for e in eos_ids],
               **(stats or {})},
        eviction_record=record, prompt_ids=[list(o.prompt_ids) for o in outputs])
