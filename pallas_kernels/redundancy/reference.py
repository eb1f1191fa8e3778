"""The redundancy score in pure jnp, float32: the specification (docs/algorithm.md section 4,
redundancy R), `gkv_jax.eviction.redundancy` on keys whose invalid rows are zeroed."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from gkv_jax import eviction


def redundancy(
    keys: Float[Array, "B K S H"], valid: Bool[Array, "B S"], threshold: float
) -> Float[Array, "B K S"]:
    """R over all S rows, 0 at invalid rows; materialises the S x S similarity."""
    keys = jnp.where(valid[:, None, :, None], keys.astype(jnp.float32), 0.0)
    return eviction.redundancy(keys, valid, threshold)
