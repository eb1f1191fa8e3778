"""The pure compression step: `select` (jitted) and `select_with_ops` (on given ops).

At a compression step (docs/algorithm.md, sections 3-5) each (sequence, KV head) of a
layer scores the S - W oldest rows of its cache, keeps the best `budget - W` of them in their
original order and always keeps the last W rows (the observation window). A policy
(`gkv_jax.policies`, one registered `Policy` each) only defines its score (as NVIDIA
kvpress's ScorerPress does), on top of the ops; masking of invalid rows, the top-k, the
ordering and the gather of the carried global score live once, here.

One call validates its inputs once (`validate_inputs`) and resolves the backend once
(`Ops.resolve`); the ops it hands to the policy then trust their inputs (`Ops.trusted`) instead
of validating them again.

Conventions chosen where the specification is silent:
  * A NaN entry of `global_score` means "this row has no history": it is treated exactly like
    a row >= C = budget - W (G = Â, which is also what `sum` gives with zero history).
  * `smooth="sum"` is G = alpha * G_prev + Â (the reference's H2O rule; rows without history
    get G = Â).
  * A NaN score ranks below every real score (-inf included) and above invalid rows
    (`gkv_jax.pallas_kernels.topk_retention.keep_top`).
  * Score ties are broken towards the lowest slot index (`jax.lax.top_k` keeps the
    lower-index element first among equal values).
  * When fewer valid candidates than `budget - W` exist, the extra kept entries point at the
    lowest-index invalid slots (those slots stay empty) and their carried global score is
    NaN (no history), like every empty slot of `KVCache.global_score`.
  * A finished sequence keeping its old global score is the caller's business (the decode
    loop), not `select`'s.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from gkv_jax.eviction.config import EvictionConfig
from gkv_jax.pallas_kernels.ops import Ops

__all__ = ["policy_scores", "select", "select_with_ops", "validate_inputs"]


def validate_inputs(
    cfg: EvictionConfig,
    queries: Array | None,
    keys: Array,
    valid: Array,
    global_score: Array | None,
) -> None:
    """Raises ValueError unless the arrays fit `select`'s contract for `cfg` (shapes only).

    Covers what the ops would check of the same arrays, so the ops inside `select` skip it."""
    if not cfg.evicts:
        raise ValueError(f"policy {cfg.policy!r} never evicts; select() serves evicting "
                         f"policies only")
    if keys.ndim != 4 or not jnp.issubdtype(keys.dtype, jnp.floating):
        raise ValueError(f"keys must be a floating [B, K, S, H] array, got {keys.dtype}"
                         f"{list(keys.shape)}")
    B, K, S, H = keys.shape
    if valid.shape != (B, S) or valid.dtype != jnp.bool_:
        raise ValueError(f"valid must be a bool [B, S] = [{B}, {S}] array, got {valid.dtype}"
                         f"{list(valid.shape)}")
    if S < cfg.budget:
        raise ValueError(f"keys hold S={S} rows but budget={cfg.budget} needs S >= budget "
                         f"(kept_index has budget - W entries in [0, S - W))")
    if not cfg.policy_object.needs_queries:
        return
    if (queries is None or queries.ndim != 4 or queries.shape[0] != B
            or queries.shape[3] != H or queries.shape[1] % K
            or not jnp.issubdtype(queries.dtype, jnp.floating)):
        got = None if queries is None else f"{queries.dtype}{list(queries.shape)}"
        raise ValueError(f"queries must be a floating [B={B}, N, W, H={H}] array with N a "
                         f"multiple of K={K}, got {got}")
    if queries.shape[2] != cfg.window:
        raise ValueError(f"queries must hold W = window = {cfg.window} queries, got "
                         f"{queries.shape[2]}")
    if cfg.has_global_score and global_score is not None and (
            global_score.shape != (B, K, cfg.kept_scored)
            or not jnp.issubdtype(global_score.dtype, jnp.floating)):
        raise ValueError(f"global_score must be a floating [B, K, budget - W] = "
                         f"[{B}, {K}, {cfg.kept_scored}] array or None, got "
                         f"{global_score.dtype}{list(global_score.shape)}")


def _check_policy_output(cfg: EvictionConfig, scores, carried, candidates_shape) -> None:
    """A policy's score must cover the candidates ([B, K, S - W] float), and so must its
    carried score, which a policy returns exactly when it `carries_global_score`: checked
    here, since the selection op no longer validates what it is handed. (NaN scores are
    allowed: they rank below every real score.)"""
    def fits(x):
        return (hasattr(x, "shape") and hasattr(x, "dtype") and x.shape == candidates_shape
                and jnp.issubdtype(x.dtype, jnp.floating))

    def shown(x):
        return None if x is None else (f"{x.dtype}{list(x.shape)}" if hasattr(x, "dtype")
                                       else type(x).__name__)

    carries = cfg.has_global_score
    if not fits(scores) or (carried is not None and not fits(carried)):
        raise ValueError(f"policy {cfg.policy!r} must score the candidates as floating "
                         f"{list(candidates_shape)} arrays (scores, carried or None), got "
                         f"{shown(scores)}, {shown(carried)}")
    if carries and carried is None:
        raise ValueError(f"policy {cfg.policy!r} carries a global score "
                         f"(carries_global_score=True) but its score returned None for it; "
                         f"return (scores, carried) with carried a floating "
                         f"{list(candidates_shape)} array")
    if not carries and carried is not None:
        raise ValueError(f"policy {cfg.policy!r} returned a carried score, but it was "
                         f"registered with carries_global_score=False, so the score would be "
                         f"dropped; return (scores, None), or register the policy with "
                         f"carries_global_score=True")


@functools.partial(jax.jit, static_argnames="cfg")
def select(
    cfg: EvictionConfig,
    queries: Float[Array, "B N W H"] | None,
    keys: Float[Array, "B K S H"],
    valid: Bool[Array, "B S"],
    global_score: Float[Array, "B K kept"] | None = None,
) -> tuple[Int[Array, "B K kept"], Float[Array, "B K kept"] | None]:
    """One compression step: which of the S - W older rows each KV head keeps.

    Args:
      cfg: an evicting policy (static; "full" raises ValueError).
      queries: [B, N, W, H] the last W queries, post-RoPE, oldest first (the current token's
        last). Not read by streaming (may be None there).
      keys: [B, K, S, H] all cached keys, post-RoPE, the window rows last. S >= budget.
        Invalid rows may hold anything (NaN included).
      valid: [B, S] bool, False for left pads and empty slots.
      global_score: [B, K, budget - W] float, the carried score of rows 0..budget-W-1 (the
        rows kept at the previous compression, in order), NaN for a row without history;
        None at the first compression. Ignored by policies without history.

    Returns:
      kept_index: [B, K, budget - W] int32 sorted positions in [0, S - W); the last W rows are
        kept besides. Invalid rows are kept only when fewer valid candidates exist.
      new_global_score: [B, K, budget - W] float32 G at kept_index (NaN at invalid rows), or
        None for policies without history (streaming, snapkv, rkv).

    >>> import jax.numpy as jnp
    >>> cfg = EvictionConfig(policy="streaming", budget=4, sink=2)
    >>> keys = jnp.ones((1, 1, 7, 8))
    >>> valid = jnp.array([[False, False, True, True, True, True, True]])
    >>> kept_index, _ = select(cfg, None, keys, valid)
    >>> kept_index.tolist()
    [[[2, 3]]]
    """
    ops = Ops.resolve(cfg.implementation, matmul_dtype=cfg.matmul_dtype)
    return select_with_ops(cfg, ops, queries, keys, valid, global_score)


def policy_scores(
    cfg: EvictionConfig,
    ops: Ops,
    queries: Float[Array, "B N W H"] | None,
    keys: Float[Array, "B K S H"],
    valid: Bool[Array, "B S"],
    global_score: Float[Array, "B K kept"] | None = None,
) -> tuple[Float[Array, "B K S-W"], Float[Array, "B K S-W"] | None]:
    """The policy's (F, carried G or None) over the S - W candidates, on `ops`; the inputs
    the policy does not read (queries, history) are not passed to it."""
    policy = cfg.policy_object
    queries = queries if policy.needs_queries else None
    history = global_score if policy.carries_global_score else None
    return policy.score(cfg, ops, queries, keys, valid, history)


def select_with_ops(
    cfg: EvictionConfig,
    ops: Ops,
    queries: Float[Array, "B N W H"] | None,
    keys: Float[Array, "B K S H"],
    valid: Bool[Array, "B S"],
    global_score: Float[Array, "B K kept"] | None = None,
) -> tuple[Int[Array, "B K kept"], Float[Array, "B K kept"] | None]:
    """`select` on the given ops (`Ops.resolve(...)`: the references, or the kernels with an
    interpret mode or matmul dtype of one's choice); same contract, not jitted."""
    validate_inputs(cfg, queries, keys, valid, global_score)
    ops = ops.trusted()  # validated once, above
    output = policy_scores(cfg, ops, queries, keys, valid, global_score)
    if not isinstance(output, tuple) or len(output) != 2:
        raise ValueError(f"policy {cfg.policy!r} must return a pair (scores, carried or "
                         f"None), got {type(output).__name__}")
    scores, carried = output
    B, K, S, _ = keys.shape
    candidates = S - cfg.window
    _check_policy_output(cfg, scores, carried, (B, K, candidates))
    return ops.keep_top(scores, carried, valid[:, :candidates], cfg.kept_scored)
