"""The random evictions the bundled model is trained under (scripts/train_reasoner.py)."""

from __future__ import annotations

import importlib.util
import os
import re

import numpy as np
import pytest

from gkv_jax import synthetic

_SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "train_reasoner.py")


@pytest.fixture(scope="module")
def train_reasoner():
    spec = importlib.util.spec_from_file_location("train_reasoner", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def batch(train_reasoner):
    """Two 40-step problems: tokens [2, T] and the prompt length."""
    tokenizer = synthetic.build_tokenizer()
    encoded = [train_reasoner.encode(tokenizer, p) for p in synthetic.problems(3, 2)]
    assert len({len(ids) for ids, _ in encoded}) == 1
    return tokenizer, np.array([ids for ids, _ in encoded]), encoded[0][1]


def test_value_tokens_are_the_named_digits(train_reasoner, batch):
    tokenizer, tokens, prompt_length = batch
    facts = train_reasoner.value_tokens(tokenizer, tokens)
    line = "00 a4E0+d0=a0\n"
    ids = np.array([tokenizer(line)["input_ids"]])
    marked = "".join(c if f else "." for c, f in zip(line, train_reasoner.value_tokens(
        tokenizer, ids)[0], strict=True))
    assert marked == "...a4E0.d0.a0."
    # the prompt's table and registers are facts, its layout ("f", spaces, "n40") is not
    prompt = "".join(tokenizer.convert_ids_to_tokens(tokens[0, 1:prompt_length].tolist()))
    expected = re.sub(r"[a-dA-J][0-9]|.", lambda m: m.group() if len(m.group()) == 2 else ".",
                      prompt, flags=re.S)
    marked = "".join(c if f else "." for c, f in zip(prompt, facts[0, 1:prompt_length],
                                                     strict=True))
    assert marked == expected and marked.count(".") == 20


def test_eviction_masks_are_permanent_and_spare_the_prompt(train_reasoner, batch):
    tokenizer, tokens, prompt_length = batch
    facts = train_reasoner.value_tokens(tokenizer, tokens)
    lengths = np.full(len(tokens), prompt_length)
    rng = np.random.default_rng(0)
    masks = train_reasoner.eviction_masks(rng, facts, lengths, 3, 2, evict_fraction=1.0)
    T = tokens.shape[1]
    assert masks.shape == (3, 2, 2, T, T)
    causal = np.tril(np.ones((T, T), bool))
    visible = masks & causal
    # an evicted key never comes back: per key, the queries that see it are a prefix
    # of the queries after it
    for q in range(1, T):
        assert not (visible[..., q, :q] & ~visible[..., q - 1, :q]).any()
    # the prompt is encoded with full attention, and the last 4 tokens are always visible
    assert visible[..., :prompt_length, :prompt_length].sum() == \
        causal[:prompt_length, :prompt_length].sum() * 3 * 2 * 2
    for offset in range(4):
        assert np.diagonal(visible, -offset, axis1=-2, axis2=-1).all()
    # something is evicted, and facts are kept more often than layout tokens
    last = visible[..., -1, :]
    assert not last.all()
    assert last[:, :, :, facts[0]].mean() > last[:, :, :, ~facts[0]].mean() + 0.1


def test_eviction_masks_with_fraction_zero_see_everything(train_reasoner, batch):
    tokenizer, tokens, prompt_length = batch
    facts = train_reasoner.value_tokens(tokenizer, tokens)
    masks = train_reasoner.eviction_masks(np.random.default_rng(1), facts,
                                          np.full(len(tokens), prompt_length), 2, 2, 0.0)
    assert masks.all()
