"""The `l2norm` policy: the keys of lowest L2 norm, against a numpy restatement."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from gkv_jax.eviction import EvictionConfig, Ops, policy_scores, select
from tests import policy_checks


def spec_l2norm(keys, valid, W):
    """F [B, K, S - W] = -|k| of the candidate rows (0 at invalid rows)."""
    S = keys.shape[2]
    norms = np.linalg.norm(np.nan_to_num(keys[:, :, : S - W].astype(np.float64)), axis=-1)
    return np.where(valid[:, None, : S - W], -norms, 0.0)


@pytest.mark.parametrize("W", (1, 16))
def test_score_and_kept_rows_match_numpy(W):
    B, K, S, H, budget = 2, 2, 40, 8, 24
    _, keys, valid = policy_checks.random_inputs(2, B, K, 1, 1, S, H, pads=(0, 7))
    cfg = EvictionConfig("l2norm", budget=budget, window=W)
    scores, carried = policy_scores(cfg, Ops.resolve("xla"), None, jnp.asarray(keys),
                                    jnp.asarray(valid))
    assert carried is None
    want = spec_l2norm(keys, valid, W)
    got = np.where(valid[:, None, : S - W], np.asarray(scores), 0.0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    kept = policy_checks.check_select_parity(cfg, None, jnp.asarray(keys), jnp.asarray(valid))
    np.testing.assert_array_equal(
        kept, policy_checks.kept_by_numpy(want, valid[:, : S - W], budget - W))


def test_smallest_norms_are_kept_without_queries():
    cfg = EvictionConfig("l2norm", budget=4, window=2)
    assert cfg.query_window_size == 0 and not cfg.has_global_score
    keys = jnp.asarray([[[[3.0], [1.0], [2.0], [0.5], [9.0], [9.0]]]])
    valid = jnp.ones((1, 6), bool).at[0, 1].set(False)  # the 1.0 row is a pad
    kept, _ = select(cfg, None, keys, valid)
    assert np.asarray(kept).tolist() == [[[2, 3]]]


@pytest.mark.slow  # compiles its own programs; the policy's selection is tested fast above
def test_ragged_batch_equals_each_prompt_alone():
    policy_checks.check_ragged_batch_equals_alone(
        EvictionConfig("l2norm", budget=14, window=4, divide_length=6))


@pytest.mark.slow
def test_generate_on_kernels_equals_xla():
    policy_checks.check_generate_parity(
        EvictionConfig("l2norm", budget=14, window=4, divide_length=6))
