"""The score update in pure jnp, float32: the specification (docs/algorithm.md section 4,
A, Â and G), built from `gkv_jax.eviction`'s own functions."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from gkv_jax import eviction


def score_update(
    queries: Float[Array, "B N W H"],
    keys: Float[Array, "B K S H"],
    valid: Bool[Array, "B S"],
    global_score: Float[Array, "B K C"] | None = None,
    *,
    normalise: bool = True,
    smooth: str = "max",
    alpha: float = 0.8,
) -> Float[Array, "B K S-W"]:
    """A (normalise=False), or G = update(Â, G_prev) (normalise=True); see `score_update`."""
    queries = queries.astype(jnp.float32)
    keys = jnp.where(valid[:, None, :, None], keys.astype(jnp.float32), 0.0)
    local = eviction.window_attention(queries, keys, valid)
    if not normalise:
        return local
    if global_score is not None:
        global_score = global_score.astype(jnp.float32)
    return eviction.update_global_score(smooth, alpha, eviction.normalise(local), global_score)
