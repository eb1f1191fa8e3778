"""The score update in pure jnp, float32: the specification (docs/algorithm.md section 4:
the local score A, its normalisation Â and the global score G).

Inputs are cast to float32 and matrix products run at `Precision.HIGHEST` (no TF32 on GPUs),
so on tie-free inputs this is the float32 specification exactly; the kernels of this folder
are tested against it. `blend_history` is also called by the kernels on their tiles.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from gkv_jax.pallas_kernels._common import MASKED_LOGIT

_HIGHEST = jax.lax.Precision.HIGHEST


def window_attention(
    queries: Float[Array, "B N W H"], keys: Float[Array, "B K S H"], valid: Bool[Array, "B S"]
) -> Float[Array, "B K S-W"]:
    """The local score A: attention of the W window queries on the S - W older rows.

    Window query i sits at cache row S - W + i (causal inside the window); invalid keys are
    masked. Softmax over S, maximum over the query heads of each KV head's group (of the
    probabilities), last W columns dropped, mean over the W queries. A query that sees no
    valid key contributes zeros. Inputs are float32 with zeroed invalid keys.
    """
    B, N, W, H = queries.shape
    K, S = keys.shape[1], keys.shape[2]
    grouped = queries.reshape(B, K, N // K, W, H)
    logits = jnp.einsum("bkgwh,bksh->bkgws", grouped, keys, precision=_HIGHEST) / math.sqrt(H)
    query_rows = S - W + jnp.arange(W)
    causal = jnp.arange(S)[None, :] <= query_rows[:, None]  # [W, S]
    visible = causal[None, None, None] & valid[:, None, None, None, :]
    probs = jax.nn.softmax(jnp.where(visible, logits, MASKED_LOGIT), axis=-1)
    probs = jnp.where(visible, probs, 0.0)
    return jnp.mean(jnp.max(probs, axis=2)[..., : S - W], axis=2)


def normalise(x: Float[Array, "B K P"]) -> Float[Array, "B K P"]:
    """x / max(x) over positions, per (sequence, KV head); all-zero rows stay zero.

    Used on non-negative scores whose invalid entries are already 0.
    """
    peak = jnp.max(x, axis=-1, keepdims=True)
    return jnp.where(peak > 0, x / jnp.where(peak > 0, peak, 1.0), 0.0)


def update_global_score(
    smooth: str,
    alpha: float,
    local: Float[Array, "B K P"],
    global_score: Float[Array, "B K C"] | None,
) -> Float[Array, "B K P"]:
    """The global score G from the normalised local score Â and the previous G.

    Row j < C (C = global_score.shape[-1]) has history G_prev[j] unless it is NaN; rows
    without history get G = Â. With history: "max": max(alpha G_prev, Â); "mean":
    alpha G_prev + (1 - alpha) Â; "sum": alpha G_prev + Â.
    """
    if global_score is None:
        return local
    pad = local.shape[-1] - global_score.shape[-1]
    previous = jnp.pad(global_score, ((0, 0), (0, 0), (0, pad)), constant_values=jnp.nan)
    return blend_history(smooth, alpha, previous, local)


def blend_history(smooth: str, alpha: float, previous: Array, local: Array) -> Array:
    """Elementwise G from G_prev (NaN = no history) and Â, same shapes; the Pallas kernels
    call it on their tiles. NaN is tested as `x != x`, which every Pallas backend lowers."""
    has_history = previous == previous
    previous = jnp.where(has_history, previous, 0.0)
    if smooth == "max":
        updated = jnp.maximum(alpha * previous, local)
    elif smooth == "mean":
        updated = alpha * previous + (1.0 - alpha) * local
    else:  # "sum"
        updated = alpha * previous + local
    return jnp.where(has_history, updated, local)


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
    local = window_attention(queries, keys, valid)
    if not normalise:
        return local
    if global_score is not None:
        global_score = global_score.astype(jnp.float32)
    return update_global_score(smooth, alpha, _normalise(local), global_score)


_normalise = normalise  # `score_update`'s keyword argument shadows the function
