"""The built-in policies (docs/algorithm.md section 5), each a score on top of the ops.

The heavy parts (window attention + global score, key similarity, the top-k) run on the ops
(`Ops`: references or kernels); the O(B K S) glue (max-pooling, normalising R, mixing) stays
in XLA.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from gkv_jax.pallas_kernels.score_update.reference import normalise
from gkv_jax.policies.registry import Policy, check_int, register_policy

DEFAULT_SINK = 4


def max_pool(x: Float[Array, "B K P"], kernel: int) -> Float[Array, "B K P"]:
    """Max-pooling over positions, stride 1, odd kernel, same length (borders see fewer)."""
    half = kernel // 2
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 1, kernel), (1, 1, 1),
                                 ((0, 0), (0, 0), (half, half)))


def candidate_redundancy(cfg, ops, keys, valid) -> Float[Array, "B K S-W"]:
    """R of the S - W candidate rows (R itself is computed over all S rows)."""
    return ops.redundancy(keys, valid, cfg.similarity_threshold)[..., : keys.shape[2] - cfg.window]


def streaming_score(cfg, ops, queries, keys, valid, global_score):
    """StreamingLLM: nothing is scored. Older rows rank higher, so the top `sink` rows are the
    first `sink` valid positions (positions are exact in float32 up to 2**24)."""
    B, K, S, _ = keys.shape
    older_first = -jnp.arange(S - cfg.window, dtype=jnp.float32)
    return jnp.broadcast_to(older_first, (B, K, S - cfg.window)), None


def resolve_streaming(fields):
    """sink + recent = budget; the recent tail is the window. Only `budget` is required."""
    budget = check_int("budget", fields["budget"], 2)
    # Check what the caller passed against the budget before deriving the rest, so the
    # message names the caller's parameter (not a derived recent = budget - sink < 1).
    given = {}
    for name in ("sink", "recent", "window"):
        if fields[name] is not None:
            value = check_int(name, fields[name], 1)
            if value >= budget:
                other = "recent" if name == "sink" else "sink"
                raise ValueError(f"{name} must be < budget (={budget}) so that {other} = "
                                 f"budget - {name} >= 1, got {name}={value}")
            given[name] = value
    window = given.get("window")
    sink, recent = given.get("sink"), given.get("recent")
    if recent is None:
        recent = window
    if sink is None and recent is None:
        sink = DEFAULT_SINK
    if recent is None:
        recent = budget - sink
    if sink is None:
        sink = budget - recent
    if window is not None and window != recent:
        raise ValueError(f"window must equal recent for streaming, got window={window} and "
                         f"recent={recent}")
    check_int("sink", sink, 1)
    check_int("recent", recent, 1)
    if sink + recent != budget:
        raise ValueError(f"sink + recent must equal budget (={budget}), got sink={sink} and "
                         f"recent={recent}")
    return {"sink": sink, "recent": recent, "window": recent}


def snapkv_score(cfg, ops, queries, keys, valid, global_score):
    """SnapKV: F = max-pool(A)."""
    local = ops.score_update(queries, keys, valid, normalise=False)
    return max_pool(local, cfg.pool_kernel), None


def rkv_score(cfg, ops, queries, keys, valid, global_score):
    """R-KV: F = lambda * max-pool(A) - (1 - lambda) * R (nothing normalised)."""
    pooled = max_pool(ops.score_update(queries, keys, valid, normalise=False), cfg.pool_kernel)
    redundant = candidate_redundancy(cfg, ops, keys, valid)
    return cfg.mix_lambda * pooled - (1.0 - cfg.mix_lambda) * redundant, None


def global_score_update(cfg, ops, queries, keys, valid, global_score):
    """G = update(Â, G_prev) with the policy's smoothing."""
    return ops.score_update(queries, keys, valid, global_score, normalise=True,
                            smooth=cfg.smooth, alpha=cfg.alpha)


def h2o_score(cfg, ops, queries, keys, valid, global_score):
    """H2O: F = G = alpha * G_prev + Â (smooth "sum"), no redundancy, no pooling."""
    carried = global_score_update(cfg, ops, queries, keys, valid, global_score)
    return carried, carried


def gkv_score(cfg, ops, queries, keys, valid, global_score):
    """G-KV: F = lambda * G - (1 - lambda) * R̂, with G = max(alpha * G_prev, Â) by default."""
    carried = global_score_update(cfg, ops, queries, keys, valid, global_score)
    redundant = normalise(candidate_redundancy(cfg, ops, keys, valid))
    return cfg.mix_lambda * carried - (1.0 - cfg.mix_lambda) * redundant, carried


FULL = register_policy(Policy(
    "full", score=None, needs_queries=False, window_role="none",
    about="keeps every token (never evicts)"))
STREAMING = register_policy(Policy(
    "streaming", streaming_score, knobs={"window": None, "sink": None, "recent": None},
    needs_queries=False, window_role="recent", resolve=resolve_streaming,
    about="StreamingLLM: the first `sink` tokens and the last `recent`"))
SNAPKV = register_policy(Policy(
    "snapkv", snapkv_score, knobs={"window": 16, "pool_kernel": 5},
    about="SnapKV: max-pooled attention of the observation window"))
RKV = register_policy(Policy(
    "rkv", rkv_score,
    knobs={"window": 16, "pool_kernel": 5, "mix_lambda": 0.1, "similarity_threshold": 0.5},
    about="R-KV: pooled attention minus key redundancy"))
H2O = register_policy(Policy(
    "h2o", h2o_score, knobs={"window": 1, "alpha": 0.8, "smooth": "sum"},
    carries_global_score=True, window_role="current_query",
    about="H2O: accumulated attention of the current query"))
GKV = register_policy(Policy(
    "gkv", gkv_score,
    knobs={"window": 16, "alpha": 0.8, "mix_lambda": 0.5, "similarity_threshold": 0.5,
           "smooth": "max"},
    carries_global_score=True,
    about="G-KV: global (decayed max) attention score minus normalised redundancy"))
