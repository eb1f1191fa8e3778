"""Checks every new policy's tests share: select on XLA vs the kernels, and generate() on a
ragged batch vs each prompt alone and on XLA vs the kernels."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from gkv_jax import conversion
from gkv_jax.eviction import EvictionConfig, select
from gkv_jax.generation import generate
from tests.helpers import SPEC_BY_NAME, tiny_hf_model

SPEC = SPEC_BY_NAME["qwen2-h32-g2-untied"]


def random_inputs(seed, B, K, G, W, S, H, pads):
    """queries [B, K*G, W, H], keys [B, K, S, H] float32 (NaN in pad rows), valid [B, S]."""
    rng = np.random.default_rng(seed)
    queries = rng.normal(size=(B, K * G, W, H)).astype(np.float32)
    keys = rng.normal(size=(B, K, S, H)).astype(np.float32)
    valid = np.ones((B, S), bool)
    for b, pad in enumerate(pads):
        valid[b, :pad] = False
    keys = np.where(valid[:, None, :, None], keys, np.nan).astype(np.float32)
    return queries, keys, valid


def kept_by_numpy(scores, valid, count):
    """The `count` best valid candidates of scores [B, K, P] (ties: lowest index), sorted."""
    masked = np.where(valid[:, None, :], scores, -np.inf)
    order = np.argsort(-masked, axis=-1, kind="stable")[..., :count]
    return np.sort(order, axis=-1)


def check_select_parity(cfg: EvictionConfig, queries, keys, valid):
    """select on XLA and on the kernels (TPU interpret mode) keep the same rows."""
    kept = [select(dataclasses.replace(cfg, implementation=implementation), queries, keys,
                   valid)[0] for implementation in ("xla", "pallas")]
    np.testing.assert_array_equal(np.asarray(kept[0]), np.asarray(kept[1]))
    return np.asarray(kept[0])


@functools.cache
def tiny_model():
    return conversion.from_hf(tiny_hf_model(SPEC))


def _kept_sets(positions):
    return [sorted(row[row >= 0].tolist())
            for row in positions.reshape(-1, positions.shape[-1])]


def check_ragged_batch_equals_alone(eviction: EvictionConfig, max_new_tokens: int = 30):
    model = tiny_model()
    rng = np.random.default_rng(11)
    prompts = [rng.integers(0, SPEC.vocab, n).tolist() for n in (3, 25, 11)]
    batch = generate(model, prompts, eviction=eviction, max_new_tokens=max_new_tokens,
                     eos_token_id=[], return_kept_positions=True)
    assert batch.stats["compressions"] > 0
    for b, prompt in enumerate(prompts):
        alone = generate(model, [prompt], eviction=eviction, max_new_tokens=max_new_tokens,
                         eos_token_id=[], return_kept_positions=True)
        assert batch.tokens[b] == alone.tokens[0]
        assert _kept_sets(batch.kept_positions[:, b]) == _kept_sets(alone.kept_positions[:, 0])


def check_generate_parity(eviction: EvictionConfig, max_new_tokens: int = 20):
    """generate() on XLA and on the kernels: the same tokens and kept positions."""
    model = tiny_model()
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, SPEC.vocab, n).tolist() for n in (3, 25, 11)]
    outs = {}
    for implementation in ("xla", "pallas"):
        outs[implementation] = generate(
            model, prompts, eviction=dataclasses.replace(eviction, implementation=implementation),
            max_new_tokens=max_new_tokens, eos_token_id=[], return_kept_positions=True)
    assert outs["pallas"].stats["compressions"] > 0
    assert outs["pallas"].tokens == outs["xla"].tokens
    np.testing.assert_array_equal(outs["pallas"].kept_positions, outs["xla"].kept_positions)
