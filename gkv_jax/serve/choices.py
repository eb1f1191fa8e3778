"""One generated choice as it grows, and the OpenAI objects built from choices.

A `Choice` gathers one engine request's tokens, decodes them, applies the request's stop
strings (the engine stops on token ids; strings are matched on the decoded text) and says
how much text is safe to stream: text that could still turn out to start a stop string, or
that ends in an unfinished multi-byte character, is held back until the next tokens.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

# The engine's finish reasons as OpenAI names them.
FINISH_REASON = {"eos": "stop", "length": "length", "cancelled": "cancelled"}


@dataclasses.dataclass
class Choice:
    index: int
    stop: tuple[str, ...]
    tokenizer: Any
    request_id: int | None = None
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of `text` already streamed
    finish_reason: str | None = None
    stopped: bool = False  # a stop string ended it (the engine is told to cancel it)

    def add(self, tokens: list[int], logprobs: list[float]) -> bool:
        """Appends new tokens; True if a stop string now ends this choice."""
        if self.stopped or not tokens:
            return False
        start = len(self.tokens)
        self.tokens.extend(tokens)
        self.logprobs.extend(logprobs)
        self.text = self._decode(self.tokens)
        if not self.stop:
            return False
        found = [i for s in self.stop if (i := self.text.find(s)) >= 0]
        if not found:
            return False
        cut = min(found)
        # Keep the tokens up to the one that completed the stop string.
        for end in range(start + 1, len(self.tokens) + 1):
            if any(s in self._decode(self.tokens[:end]) for s in self.stop):
                del self.tokens[end:], self.logprobs[end:]
                break
        self.text = self.text[:cut]
        self.stopped, self.finish_reason = True, "stop"
        return True

    def finish(self, engine_reason: str | None) -> None:
        if self.finish_reason is None:
            self.finish_reason = FINISH_REASON.get(engine_reason, "cancelled")

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def unsent_text(self) -> str:
        """The text that can be streamed now (all of it once the choice has finished)."""
        end = len(self.text)
        if not self.finished:
            hold = max((len(s) - 1 for s in self.stop), default=0)
            end = max(self.sent, end - hold)
            while end > self.sent and self.text[end - 1] == "\ufffd":
                end -= 1
        delta = self.text[self.sent:end]
        self.sent = end
        return delta

    def _decode(self, tokens: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(tokens, skip_special_tokens=True)


def logprobs_object(choice: Choice, chat: bool, tokens: list[int] | None = None,
                    logprobs: list[float] | None = None) -> dict[str, Any]:
    """OpenAI's logprobs of a choice (or of a streamed part): the sampled tokens only."""
    tokens = choice.tokens if tokens is None else tokens
    logprobs = choice.logprobs if logprobs is None else logprobs
    pieces = [choice._decode([t]) for t in tokens]
    if chat:
        return {"content": [{"token": p, "logprob": lp, "bytes": list(p.encode()),
                             "top_logprobs": [{"token": p, "logprob": lp,
                                               "bytes": list(p.encode())}]}
                            for p, lp in zip(pieces, logprobs, strict=True)]}
    return {"tokens": pieces, "token_logprobs": list(logprobs),
            "top_logprobs": [{p: lp} for p, lp in zip(pieces, logprobs, strict=True)],
            "text_offset": _offsets(pieces)}


def _offsets(pieces: list[str]) -> list[int]:
    offsets, at = [], 0
    for piece in pieces:
        offsets.append(at)
        at += len(piece)
    return offsets


def choice_object(choice: Choice, chat: bool, with_logprobs: bool,
                  with_token_ids: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"index": choice.index, "finish_reason": choice.finish_reason}
    if chat:
        out["message"] = {"role": "assistant", "content": choice.text}
    else:
        out["text"] = choice.text
    out["logprobs"] = logprobs_object(choice, chat) if with_logprobs else None
    if with_token_ids:
        out["token_ids"] = list(choice.tokens)
    return out


def response_object(request_id: str, model: str, chat: bool, choices: list[Choice],
                    prompt_tokens: int, with_logprobs: bool,
                    with_token_ids: bool) -> dict[str, Any]:
    completion_tokens = sum(len(c.tokens) for c in choices)
    return {"id": request_id, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model,
            "choices": [choice_object(c, chat, with_logprobs, with_token_ids)
                        for c in choices],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def chunk_object(request_id: str, model: str, chat: bool, choice: Choice, delta: str,
                 first: bool, logprobs: dict | None, token_ids: list[int] | None,
                 finish_reason: str | None) -> dict[str, Any]:
    part: dict[str, Any] = {"index": choice.index, "finish_reason": finish_reason,
                            "logprobs": logprobs}
    if chat:
        part["delta"] = ({"role": "assistant", "content": delta} if first
                         else {"content": delta})
    else:
        part["text"] = delta
    if token_ids is not None:
        part["token_ids"] = token_ids
    return {"id": request_id, "object": "chat.completion.chunk" if chat
            else "text_completion", "created": int(time.time()), "model": model,
            "choices": [part]}
