"""L2-norm eviction (Devoto et al., 2024): keys of low L2 norm draw high attention, so keep
the keys with the lowest norm. No query is needed; the last `window` rows are kept besides."""

from __future__ import annotations

import jax.numpy as jnp

from gkv_jax.policies.registry import Policy, register_policy


def l2norm_score(cfg, ops, queries, keys, valid, global_score):
    """F = -|k| of each candidate row, in float32 (invalid rows, which may hold anything,
    are zeroed here and masked by the selection)."""
    candidates = keys.shape[2] - cfg.window
    kept_keys = jnp.where(valid[:, None, :candidates, None],
                          keys[:, :, :candidates].astype(jnp.float32), 0.0)
    return -jnp.linalg.norm(kept_keys, axis=-1), None


L2NORM = register_policy(Policy(
    "l2norm", l2norm_score, knobs={"window": 16}, needs_queries=False, window_role="recent",
    about="L2-norm: the keys of lowest norm (no queries)"))
