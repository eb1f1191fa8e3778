"""The cache compressions of the decode loop: one layer's (`compress_layer`, selection then
compaction) and every layer's (`evict`), with the slot helpers they need (real-token counts,
`resize_slots`).

`gkv_jax.decode` re-exports `compress_layer` and `evict`; the post-training replay
(`gkv_jax.training.replay`) compresses through the same `compress_layer`. Every active
sequence's buffer must be full at a compression (see `gkv_jax.decode`, slot layout invariant).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from gkv_jax.cache import EMPTY_POSITION, KVCache
from gkv_jax.eviction import EvictionConfig, Ops, select_with_ops
from gkv_jax.sharding.local import constrain_cache, per_head_blocks, per_sequence


def real_token_counts(cache: KVCache) -> Int[Array, " B"]:
    """[B] number of real (non-empty) slots; every layer and KV head holds the same count."""
    return layer_real_token_counts(cache.positions[0])


def layer_real_token_counts(positions: Int[Array, "B K S"]) -> Int[Array, " B"]:
    """[B] real slots of one layer's positions (the same for every KV head)."""
    return jnp.sum(positions[:, 0, :] >= 0, axis=-1).astype(jnp.int32)


def compress_layer(eviction: EvictionConfig, query_window: Float[Array, "B N W H"],
                   keys: Float[Array, "B K S H"], values: Float[Array, "B K S H"],
                   positions: Int[Array, "B K S"], global_score: Float[Array, "B K S"],
                   active: Bool[Array, " B"], evicting: Bool[Array, " B"]):
    """One layer's compression: selection (`eviction.select_with_ops`) then compaction
    (`Ops.compact`), both on the ops `eviction.implementation` resolves to (once). Under a
    mesh (`jax.set_mesh`) it runs inside `jax.shard_map` on each device's block of sequences
    and KV heads (`gkv_jax.sharding.per_head_blocks`): it needs no communication.

    The one door through which the decode loop (`evict`) and the post-training replay
    (`gkv_jax.training.replay_evictions`) change a cache. Buffers keep their shapes; the S
    slots must be full for every active sequence (the last W slots are the window).

    Args:
      query_window: [B, N, W, H] the last W queries (W = 0 for streaming).
      keys, values: [B, K, S, H]; positions: [B, K, S] (-1 = empty); global_score:
        [B, K, S] (NaN = no history).
      active: [B] sequences to compact (others are returned unchanged).
      evicting: [B] active sequences holding more than `budget` real tokens, whose carried
        global score is replaced by the new one.

    Returns:
      keys, values, positions, global_score, compacted (kept rows first, then the window).
    """
    ops = Ops.resolve(eviction.implementation, matmul_dtype=eviction.matmul_dtype)

    def compress(query_window, keys, values, positions, global_score, active, evicting):
        valid = positions[:, 0, :] >= 0  # identical across KV heads until the first eviction
        kept_index, new_score = select_with_ops(eviction, ops, query_window, keys, valid,
                                                global_score[:, :, :eviction.kept_scored])
        if new_score is None:  # policies without history: evicting sequences carry none
            new_score = jnp.full(kept_index.shape, jnp.nan, jnp.float32)
        return ops.compact(keys, values, positions, global_score, kept_index,
                           window=eviction.window, active=active, new_score=new_score,
                           replace_score=evicting)

    # Under a mesh each device compresses its own (sequences, KV heads) block: no collective.
    local = per_head_blocks(compress, query_window.shape[1], keys.shape[1], keys.shape[0])
    return local(query_window, keys, values, positions, global_score, active, evicting)


def resize_slots(buffer: Array, capacity: int, fill, axis: int = 3) -> Array:
    """Drops or adds empty trailing slots along the slot axis (3 of [L, B, K, S, ...]; 2 for
    one layer's [B, K, S, ...]) so that it holds `capacity`."""
    S = buffer.shape[axis]
    if capacity <= S:
        return jax.lax.slice_in_dim(buffer, 0, capacity, axis=axis)
    pad = [(0, 0)] * buffer.ndim
    pad[axis] = (0, capacity - S)
    return jnp.pad(buffer, pad, constant_values=fill)


def evict(eviction: EvictionConfig, cache: KVCache, active: Bool[Array, " B"],
          capacity: int | None = None) -> tuple[KVCache, Bool[Array, " B"]]:
    """One compression of every layer (docs/algorithm.md sections 3-5, per policy).

    Every active sequence must have a full buffer (`lengths == cache.capacity`). Sequences
    holding more than `budget` real tokens evict down to `budget`; other active sequences
    are compacted without losing a token (pads and holes dropped), which attends exactly as
    before; inactive (finished) sequences are left untouched. Layers are compressed one at a
    time in a `fori_loop` that updates the cache buffers in place (jit with the cache
    donated when calling this directly), so scoring memory is one layer's.

    Args:
      eviction: the policy (static).
      cache: [L, B, K, S, ...] buffers.
      active: [B] sequences to compress.
      capacity: slots of the returned cache (default: the same as the input; the prefill
        compresses a prompt-sized cache into a `budget + divide_length` one).

    Returns:
      The compressed cache and [B] bool, which sequences actually evicted tokens.
    """
    capacity = cache.capacity if capacity is None else capacity
    # Counted per device block (every KV head holds the same count): no collective.
    counts = per_sequence(layer_real_token_counts, cache.query_window.shape[2],
                          cache.keys.shape[2], cache.keys.shape[1])(cache.positions[0])
    evicting = active & (counts > eviction.budget)

    def layer_step(layer, buffers):
        layer_buffers = [b[layer] for b in buffers]
        compressed = compress_layer(eviction, cache.query_window[layer], *layer_buffers,
                                    active, evicting)
        return tuple(jax.lax.dynamic_update_index_in_dim(b, c, layer, 0)
                     for b, c in zip(buffers, compressed, strict=True))

    keys, values, positions, global_score = jax.lax.fori_loop(
        0, cache.keys.shape[0], layer_step,
        (cache.keys, cache.values, cache.positions, cache.global_score))
    compressed = constrain_cache(cache.replace(
        keys=resize_slots(keys, capacity, 0), values=resize_slots(values, capacity, 0),
        positions=resize_slots(positions, capacity, EMPTY_POSITION),
        global_score=resize_slots(global_score, capacity, jnp.nan),
        lengths=jnp.where(active, eviction.budget, cache.lengths)))
    return compressed, evicting
