"""Top-k retention in pure jnp: the specification of `keep_top` (docs/algorithm.md sections 3
and 7) and of `compact` (the gather of the kept rows that `gkv_jax.decode.evict` performs),
plus the helpers the Pallas path shares."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

EMPTY_POSITION = -1


def keep_top(
    scores: Float[Array, "B K P"],
    carried: Float[Array, "B K P"] | None,
    candidate_valid: Bool[Array, "B P"],
    count: int,
) -> tuple[Int[Array, "B K count"], Float[Array, "B K count"] | None]:
    """The `count` best candidates in temporal order, and `carried` gathered at them.

    Invalid candidates score -inf (so they are kept only when too few valid ones exist) and
    carry NaN. Ties go to the lowest index (`jax.lax.top_k` is stable).
    """
    valid = candidate_valid[:, None, :]
    _, index = jax.lax.top_k(jnp.where(valid, scores.astype(jnp.float32), -jnp.inf), count)
    index = jnp.sort(index, axis=-1).astype(jnp.int32)
    if carried is None:
        return index, None
    carried = jnp.where(valid, carried.astype(jnp.float32), jnp.nan)
    return index, jnp.take_along_axis(carried, index, axis=-1)


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
