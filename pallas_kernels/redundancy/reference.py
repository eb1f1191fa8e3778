"""The redundancy score in pure jnp, float32: the specification (docs/algorithm.md section 4,
redundancy R). Materialises the S x S similarity, which the kernels of this folder avoid."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from gkv_jax.pallas_kernels._common import KEY_NORM_EPS, MASKED_LOGIT


def redundancy(
    keys: Float[Array, "B K S H"], valid: Bool[Array, "B S"], threshold: float
) -> Float[Array, "B K S"]:
    """The R-KV redundancy R over all S rows (window included); 0 at invalid rows.

    Invalid keys may hold anything (they are zeroed). Keys are normalised
    (k / (|k| + 1e-6)); Sim[m, n] is their cosine with a zero diagonal and zero invalid
    columns. For each valid column n the largest valid row m != n with Sim[m, n] > threshold
    gets Sim[m, n] = 0 (so the newest of near-duplicates is the least redundant).
    s[m] = sum_n Sim[m, n] / N_valid; R = softmax of s over the valid rows.
    """
    S = keys.shape[2]
    keys = jnp.where(valid[:, None, :, None], keys.astype(jnp.float32), 0.0)
    unit = keys / (jnp.linalg.norm(keys, axis=-1, keepdims=True) + KEY_NORM_EPS)
    sim = jnp.einsum("bkmh,bknh->bkmn", unit, unit, precision=jax.lax.Precision.HIGHEST)
    rows = jnp.arange(S)[:, None]
    counted = (rows != jnp.arange(S)[None, :]) & valid[:, None, None, :]  # off-diagonal, valid n
    sim = jnp.where(counted, sim, 0.0)
    similar = counted & valid[:, None, :, None] & (sim > threshold)
    newest = jnp.max(jnp.where(similar, rows, -1), axis=2, keepdims=True)  # [B, K, 1, S]
    sim = jnp.where(rows == newest, 0.0, sim)
    n_valid = jnp.maximum(jnp.sum(valid, axis=-1), 1).astype(jnp.float32)[:, None, None]
    row_valid = valid[:, None, :]
    s = jnp.sum(sim, axis=-1) / n_valid
    probs = jax.nn.softmax(jnp.where(row_valid, s, MASKED_LOGIT), axis=-1)
    return jnp.where(row_valid, probs, 0.0)
