"""The `tova` policy: the last query's attention, against a numpy restatement."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from gkv_jax.eviction import EvictionConfig, Ops, policy_scores
from tests import policy_checks


def spec_tova(queries, keys, valid, W):
    """F [B, K, S - W]: softmax of the last query over the valid rows, max over the group."""
    B, N, _, H = queries.shape
    K, S = keys.shape[1], keys.shape[2]
    G = N // K
    F = np.zeros((B, K, S - W))
    for b in range(B):
        rows = np.flatnonzero(valid[b])
        for k in range(K):
            best = np.zeros(S)
            for g in range(G):
                q = queries[b, k * G + g, -1].astype(np.float64)
                logits = keys[b, k, rows].astype(np.float64) @ q / math.sqrt(H)
                probs = np.zeros(S)
                probs[rows] = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
                best = np.maximum(best, probs)
            F[b, k] = best[: S - W]
    return F


@pytest.mark.parametrize("W", (1, 4))
def test_score_and_kept_rows_match_numpy(W):
    B, K, G, S, H, budget = 2, 2, 2, 24, 8, 12
    queries, keys, valid = policy_checks.random_inputs(1, B, K, G, W, S, H, pads=(0, 5))
    cfg = EvictionConfig("tova", budget=budget, window=W)
    scores, carried = policy_scores(cfg, Ops.resolve("xla"), jnp.asarray(queries),
                                    jnp.asarray(keys), jnp.asarray(valid))
    assert carried is None
    want = spec_tova(queries, keys, valid, W)
    got = np.where(valid[:, None, : S - W], np.asarray(scores), 0.0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    kept = policy_checks.check_select_parity(cfg, jnp.asarray(queries), jnp.asarray(keys),
                                             jnp.asarray(valid))
    np.testing.assert_array_equal(
        kept, policy_checks.kept_by_numpy(want, valid[:, : S - W], budget - W))


def test_defaults():
    cfg = EvictionConfig("tova", budget=8)
    assert cfg.window == 1 and cfg.query_window_size == 1 and not cfg.has_global_score
    with pytest.raises(ValueError, match="pool_kernel is not used"):
        EvictionConfig("tova", budget=8, pool_kernel=5)


@pytest.mark.slow  # compiles its own programs; the policy's selection is tested fast above
def test_ragged_batch_equals_each_prompt_alone():
    policy_checks.check_ragged_batch_equals_alone(
        EvictionConfig("tova", budget=14, divide_length=6))


@pytest.mark.slow
def test_generate_on_kernels_equals_xla():
    policy_checks.check_generate_parity(EvictionConfig("tova", budget=14, divide_length=6))
