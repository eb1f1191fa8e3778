"""What post-training takes in, checked the way `generate` checks its prompts and before any
step runs or any file is written: token ids (integers, never truncated floats or untokenized
strings) inside the vocabulary, sequences within the model's context, and a budget under
which some sequence is evicted (otherwise training under the policy would change nothing).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from gkv_jax.eviction import EvictionConfig
from gkv_jax.models.config import ModelConfig
from gkv_jax.token_ids import check_vocabulary, token_ids

Pair = tuple[list[int], list[int]]


class DataError(ValueError):
    """A bad example of post-training data.

    Attributes:
      index: its position in the data (the command line turns it into a line number).
    """

    def __init__(self, message: str, index: int):
        super().__init__(message)
        self.index = index


def distill_pairs(data, eviction: EvictionConfig, budgets: Sequence[int],
                  model_config: ModelConfig, num_targets: int | None = None) -> list[Pair]:
    """`distill`'s data as (prompt_ids, completion_ids) lists of ints, checked.

    Args:
      data: a non-empty sequence of (prompt_ids, completion_ids) pairs.
      eviction, budgets: the policy trained under and every budget it takes.
      model_config: the student's (whose vocabulary and context the teacher shares).
      num_targets: on-policy generation length (None: each pair's completion is trained on).

    Raises:
      DataError: naming `data[i]`: a string or float ids, an empty side, ids outside the
        vocabulary, or a sequence beyond the context.
      ValueError: `data` is not a non-empty sequence, or a budget evicts nothing.
    """
    if isinstance(data, str | bytes) or not isinstance(data, Sequence) or len(data) == 0:
        raise ValueError("data must be a non-empty sequence of (prompt_ids, completion_ids) "
                         "pairs")
    pairs = []
    for i, item in enumerate(data):
        if isinstance(item, str | bytes) or not isinstance(item, Sequence) or len(item) != 2:
            raise DataError(f"data[{i}] must be a (prompt_ids, completion_ids) pair, got "
                            f"{type(item).__name__}", i)
        try:
            prompt, completion = (token_ids(f"data[{i}] {side}", ids) for side, ids in
                                  zip(("prompt_ids", "completion_ids"), item, strict=True))
            if not prompt or not completion:
                raise ValueError(f"data[{i}]: prompt_ids and completion_ids need at least one "
                                 f"token each")
            for side, ids in (("prompt_ids", prompt), ("completion_ids", completion)):
                check_vocabulary(f"data[{i}] {side}", ids, model_config.vocab_size)
            new_tokens = num_targets or len(completion)
            _check_context(f"data[{i}]", len(prompt), new_tokens, model_config,
                           "num_targets" if num_targets else "completion")
        except ValueError as err:
            raise DataError(str(err), i) from None
        pairs.append((prompt, completion))
    lengths = [(len(p), num_targets or len(c)) for p, c in pairs]
    check_budgets_evict(eviction, budgets, lengths, "the longest prompt + completion of data")
    return pairs


def grpo_prompt_ids(prompts, tokenizer, eviction: EvictionConfig, max_new_tokens: int,
                    model_config: ModelConfig) -> list[list[int]]:
    """`grpo`'s prompts as token-id lists (strings tokenized with `tokenizer`), checked as
    `generate` will check them, and `eviction.budget` against their rollout lengths.

    Raises:
      ValueError: naming `prompts[i]`: strings without a tokenizer, a mix of strings and
        ids, bad ids, a prompt plus `max_new_tokens` beyond the context; or a budget that
        evicts nothing.
    """
    if isinstance(prompts, str | bytes) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings or of token-id lists")
    if all(isinstance(p, str) for p in prompts):
        if tokenizer is None:
            raise ValueError("prompts are strings: pass tokenizer= (or token-id lists)")
        ids = [list(tokenizer(p)["input_ids"]) for p in prompts]
    elif any(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be all strings or all lists of token ids")
    else:
        ids = [token_ids(f"prompts[{i}]", p) for i, p in enumerate(prompts)]
    for i, p in enumerate(ids):
        if not p:
            raise ValueError(f"prompts[{i}] is empty: every prompt needs at least one token")
        check_vocabulary(f"prompts[{i}]", p, model_config.vocab_size)
        _check_context(f"max_new_tokens: prompts[{i}]", len(p), max_new_tokens,
                       model_config, "max_new_tokens")
    check_budgets_evict(eviction, (eviction.budget,), [(len(p), max_new_tokens) for p in ids],
                        "the longest prompt + max_new_tokens")
    return ids


def check_budgets_evict(eviction: EvictionConfig, budgets: Sequence[int],
                        lengths: Sequence[tuple[int, int]], longest: str) -> None:
    """Raises ValueError naming the budget if, under one of `budgets`, no sequence of
    (prompt length, new tokens) in `lengths` ever evicts a token (`peak_tokens`)."""
    named = "" if tuple(budgets) == (eviction.budget,) else "budgets: "
    for budget in budgets:
        config = dataclasses.replace(eviction, budget=budget)
        peak = max(config.peak_tokens(prompt, new) for prompt, new in lengths)
        if peak <= budget:
            raise ValueError(
                f"{named}budget {budget} never evicts: {longest} puts at most {peak} tokens "
                f"in the cache at a compression (one every {config.divide_length} tokens), "
                f"so training under it changes nothing; use a budget below {peak}")


def _check_context(name: str, prompt_length: int, new_tokens: int, config: ModelConfig,
                   what: str) -> None:
    total = prompt_length + new_tokens
    if total > config.max_position_embeddings:
        raise ValueError(f"{name}: prompt length {prompt_length} + {what} {new_tokens} = "
                         f"{total} exceeds the model's context "
                         f"(max_position_embeddings={config.max_position_embeddings})")
