"""`replay_evictions`: the eviction masks of any token sequence, re-derived exactly.

A teacher-forced pass, layer by layer: once layer l's post-RoPE queries and keys exist
(layer l - 1 already ran under its replayed mask), the compression schedule of layer l is
re-run in order (the prefill event, then one event per `divide_length` inputs), carrying
the cache contents and the global score, through `gkv_jax.decode.compress_layer`, the code
generation compresses with; then layer l attends under the result. By induction over the
layers this reproduces generation's decisions for the same weights and tokens (in float32
the replay equals the generation's record exactly on tie-free scores).

What is not exact, and not done: scoring each event from the whole uncompressed prefix,
dropping the carried global score, or using another model's queries and keys.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from gkv_jax.compression import compress_layer, layer_real_token_counts, resize_slots
from gkv_jax.decode import query_window_size
from gkv_jax.eviction import EvictionConfig
from gkv_jax.eviction_record import NEVER, init_record, record_evictions
from gkv_jax.models.config import ModelConfig
from gkv_jax.models.transformer import forward_visible
from gkv_jax.training.batch import TeacherForcedBatch


def replay_layer(eviction: EvictionConfig, width: int, positions: Int[Array, "B T"],
                 lengths: Int[Array, " B"], queries: Float[Array, "B T N H"],
                 keys: Float[Array, "B K T H"], values: Float[Array, "B K T H"]
                 ) -> Int[Array, "B K T"]:
    """One layer's `visible_until` (slot layout) from its own post-RoPE projections.

    Mirrors `decode.generate_tokens` for this layer: the prefill (the prompts right-aligned
    in the first `budget` slots, or a prompt-sized cache compressed at once when the width
    exceeds the budget), then per event e >= 1 the `divide_length` inputs written at slots
    `budget ..` and one `compress_layer` of the rows still generating at forward
    e * divide_length; `record_evictions` notes each event.
    """
    B, T, N, H = queries.shape
    K = keys.shape[1]
    budget, D = eviction.budget, eviction.divide_length
    capacity = eviction.capacity
    W = query_window_size(eviction)
    next_position = jnp.max(positions[:, :width], axis=1) + 1  # P per row
    key_positions = jnp.broadcast_to(positions[:, None, :], (B, K, T))
    # The query ring as generation keeps it: last W of (W zero queries ++ every fed query).
    ring_source = jnp.concatenate(
        [jnp.zeros((B, W, N, H), queries.dtype), queries], axis=1).swapaxes(1, 2)

    def ring(end_slot):
        """[B, N, W, H] the last W queries fed before slot `end_slot`."""
        return jax.lax.dynamic_slice_in_dim(ring_source, end_slot, W, axis=2)

    record = init_record(1, B, K, T)
    no_history = jnp.full((B, K, width), jnp.nan, jnp.float32)
    prompt = (keys[:, :, :width], values[:, :, :width], key_positions[:, :, :width])
    if width <= budget:
        # The prompts right-aligned in the first `budget` slots, as `prefill` writes them.
        slots = [(0, 0), (0, 0), (budget - width, capacity - budget)]
        cache = tuple(jnp.pad(x, slots + [(0, 0)] * (x.ndim - 3), constant_values=fill)
                      for x, fill in zip(prompt, (0, 0, -1), strict=True))
        cache = (*cache, jnp.full((B, K, capacity), jnp.nan, jnp.float32))
    else:
        everyone = jnp.ones((B,), bool)
        evicting = layer_real_token_counts(prompt[2]) > budget
        compressed = compress_layer(eviction, ring(width), *prompt, no_history, everyone,
                                    evicting)
        record = record_evictions(record, prompt[2][None], compressed[2][None], next_position)
        cache = tuple(resize_slots(x, capacity, fill, axis=2)
                      for x, fill in zip(compressed, (0, 0, -1, jnp.nan), strict=True))

    def event(carry, e):
        (cache_keys, cache_values, cache_positions, global_score), record = carry
        start = width + (e - 1) * D  # first input slot of the cycle
        new = [jax.lax.dynamic_slice_in_dim(x, start, D, axis=2)
               for x in (keys, values, key_positions)]
        cache_keys = jax.lax.dynamic_update_slice_in_dim(cache_keys, new[0], budget, axis=2)
        cache_values = jax.lax.dynamic_update_slice_in_dim(cache_values, new[1], budget,
                                                           axis=2)
        cache_positions = jax.lax.dynamic_update_slice_in_dim(cache_positions, new[2], budget,
                                                              axis=2)
        active: Bool[Array, " B"] = e * D <= lengths - 1
        evicting = active & (layer_real_token_counts(cache_positions) > budget)
        compressed = compress_layer(eviction, ring(start + D), cache_keys, cache_values,
                                    cache_positions, global_score, active, evicting)
        record = record_evictions(record, cache_positions[None], compressed[2][None],
                                  next_position + e * D)
        return (compressed, record), None

    events = (T - width) // D
    if events:
        (_, record), _ = jax.lax.scan(event, (cache, record),
                                      jnp.arange(1, events + 1, dtype=jnp.int32))
    by_slot = jnp.take_along_axis(record[0], jnp.maximum(key_positions, 0), axis=2)
    return jnp.where(key_positions >= 0, by_slot, 0)


@functools.partial(jax.jit, static_argnames=("config", "eviction", "attention_impl"))
def replay_from_params(config: ModelConfig, params: dict, eviction: EvictionConfig,
                       batch: TeacherForcedBatch, attention_impl: str = "dense"
                       ) -> Int[Array, "L B K T"]:
    """`replay_evictions` on a plain parameter dict (jit-able; configs static)."""
    layer_fn = functools.partial(replay_layer, eviction, batch.width, batch.positions,
                                 batch.lengths)
    segments = None
    if attention_impl == "segments":
        segments = batch.replace(eviction=eviction).segment_layout
    params = jax.lax.stop_gradient(params)
    _, visible_until = forward_visible(config, params, batch.tokens, batch.positions,
                                       visibility_fn=layer_fn, attention_impl=attention_impl,
                                       segments=segments)
    return visible_until


def replay_evictions(model, eviction: EvictionConfig, batch: TeacherForcedBatch, *,
                     attention_impl: str = "dense") -> Int[Array, "L B K T"]:
    """The masks `eviction` gives `batch`'s tokens under `model`: [L, B, K, T] int32, slot
    layout (as `TeacherForcedBatch.visible_until`), under `stop_gradient`.

    Equals the record of a generation of the same tokens (`batch_from_generation(out)
    .visible_until`) exactly in float32; on traces that were not generated it is the record
    a forced decode of them would have. Use `batch.with_visible_until(replayed, eviction)`
    to train under it.

    Args:
      model: a `gkv_jax.Transformer` (or anything with `.config` and `.params()`).
      eviction: an evicting `EvictionConfig`.
      batch: a `TeacherForcedBatch` (its own masks, if any, are ignored).
      attention_impl: how each layer attends under its replayed mask, "dense" or
        "segments" (same results to float rounding; "segments" is linear in T).
    """
    if not isinstance(eviction, EvictionConfig):
        raise TypeError(f"eviction must be an EvictionConfig, got {type(eviction)}")
    if not isinstance(batch, TeacherForcedBatch):
        raise TypeError(f"batch must be a TeacherForcedBatch, got {type(batch)}")
    if attention_impl not in ("dense", "segments"):
        raise ValueError(f'attention_impl must be "dense" or "segments", got '
                         f"{attention_impl!r}")
    config = model.config
    if not eviction.evicts:
        B, T = batch.tokens.shape
        full = jnp.full((config.num_layers, B, config.num_kv_heads, T), NEVER, jnp.int32)
        return jnp.where(batch.positions[None, :, None, :] >= 0, full, 0)
    return replay_from_params(config, model.params(), eviction, batch,
                              attention_impl=attention_impl)
