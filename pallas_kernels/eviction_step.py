"""The eviction step of `gkv_jax.eviction.select`, assembled from the three ops.

`gkv_jax.eviction.select` runs this module when its configuration's implementation resolves
to Pallas (see `_common.resolve_implementation`). Each policy's score is built from the same
pieces as in `gkv_jax.eviction` (score update, redundancy, max-pooling, mixing), with the
heavy parts (window attention + global score; key similarity; the top-k) on the ops of this
package; the O(B K S) glue (pooling, normalising R, mixing) stays in XLA.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from gkv_jax import eviction
from gkv_jax.pallas_kernels import _common
from gkv_jax.pallas_kernels.redundancy import redundancy
from gkv_jax.pallas_kernels.score_update import score_update
from gkv_jax.pallas_kernels.topk_retention import keep_top


def policy_scores(
    cfg: eviction.EvictionConfig,
    queries: Float[Array, "B N W H"] | None,
    keys: Float[Array, "B K S H"],
    valid: Bool[Array, "B S"],
    global_score: Float[Array, "B K kept"] | None,
    **op_kwargs: Any,
) -> tuple[Float[Array, "B K S-W"], Float[Array, "B K S-W"] | None]:
    """(F, carried G or None) over the S - W candidates, as `gkv_jax.eviction.SCORERS`.

    `op_kwargs` (implementation, interpret, matmul_dtype) go to the score-update and
    redundancy ops.
    """
    B, K, S, _ = keys.shape
    P = S - cfg.window
    if cfg.policy == "streaming":
        older_first = -jnp.arange(P, dtype=jnp.float32)
        return jnp.broadcast_to(older_first, (B, K, P)), None
    history = global_score if cfg.has_global_score else None
    if cfg.policy in ("snapkv", "rkv"):
        local = score_update(queries, keys, valid, normalise=False, **op_kwargs)
        pooled = eviction.max_pool(local, cfg.pool_kernel)
        if cfg.policy == "snapkv":
            return pooled, None
        redundant = redundancy(keys, valid, cfg.similarity_threshold, **op_kwargs)[..., :P]
        return cfg.mix_lambda * pooled - (1.0 - cfg.mix_lambda) * redundant, None
    carried = score_update(queries, keys, valid, history, normalise=True, smooth=cfg.smooth,
                           alpha=cfg.alpha, **op_kwargs)
    if cfg.policy == "h2o":
        return carried, carried
    redundant = redundancy(keys, valid, cfg.similarity_threshold, **op_kwargs)[..., :P]
    return (cfg.mix_lambda * carried - (1.0 - cfg.mix_lambda) * eviction.normalise(redundant),
            carried)


def select(
    cfg: eviction.EvictionConfig,
    queries: Float[Array, "B N W H"] | None,
    keys: Float[Array, "B K S H"],
    valid: Bool[Array, "B S"],
    global_score: Float[Array, "B K kept"] | None = None,
    *,
    implementation: str | None = "pallas",
    matmul_dtype: str = "float32",
    interpret: Any = None,
) -> tuple[Int[Array, "B K kept"], Float[Array, "B K kept"] | None]:
    """`gkv_jax.eviction.select` on the ops of this package (same contract and outputs).

    Args:
      cfg, queries, keys, valid, global_score: as `gkv_jax.eviction.select`.
      implementation: of every op ("pallas" by default; "xla" runs the references).
      matmul_dtype: "float32" (exact float32 specification) or "bfloat16" (bf16 operands of
        q.k and of the key cosines, float32 accumulation).
      interpret: the Pallas interpret mode (see `_common.resolve_implementation`).
    """
    eviction.validate_inputs(cfg, queries, keys, valid, global_score)
    _common.check_matmul_dtype(matmul_dtype)
    op_kwargs = dict(implementation=implementation, interpret=interpret,
                     matmul_dtype=matmul_dtype)
    scores, carried = policy_scores(cfg, queries, keys, valid, global_score, **op_kwargs)
    P = keys.shape[2] - cfg.window
    return keep_top(scores, carried, valid[:, :P], cfg.kept_scored,
                    implementation=implementation, interpret=interpret)
