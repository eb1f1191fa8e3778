"""Token ids as the library takes them, checked the same way wherever they come in:
`generate`'s prompts, and the prompts and completions of post-training.

>>> token_ids("prompts[0]", [1, 5, 6])
[1, 5, 6]
>>> token_ids("prompts[0]", [1.0, 2.0])  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
ValueError: prompts[0] must hold integer token ids (ints or numpy integers), got 1.0 (float)
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np


def is_int(value) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def token_ids(name: str, row) -> list[int]:
    """`row` as a list of Python ints: a list or tuple of ints (numpy integers included) or a
    1-D integer numpy array.

    Raises:
      ValueError: naming `name`: a string (not tokenized yet), something that is not a
        sequence, or an entry that is not an integer (a float is never truncated).
    """
    if isinstance(row, str | bytes):
        raise ValueError(f"{name} is a string; token ids are expected (tokenize it first, "
                         f'e.g. tokenizer(text)["input_ids"])')
    if isinstance(row, np.ndarray):
        if row.ndim != 1 or not np.issubdtype(row.dtype, np.integer):
            raise ValueError(f"{name} must hold integer token ids (a 1-D integer array), "
                             f"got a {row.ndim}-D {row.dtype} array")
        return row.tolist()
    if not isinstance(row, Sequence):
        raise ValueError(f"{name} must be a list of token ids, got {type(row).__name__}")
    for t in row:
        if not is_int(t):
            raise ValueError(f"{name} must hold integer token ids (ints or numpy integers), "
                             f"got {t!r} ({type(t).__name__})")
    return [int(t) for t in row]


def check_vocabulary(name: str, ids: Sequence[int], vocab_size: int) -> None:
    """Raises ValueError naming `name`, the first id outside [0, vocab_size) and its index."""
    for index, t in enumerate(ids):
        if not 0 <= t < vocab_size:
            raise ValueError(f"{name} has token ids outside [0, {vocab_size}): {t} at index "
                             f"{index}")
