"""Logits parity with Hugging Face transformers (PyTorch, CPU, float32) on tiny random models."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from gkv_jax import conversion, init_cache
from gkv_jax.models import forward_cached, lm_logits
from tests.helpers import SPECS, hf_logits, tiny_hf_model

TOL = 1e-4


@functools.cache
def converted(spec_name: str):
    spec = next(s for s in SPECS if s.name == spec_name)
    hf = tiny_hf_model(spec)
    return hf, conversion.from_hf(hf, dtype="float32")


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_full_forward_matches_transformers(spec):
    hf, model = converted(spec.name)
    ids = np.random.default_rng(1).integers(0, spec.vocab, size=(2, 40))
    ours = np.asarray(model(jnp.asarray(ids)))
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, hf_logits(hf, ids), atol=TOL, rtol=0)


@pytest.mark.parametrize("spec", SPECS[::2], ids=lambda s: s.name)
def test_left_padded_batch_matches_each_sequence_alone(spec):
    hf, model = converted(spec.name)
    rng = np.random.default_rng(2)
    lengths = [23, 9, 16]
    width = max(lengths)
    ids = np.zeros((len(lengths), width), np.int64)
    mask = np.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, width - n:] = rng.integers(0, spec.vocab, size=n)
        mask[b, width - n:] = 1
    ours = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    for b, n in enumerate(lengths):
        alone = hf_logits(hf, ids[b:b + 1, width - n:])[0]
        np.testing.assert_allclose(ours[b, width - n:], alone, atol=TOL, rtol=0)


def _greedy_with_cache(model, prompt: np.ndarray, steps: int):
    """Greedy decoding with the cached forward; returns tokens and per-step logits."""
    config, params = model.config, model.params()

    @jax.jit
    def step(params, tokens, positions, cache):
        hidden, cache = forward_cached(config, params, tokens, positions, cache)
        return lm_logits(config, params, hidden[:, -1:])[:, 0], cache

    cache = init_cache(config, 1, prompt.shape[1] + steps, window=4, dtype=model.dtype)
    logits, cache = step(params, jnp.asarray(prompt), jnp.arange(prompt.shape[1])[None], cache)
    tokens, all_logits = [], []
    for t in range(steps):
        all_logits.append(np.asarray(logits[0]))
        token = int(jnp.argmax(logits[0]))
        tokens.append(token)
        position = jnp.full((1, 1), prompt.shape[1] + t, jnp.int32)
        logits, cache = step(params, jnp.full((1, 1), token, jnp.int32), position, cache)
    return tokens, all_logits, cache


@pytest.mark.parametrize("spec", SPECS[::2], ids=lambda s: s.name)
def test_cached_greedy_matches_transformers_generate(spec):
    hf, model = converted(spec.name)
    prompt = np.random.default_rng(3).integers(0, spec.vocab, size=(1, 7))
    steps = 32
    tokens, step_logits, cache = _greedy_with_cache(model, prompt, steps)
    with torch.no_grad():
        ids = torch.as_tensor(prompt)
        reference = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                                do_sample=False, eos_token_id=None, pad_token_id=0)
    assert tokens == reference[0, prompt.shape[1]:].tolist()
    # The cached forward equals the full forward over the same prefix at every step.
    sequence = np.concatenate([prompt[0], tokens])
    full = np.asarray(model(jnp.asarray(sequence[None, :-1])))[0]
    for t, logits in enumerate(step_logits):
        np.testing.assert_allclose(logits, full[prompt.shape[1] - 1 + t], atol=TOL, rtol=0)
    # The cache holds exactly the tokens fed so far, at their true positions, in slot order.
    fed = prompt.shape[1] + steps
    np.testing.assert_array_equal(np.asarray(cache.positions)[:, 0, :, :fed],
                                  np.broadcast_to(np.arange(fed), (spec.layers, spec.kv_heads,
                                                                   fed)))
    assert int(cache.lengths[0]) == fed


def test_query_window_holds_the_last_queries_oldest_first():
    spec = SPECS[0]
    _, model = converted(spec.name)
    config, params = model.config, model.params()
    cache = init_cache(config, 1, 16, window=3, dtype=model.dtype)
    tokens = jnp.asarray([[5, 6, 7, 8, 9]])
    _, cache_all = forward_cached(config, params, tokens, jnp.arange(5)[None], cache)
    _, cache_a = forward_cached(config, params, tokens[:, :4], jnp.arange(4)[None], cache)
    _, cache_b = forward_cached(config, params, tokens[:, 4:], jnp.asarray([[4]]), cache_a)
    np.testing.assert_allclose(np.asarray(cache_b.query_window),
                               np.asarray(cache_all.query_window), atol=1e-5)
    # The newest query of layer 0 is the RoPE'd projection of token 9 at position 4.
    assert not np.allclose(np.asarray(cache_b.query_window[0, 0, :, -1]),
                           np.asarray(cache_a.query_window[0, 0, :, -1]))


def test_pad_tokens_in_a_cached_forward_are_never_attended():
    spec = SPECS[0]
    _, model = converted(spec.name)
    config, params = model.config, model.params()
    rng = np.random.default_rng(4)
    real = rng.integers(0, spec.vocab, size=6)
    padded = np.concatenate([rng.integers(0, spec.vocab, size=3), real])[None]
    positions = np.concatenate([[-1, -1, -1], np.arange(6)])[None]
    cache = init_cache(config, 1, 12, dtype=model.dtype)
    hidden, cache = forward_cached(config, params, jnp.asarray(padded), jnp.asarray(positions),
                                   cache)
    ours = np.asarray(lm_logits(config, params, hidden))[0, 3:]
    np.testing.assert_allclose(ours, np.asarray(model(jnp.asarray(real[None])))[0], atol=TOL)
    assert (np.asarray(cache.positions)[:, 0, :, :3] == -1).all()
