"""An evaluation's problems and prompts: the examples (a dataset name, a .jsonl path or a list of
`Example`s; loading lives in `gkv_jax.datasets`), each formatted as prompt token ids, and the
generation length."""

from __future__ import annotations

import os
from collections.abc import Sequence

from gkv_jax.datasets import Example, load_dataset
from gkv_jax.evaluation.configs import check_positive
from gkv_jax.generation_inputs import _encode

R1_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
# max_new_tokens=None: this per dataset kind, capped at the model's context.
DEFAULT_MAX_NEW_TOKENS = {"synthetic": 520, "math": 16384}
# More of the prompts' tokens than this share being the tokenizer's unknown token means it
# cannot encode the dataset (e.g. math problems for a model with a 28-symbol vocabulary).
UNKNOWN_SHARE_LIMIT = 0.05


def format_prompts(examples: Sequence[Example], tokenizer, chat_template: bool | None = None,
                   system_prompt: str | None = None) -> list[list[int]]:
    """`format_prompt` of every example, checked to be encodable (`check_encodable`)."""
    prompts = [format_prompt(e, tokenizer, chat_template, system_prompt) for e in examples]
    check_encodable(tokenizer, examples, prompts)
    return prompts


def check_encodable(tokenizer, examples: Sequence[Example],
                    prompts: Sequence[Sequence[int]]) -> None:
    """Raises ValueError naming the dataset when more than `UNKNOWN_SHARE_LIMIT` of the
    prompts' tokens are the tokenizer's unknown token: the model would see placeholders
    instead of the problems."""
    unknown_id = getattr(tokenizer, "unk_token_id", None)
    if unknown_id is None:
        return
    total = sum(len(p) for p in prompts)
    unknown = sum(list(p).count(unknown_id) for p in prompts)
    if total and unknown > UNKNOWN_SHARE_LIMIT * total:
        first = next(e.id for e, p in zip(examples, prompts, strict=True) if unknown_id in p)
        raise ValueError(
            f"dataset: the tokenizer cannot encode these problems: {unknown} of their {total} "
            f"prompt tokens ({unknown / total:.0%}) are its unknown token "
            f"{getattr(tokenizer, 'unk_token', None)!r} (first in problem {first!r}); use a "
            f"model whose tokenizer covers the dataset's text")


def format_prompt(example: Example, tokenizer, chat_template: bool | None = None,
                  system_prompt: str | None = None) -> list[int]:
    """The prompt token ids of an example (see `evaluate` for the None defaults)."""
    use_template = example.kind == "math" if chat_template is None else chat_template
    if system_prompt is None:
        system_prompt = R1_SYSTEM_PROMPT if example.kind == "math" else ""
    if use_template:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("chat_template: the tokenizer has no chat template; pass "
                             "chat_template=False")
        return _encode(tokenizer, example.question, True, system_prompt or None)
    text = f"{system_prompt}\n\n{example.question}" if system_prompt else example.question
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    return bos + list(tokenizer(text, add_special_tokens=False)["input_ids"])


def resolve_max_new_tokens(max_new_tokens: int | None, examples: Sequence[Example],
                           prompts: Sequence[Sequence[int]], model) -> int:
    """The given value, checked against the context, or the kind's default capped to fit."""
    context = model.config.max_position_embeddings
    longest = max(len(p) for p in prompts)
    if max_new_tokens is None:
        default = max(DEFAULT_MAX_NEW_TOKENS[e.kind] for e in examples)
        return max(1, min(default, context - longest))
    check_positive("max_new_tokens", max_new_tokens)
    if longest + max_new_tokens > context:
        raise ValueError(f"max_new_tokens: the longest prompt ({longest} tokens) + "
                         f"{max_new_tokens} exceeds the model's context ({context})")
    return max_new_tokens


def load_examples(dataset, num_problems) -> tuple[list[Example], str]:
    """The examples of `dataset` (a name, a .jsonl path or a list of `Example`s; see
    `evaluate`) and its label for the settings and the plot ("custom" for a list)."""
    if isinstance(dataset, str | os.PathLike):
        return load_dataset(os.fspath(dataset), num_problems), os.fspath(dataset)
    examples = list(dataset)
    if not examples or not all(isinstance(e, Example) for e in examples):
        raise ValueError("dataset must be a dataset name, a .jsonl path or a non-empty list "
                         "of gkv_jax.datasets.Example")
    if num_problems is not None:
        check_positive("num_problems", num_problems)
        examples = examples[:num_problems]
    if len({e.id for e in examples}) != len(examples):
        raise ValueError("dataset: example ids must be unique")
    return examples, "custom"
