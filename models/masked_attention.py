"""Attention under per-key expiry: the teacher-forced view of a generation with eviction.

A generation with a compressed cache is described, per layer, sequence, KV head and key, by
one integer: `visible_until`, the first query position that no longer sees the key (keys
are never re-admitted once evicted). Query q attends to key j iff

    pos_k >= 0  and  pos_k <= pos_q  and  pos_q < visible_until[k]

(positions are true token positions, -1 on pads). This module knows nothing of eviction
policies; it only evaluates that mask, two ways:

* `dense_visible_attention`: the [B, K, T, T] mask of one layer (the reference; quadratic).
* `segment_attention`: linear in T for masks produced by a compression schedule. The rows
  after the prompt are cut into segments of `segment_length`; keys only expire at segment
  starts, so the rows of one segment see at most `max_visible` older keys (those still alive
  at the segment start, gathered) plus their own segment, causally. Logits are
  [B, K, G, D, max_visible + D] per segment and each segment is rematerialised in the
  backward pass (`jax.checkpoint`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from gkv_jax.models import layers


@dataclasses.dataclass(frozen=True)
class SegmentLayout:
    """Static geometry of a compression schedule in the teacher-forced layout.

    Attributes:
      prompt_width: Wp, slots of the left-padded prompts; its rows attend causally.
      segment_length: rows per segment after the prompt (the schedule's divide_length); keys
        may only expire at `prompt_width + e * segment_length` slots.
      max_visible: the most older keys alive at a segment start (the budget).
    """

    prompt_width: int
    segment_length: int
    max_visible: int

    def __post_init__(self):
        for name in ("prompt_width", "segment_length", "max_visible"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SegmentLayout.{name} must be an integer >= 1, got {value!r}")


def visible_mask(query_positions: Int[Array, "B T"], key_positions: Int[Array, "B S"],
                 visible_until: Int[Array, "B K S"]) -> Bool[Array, "B K T S"]:
    """Causal mask by true positions, further cut by each key's expiry."""
    key_positions = jnp.broadcast_to(key_positions[:, None, :], visible_until.shape)
    causal = layers.attention_mask(query_positions, key_positions)
    return causal & (query_positions[:, None, :, None] < visible_until[:, :, None, :])


def dense_visible_attention(
    queries: Float[Array, "B T N H"], keys: Float[Array, "B K T H"],
    values: Float[Array, "B K T H"], positions: Int[Array, "B T"],
    visible_until: Int[Array, "B K T"],
) -> Float[Array, "B T N H"]:
    """One layer's attention under `visible_until`, with the whole [B, K, T, T] mask."""
    mask = visible_mask(positions, positions, visible_until)
    return layers.grouped_attention(queries, keys, values, mask)


def _first_alive(slots: Int[Array, "B K P"], alive: Bool[Array, "B K P"],
                 count: int) -> Int[Array, "B K count"]:
    """The first `count` slots (in the given order) where `alive`; -1 fills the rest."""
    rank = jnp.cumsum(alive, axis=-1) - 1
    rank = jnp.where(alive & (rank < count), rank, count)  # out of range: dropped
    B, K, _ = slots.shape
    b = jnp.arange(B)[:, None, None]
    k = jnp.arange(K)[None, :, None]
    return jnp.full((B, K, count), -1, jnp.int32).at[b, k, rank].set(slots, mode="drop")


def _gather_slots(x: Array, slots: Int[Array, "B K A"]) -> Array:
    """x [B, K, T, ...] at slots [B, K, A] (-1 reads slot 0; callers mask it)."""
    index = jnp.maximum(slots, 0)
    index = index.reshape(*index.shape, *([1] * (x.ndim - 3)))
    return jnp.take_along_axis(x, index, axis=2)


def segment_attention(
    queries: Float[Array, "B T N H"], keys: Float[Array, "B K T H"],
    values: Float[Array, "B K T H"], positions: Int[Array, "B T"],
    visible_until: Int[Array, "B K T"], layout: SegmentLayout,
) -> Float[Array, "B T N H"]:
    """One layer's attention under `visible_until`, segment by segment (linear in T).

    Exact (equal to `dense_visible_attention` up to float rounding) when every key alive at
    a segment start, i.e. with `visible_until` above that row's position, numbers at most
    `layout.max_visible` per (sequence, KV head): true of masks recorded or replayed from a
    compression schedule with `budget = max_visible` and `divide_length = segment_length`.
    Rows past a sequence's end (position -1) output zeros.
    """
    B, T, N, H = queries.shape
    K = keys.shape[1]
    Wp, D, A = layout.prompt_width, layout.segment_length, layout.max_visible
    if T < Wp:
        raise ValueError(f"segment_attention: T={T} tokens is shorter than the prompt width "
                         f"{Wp}")
    prompt_out = dense_visible_attention(queries[:, :Wp], keys[:, :, :Wp], values[:, :, :Wp],
                                         positions[:, :Wp], visible_until[:, :, :Wp])
    rows = T - Wp
    if rows == 0:
        return prompt_out
    count = -(-rows // D)
    pad = count * D - rows
    # Pad to whole segments: pad rows have position -1 (see nothing, seen by nothing).
    q_gen = jnp.pad(queries[:, Wp:], ((0, 0), (0, pad), (0, 0), (0, 0)))
    pos_gen = jnp.pad(positions[:, Wp:], ((0, 0), (0, pad)), constant_values=-1)
    key_positions = jnp.broadcast_to(positions[:, None, :], (B, K, T))
    all_keys = jnp.pad(keys, ((0, 0), (0, 0), (0, pad), (0, 0)))
    all_values = jnp.pad(values, ((0, 0), (0, 0), (0, pad), (0, 0)))
    all_positions = jnp.pad(key_positions, ((0, 0), (0, 0), (0, pad)), constant_values=-1)
    all_until = jnp.pad(visible_until, ((0, 0), (0, 0), (0, pad)))
    k_gen, v_gen, until_gen = (x[:, :, Wp:] for x in (all_keys, all_values, all_until))

    def alive_at(slots, start_positions):
        """Of `slots` [B, K, P], those whose key is real and alive at the segment start."""
        index = jnp.maximum(slots, 0)
        alive = ((slots >= 0) & (jnp.take_along_axis(all_positions, index, axis=2) >= 0)
                 & (jnp.take_along_axis(all_until, index, axis=2)
                    > start_positions[:, None, None]))
        return _first_alive(slots, alive, A)

    prompt_slots = jnp.broadcast_to(jnp.arange(Wp, dtype=jnp.int32), (B, K, Wp))
    alive0 = alive_at(prompt_slots, pos_gen[:, 0])

    def segment(alive, xs):
        q, k, v, pos, until, start = xs  # q [B, D, N, H]; k, v [B, K, D, H]; start [] slot
        old_positions = jnp.where(alive >= 0, _gather_slots(all_positions, alive), -1)
        cat_keys = jnp.concatenate([_gather_slots(all_keys, alive), k], axis=2)
        cat_values = jnp.concatenate([_gather_slots(all_values, alive), v], axis=2)
        cat_positions = jnp.concatenate(
            [old_positions, jnp.broadcast_to(pos[:, None, :], (B, K, D))], axis=2)
        cat_until = jnp.concatenate([_gather_slots(all_until, alive), until], axis=2)
        causal = layers.attention_mask(pos, cat_positions)
        mask = causal & (pos[:, None, :, None] < cat_until[:, :, None, :])
        out = layers.grouped_attention(q, cat_keys, cat_values, mask)
        # Keys alive at the next segment start: survivors and this segment's keys.
        own_slots = start + jnp.arange(D, dtype=jnp.int32)
        candidates = jnp.concatenate([alive, jnp.broadcast_to(own_slots, (B, K, D))], axis=2)
        next_start = jnp.minimum(start + D - Wp, count * D - 1)
        next_alive = alive_at(candidates, jax.lax.dynamic_index_in_dim(
            pos_gen, next_start, axis=1, keepdims=False))
        # A sequence that has ended keeps no keys (its rows see nothing anyway).
        return next_alive, out

    xs = (q_gen.reshape(B, count, D, N, H).swapaxes(0, 1),
          k_gen.reshape(B, K, count, D, H).transpose(2, 0, 1, 3, 4),
          v_gen.reshape(B, K, count, D, H).transpose(2, 0, 1, 3, 4),
          pos_gen.reshape(B, count, D).swapaxes(0, 1),
          until_gen.reshape(B, K, count, D).transpose(2, 0, 1, 3),
          Wp + D * jnp.arange(count, dtype=jnp.int32))
    _, outs = jax.lax.scan(jax.checkpoint(segment), alive0, xs)
    gen_out = outs.swapaxes(0, 1).reshape(B, count * D, N, H)[:, :rows]
    return jnp.concatenate([prompt_out, gen_out], axis=1)
