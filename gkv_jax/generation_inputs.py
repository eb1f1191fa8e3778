"""The host-side inputs of `generate`: its arguments checked and its prompts prepared.

Prompts tokenized (`_tokenize`, `_encode`: strings through the tokenizer, optionally its chat
template; token-id lists checked), padded to a prompt-length bucket (`bucket_length`,
`_left_pad`), the per-row seeds (`row_seeds`) and the EOS ids (`_eos_ids`). Shared with
`gkv_jax.Engine`, evaluation and training, which feed prompts the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gkv_jax.token_ids import is_int as _is_int
from gkv_jax.token_ids import token_ids

MIN_BUCKET = 16
SEED_LIMIT = 2**32  # seeds are uint32 PRNG seeds


def bucket_length(length: int, buckets: Sequence[int] | None) -> int:
    """The padded prompt length: the smallest bucket >= length (powers of two by default)."""
    if buckets is None:
        return max(MIN_BUCKET, 1 << (length - 1).bit_length())
    fitting = [b for b in sorted(buckets) if b >= length]
    if not fitting:
        raise ValueError(
            f"prompt_buckets: the longest prompt has {length} tokens, above the largest "
            f"bucket {max(buckets)}")
    return fitting[0]


def row_seeds(seed, rows: int) -> np.ndarray:
    """[rows] int32 per-row seeds: `seed` + b (mod 2**32) for row b of an int `seed`, or
    the given per-prompt seeds. Seeds in [2**31, 2**32) become the negative int32 values with
    the same 32 bits, which `jax.random.PRNGKey` reads as the same uint32 seed.

    Raises:
      ValueError: naming `seed`: not an integer in [0, 2**32), or a list of the wrong length.
    """
    if isinstance(seed, list | tuple | np.ndarray):
        if len(seed) != rows:
            raise ValueError(f"seed: a list of seeds needs one per prompt ({rows}), got "
                             f"{len(seed)}")
        for i, value in enumerate(seed):
            if not _is_int(value) or not 0 <= value < SEED_LIMIT:
                raise ValueError(f"seed[{i}] must be an integer in [0, 2**32), got {value!r}")
        values = [int(v) for v in seed]
    else:
        if not _is_int(seed) or not 0 <= seed < SEED_LIMIT:
            raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r} (or a "
                             f"list of such seeds, one per prompt)")
        values = [(int(seed) + b) % SEED_LIMIT for b in range(rows)]
    return np.asarray(values, np.uint32).view(np.int32)


def _tokenize(prompts, tokenizer, chat_template: bool, system_prompt: str | None,
              add_special_tokens: bool | None = None):
    if not isinstance(prompts, list | tuple) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of strings or of token-id lists")
    if all(isinstance(p, str) for p in prompts):
        if tokenizer is None:
            raise ValueError("prompts are strings: pass tokenizer= to tokenize them "
                             "(or pass lists of token ids)")
        ids = [_encode(tokenizer, p, chat_template, system_prompt, add_special_tokens)
               for p in prompts]
    elif all(isinstance(p, list | tuple | np.ndarray) for p in prompts):
        if chat_template:
            raise ValueError("chat_template=True needs string prompts")
        if add_special_tokens is not None:
            raise ValueError("add_special_tokens applies to string prompts; token-id "
                             "prompts are fed as given (leave it None)")
        ids = [token_ids(f"prompts[{i}]", p) for i, p in enumerate(prompts)]
    else:
        raise ValueError("prompts must be all strings or all lists of token ids")
    for i, p in enumerate(ids):
        if len(p) == 0:
            raise ValueError(f"prompts[{i}] is empty: every prompt needs at least one token")
    return ids


def _encode(tokenizer, prompt: str, chat_template: bool, system_prompt: str | None,
            add_special_tokens: bool | None = None):
    """Token ids of one string prompt.

    add_special_tokens: None follows the tokenizer's own convention: `tokenizer(text)` adds
    what its post-processor adds (e.g. BOS); with a chat template the template writes the
    special tokens and nothing is added. True / False force the post-processor's tokens on
    or off (with a chat template: on top of the rendered template).
    """
    if not chat_template:
        if system_prompt is not None:
            prompt = system_prompt + prompt
        if add_special_tokens is None:
            return list(tokenizer(prompt)["input_ids"])
        return list(tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else [])
    messages.append({"role": "user", "content": prompt})
    if add_special_tokens:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                             tokenize=False)
        return list(tokenizer(text, add_special_tokens=True)["input_ids"])
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def _eos_ids(eos_token_id, tokenizer, config) -> np.ndarray:
    if eos_token_id is None:
        if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
            eos_token_id = tokenizer.eos_token_id
        else:
            eos_token_id = list(config.eos_token_ids)
    if isinstance(eos_token_id, str) or _is_int(eos_token_id):
        eos_token_id = [eos_token_id]
    if isinstance(eos_token_id, np.ndarray):
        eos_token_id = eos_token_id.tolist()
    if not isinstance(eos_token_id, list | tuple):
        raise ValueError(f"eos_token_id must be a token id, a token string, a list of them or "
                         f"None, got {eos_token_id!r}")
    ids = [_eos_id(e, tokenizer) for e in eos_token_id]
    for i in ids:
        if not 0 <= i < config.vocab_size:
            raise ValueError(f"eos_token_id {i} is outside the vocabulary [0, "
                             f"{config.vocab_size})")
    return np.asarray(ids, np.int32)


def _eos_id(token, tokenizer) -> int:
    """One EOS entry as an id: an integer, or a token string looked up in the vocabulary."""
    if _is_int(token):
        return int(token)
    if not isinstance(token, str):
        raise ValueError(f"eos_token_id entries must be integers or token strings, got "
                         f"{token!r} ({type(token).__name__})")
    vocab = tokenizer.get_vocab() if tokenizer is not None else {}
    if token not in vocab:
        where = "the tokenizer's vocabulary" if tokenizer is not None else "(no tokenizer=)"
        raise ValueError(f"eos_token_id {token!r} is not a token of {where}; pass its id "
                         "or a token string of the vocabulary")
    return int(vocab[token])


def _left_pad(ids: list[list[int]], width: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.zeros((len(ids), width), np.int32)
    positions = np.full((len(ids), width), -1, np.int32)
    for b, p in enumerate(ids):
        tokens[b, width - len(p):] = p
        positions[b, width - len(p):] = np.arange(len(p))
    return tokens, positions
