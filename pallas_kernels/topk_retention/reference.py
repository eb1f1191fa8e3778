"""Top-k retention in pure jnp: the specification of `keep_top` (docs/algorithm.md sections 3
and 7) and of `compact` (the gather of the kept rows that `gkv_jax.decode.evict` performs),
plus the helpers the Pallas path shares."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

EMPTY_POSITION = -1

_INT32_MAX = np.int32(np.iinfo(np.int32).max)


def sortable_key(scores: Float[Array, "..."]) -> Int[Array, "..."]:
    """float32 -> int32 keys in the IEEE total order (-0.0 ranks below 0.0): float bits,
    negatives' magnitude bits flipped."""
    bits = jax.lax.bitcast_convert_type(scores.astype(jnp.float32), jnp.int32)
    return jnp.where(bits < 0, bits ^ _INT32_MAX, bits)


# Keys below every score's (-inf's key is NEG_INF_KEY): a valid candidate scored NaN ranks
# just below -inf, an invalid candidate below that. Both stay well above INT32_MIN, which the
# kernels give their padding.
NEG_INF_KEY = int(np.float32(-np.inf).view(np.int32) ^ _INT32_MAX)
NAN_KEY = NEG_INF_KEY - 1
INVALID_KEY = NEG_INF_KEY - 2


def ranking_key(scores: Float[Array, "B K P"], candidate_valid: Bool[Array, "B P"]
                ) -> Int[Array, "B K P"]:
    """The order `keep_top` ranks candidates in, as int32 keys (higher is kept first): every
    score of a valid candidate in the IEEE total order, -inf included, then valid candidates
    scored NaN (whatever its sign or payload), then invalid candidates. Every implementation
    ranks these keys, so a policy's NaN never wins a place over a real score."""
    key = jnp.where(jnp.isnan(scores), NAN_KEY, sortable_key(scores))
    return jnp.where(candidate_valid[:, None, :], key, INVALID_KEY)


def masked_carried(carried: Float[Array, "B K P"], candidate_valid: Bool[Array, "B P"]
                   ) -> Float[Array, "B K P"]:
    """`carried` as float32, NaN (no history) at invalid candidates."""
    return jnp.where(candidate_valid[:, None, :], carried.astype(jnp.float32), jnp.nan)


def keep_top(
    scores: Float[Array, "B K P"],
    carried: Float[Array, "B K P"] | None,
    candidate_valid: Bool[Array, "B P"],
    count: int,
) -> tuple[Int[Array, "B K count"], Float[Array, "B K count"] | None]:
    """The `count` best candidates in temporal order, and `carried` gathered at them.

    Candidates rank by `ranking_key`: valid scores, then valid NaN scores, then invalid
    candidates (kept only when too few valid ones exist; they carry NaN). Ties go to the
    lowest index (`jax.lax.top_k` is stable).
    """
    _, index = jax.lax.top_k(ranking_key(scores, candidate_valid), count)
    index = jnp.sort(index, axis=-1).astype(jnp.int32)
    if carried is None:
        return index, None
    return index, jnp.take_along_axis(masked_carried(carried, candidate_valid), index, axis=-1)


def row_map(kept_index: Int[Array, "B K count"], S: int, window: int,
            active: Bool[Array, " B"] | None) -> Int[Array, "B K S"]:
    """Source slot of every output slot: kept rows, then the last `window` rows, then -1
    (empty); the identity for inactive sequences."""
    B, K, count = kept_index.shape
    tail = jnp.broadcast_to(jnp.arange(S - window, S, dtype=jnp.int32), (B, K, window))
    empty = jnp.full((B, K, S - count - window), -1, jnp.int32)
    source = jnp.concatenate([kept_index.astype(jnp.int32), tail, empty], axis=-1)
    if active is not None:
        source = jnp.where(active[:, None, None], source, jnp.arange(S, dtype=jnp.int32))
    return source


def gather_rows(x: Array, source: Int[Array, "B K S"], fill) -> Array:
    """x [B, K, S, ...] at the source slots; `fill` where the source is -1."""
    index = jnp.maximum(source, 0).reshape(*source.shape, *([1] * (x.ndim - 3)))
    gathered = jnp.take_along_axis(x, index, axis=2)
    keep = (source >= 0).reshape(index.shape)
    return jnp.where(keep, gathered, jnp.asarray(fill, x.dtype))


def compact_scalars(positions, global_score, source, window: int, active, new_score,
                    replace_score):
    """The [B, K, S] per-slot arrays of `compact` (positions, global score)."""
    B, K, S = positions.shape
    count = new_score.shape[2] if new_score is not None else None
    new_positions = gather_rows(positions, source, EMPTY_POSITION)
    score = gather_rows(global_score, source, jnp.nan)
    live = jnp.ones((B,), bool) if active is None else active
    if new_score is not None:
        replace = live if replace_score is None else live & replace_score
        fresh = jnp.pad(new_score.astype(global_score.dtype),
                        ((0, 0), (0, 0), (0, S - count)), constant_values=jnp.nan)
        score = jnp.where(replace[:, None, None], fresh, score)
    score = jnp.where(live[:, None, None] & (new_positions < 0), jnp.nan, score)
    return new_positions, score


def compact(keys, values, positions, global_score, kept_index, *, window: int, active=None,
            new_score=None, replace_score=None):
    """See `topk_retention.compact`; XLA gathers (new buffers, no aliasing)."""
    S = keys.shape[2]
    source = row_map(kept_index, S, window, active)
    new_positions, score = compact_scalars(positions, global_score, source, window, active,
                                           new_score, replace_score)
    return (gather_rows(keys, source, 0), gather_rows(values, source, 0), new_positions,
            score)
