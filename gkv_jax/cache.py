"""`KVCache`: the explicit, fixed-capacity attention cache threaded through every cached forward.

The model never owns the cache: `logits, cache = model(tokens, positions, cache)`. Slots hold
post-RoPE keys; `positions` records each slot's true token position (-1 = empty), so
attention masks and reported kept positions never depend on slot indices.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import chex
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

if TYPE_CHECKING:  # the models import this module; avoid the cycle at run time
    from gkv_jax.models.config import ModelConfig

EMPTY_POSITION = -1


@chex.dataclass(frozen=True)
class KVCache:
    """Per-layer key/value buffers of static capacity C, plus the eviction state.

    Attributes:
      keys: [L, B, K, C, H] post-RoPE keys, in the model's parameter dtype.
      values: [L, B, K, C, H].
      positions: [L, B, K, C] int32 true token position of each slot; -1 marks an empty slot.
      global_score: [L, B, K, C] float32 historical (global) score of each slot; NaN means
        the slot has no history yet (it was not kept at a previous compression).
      query_window: [L, B, N, W, H] the last W queries (post-RoPE) of each layer, oldest first.
      lengths: [B] int32 number of slots in use per sequence; the next token goes to slot
        `lengths[b]`. Slots below it may still be empty (left pads, evicted holes).
    """

    keys: Float[Array, "L B K C H"]
    values: Float[Array, "L B K C H"]
    positions: Int[Array, "L B K C"]
    global_score: Float[Array, "L B K C"]
    query_window: Float[Array, "L B N W H"]
    lengths: Int[Array, " B"]

    @property
    def capacity(self) -> int:
        """C, the static number of slots per (layer, sequence, KV head)."""
        return self.keys.shape[3]

    @property
    def window(self) -> int:
        """W, the number of recent queries kept per layer."""
        return self.query_window.shape[3]

    def num_bytes(self) -> int:
        """Bytes held by all buffers of the cache."""
        leaves = (self.keys, self.values, self.positions, self.global_score,
                  self.query_window, self.lengths)
        return int(sum(x.size * x.dtype.itemsize for x in leaves))


def init_cache(
    config: ModelConfig,
    batch_size: int,
    capacity: int,
    window: int = 0,
    dtype: jnp.dtype = jnp.float32,
) -> KVCache:
    """An empty cache: every slot empty (position -1), no history, zero lengths.

    Args:
      config: the model's architecture (L, K, N, H).
      batch_size: B.
      capacity: C slots per (layer, sequence, KV head).
      window: W, number of recent queries kept per layer (0 for no eviction).
      dtype: dtype of keys, values and queries (the model's parameter dtype).
    """
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    L, K, N, H = config.num_layers, config.num_kv_heads, config.num_heads, config.head_dim
    return KVCache(
        keys=jnp.zeros((L, batch_size, K, capacity, H), dtype),
        values=jnp.zeros((L, batch_size, K, capacity, H), dtype),
        positions=jnp.full((L, batch_size, K, capacity), EMPTY_POSITION, jnp.int32),
        global_score=jnp.full((L, batch_size, K, capacity), jnp.nan, jnp.float32),
        query_window=jnp.zeros((L, batch_size, N, window, H), dtype),
        lengths=jnp.zeros((batch_size,), jnp.int32),
    )
