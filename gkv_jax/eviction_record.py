"""The exact eviction record of a generation: one integer per cached key.

Eviction is permanent and a token enters the cache when it is fed, so per (layer, sequence,
KV head, key position j) one integer says which queries saw the key:

    visible_until[l, b, h, j] = the first query position that no longer sees key j
                                (NEVER = 2**31 - 1 if j is never evicted)

Query q attends to key j iff `j <= q < visible_until[l, b, h, j]`, with true positions
(prompt 0..P-1, generated token i at P + i). Compression event e (e = 0: after the prefill;
e >= 1: after decode forward e * divide_length) evicts keys with
`visible_until = P + e * divide_length`: the token fed at the compressing forward still
attended to them, the next one does not.

`record_evictions` is the jit-able piece the decode loop calls around each compression (two
scatters, nothing per step); `EvictionRecord` is what `generate(...,
return_eviction_record=True)` returns, with helpers to read it.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int

from gkv_jax.eviction import EvictionConfig

NEVER = 2**31 - 1


def init_record(num_layers: int, batch_size: int, num_kv_heads: int,
                num_positions: int) -> Int[Array, "L B K P"]:
    """A record where no key is evicted: [L, B, K, num_positions] int32, all NEVER."""
    return jnp.full((num_layers, batch_size, num_kv_heads, num_positions), NEVER, jnp.int32)


def _scatter_index(visible_until: Array, positions: Array):
    """Index arrays for `visible_until[l, b, h, positions[l, b, h, s]]`; empty slots (-1)
    point past the end, explicitly (`.at[]` would wrap -1 before `mode="drop"` applies)."""
    L, B, K, _ = positions.shape
    beyond = visible_until.shape[3]
    return (jnp.arange(L)[:, None, None, None], jnp.arange(B)[None, :, None, None],
            jnp.arange(K)[None, None, :, None], jnp.where(positions >= 0, positions, beyond))


def record_evictions(visible_until: Int[Array, "L B K P"],
                     before: Int[Array, "L B K S"] | Int[Array, "B S"],
                     after: Int[Array, "L B K C"], next_position: Int[Array, " B"]
                     ) -> Int[Array, "L B K P"]:
    """Updates the record with one compression of every layer.

    Every key in the cache before the compression gets `min(., next_position)`, then every
    key still in it afterwards is set back to NEVER; so exactly the evicted keys expire at
    `next_position`, the position of the next token to be fed. Sequences that did not evict
    are unchanged (their cache holds the same keys before and after).

    Args:
      visible_until: [L, B, K, P] int32 by true position (P above every position used).
      before: [L, B, K, S] int32 true positions in the cache before the compression (-1 =
        empty), e.g. `cache.positions`; or [B, S], the same for every layer and head: after
        `prefill`, the prompt `positions` it was given.
      after: [L, B, K, C] the same after it.
      next_position: [B] int32 true position of each sequence's next fed token.

    >>> import jax.numpy as jnp
    >>> record = init_record(1, 1, 1, 6)
    >>> before = jnp.array([[[[0, 1, 2, 3, -1]]]])
    >>> after = jnp.array([[[[0, 3, -1]]]])
    >>> record_evictions(record, before, after, jnp.array([4]))[0, 0, 0].tolist() == [
    ...     NEVER, 4, 4, NEVER, NEVER, NEVER]
    True
    """
    if before.ndim == 2:
        L, _, K, _ = visible_until.shape
        before = jnp.broadcast_to(before[None, :, None, :], (L, before.shape[0], K,
                                                              before.shape[1]))
    before_index = _scatter_index(visible_until, before)
    expiry = jnp.broadcast_to(next_position.astype(jnp.int32)[None, :, None, None],
                              before.shape)
    visible_until = visible_until.at[before_index].min(expiry, mode="drop")
    return visible_until.at[_scatter_index(visible_until, after)].set(NEVER, mode="drop")


@dataclasses.dataclass(frozen=True)
class EvictionRecord:
    """Which keys every query of a generation attended to, per layer and KV head.

    Attributes:
      visible_until: [L, B, K, P_max + max_new_tokens] int32 numpy, by true position: the
        first query position that no longer sees the key, NEVER if none (keys never fed are
        NEVER too).
      prompt_lengths: [B] int32 prompt lengths P (without pads).
      lengths: [B] int32 generated tokens, EOS included. Sequence b fed positions
        0 .. P + lengths - 2 (its last token is produced, never fed).
      eviction: the `EvictionConfig` of the generation.
    """

    visible_until: np.ndarray
    prompt_lengths: np.ndarray
    lengths: np.ndarray
    eviction: EvictionConfig

    NEVER = NEVER

    def fed(self, sequence: int) -> int:
        """Number of positions sequence b fed to the model: P + lengths - 1."""
        return int(self.prompt_lengths[sequence] + self.lengths[sequence] - 1)

    def attended(self, layer: int, sequence: int, head: int, query: int) -> np.ndarray:
        """Sorted true positions that the query at position `query` attended to."""
        if not 0 <= query < self.fed(sequence):
            raise ValueError(f"query must be a fed position in [0, {self.fed(sequence)}) of "
                             f"sequence {sequence}, got {query}")
        until = self.visible_until[layer, sequence, head, : query + 1]
        return np.flatnonzero(until > query).astype(np.int32)

    def num_events(self, sequence: int) -> int:
        """Compression events sequence b went through (the prefill's included): event e >= 1
        happened iff decode forward e * divide_length served it."""
        if not self.eviction.evicts:
            return 0
        return 1 + (int(self.lengths[sequence]) - 1) // self.eviction.divide_length

    def event_position(self, sequence: int, event: int) -> int:
        """True position of the first query after compression event e: P + e * divide_length."""
        return int(self.prompt_lengths[sequence]) + event * self.eviction.divide_length

    def kept_after(self, event: int, layer: int, sequence: int, head: int) -> np.ndarray:
        """Sorted true positions in the cache right after compression event e (keys fed
        before it that the next query still sees)."""
        if not 0 <= event < self.num_events(sequence):
            raise ValueError(f"event must be in [0, {self.num_events(sequence)}) for sequence "
                             f"{sequence}, got {event}")
        start = self.event_position(sequence, event)
        until = self.visible_until[layer, sequence, head, :start]
        return np.flatnonzero(until > start).astype(np.int32)

    def final_kept(self, layer: int, sequence: int, head: int) -> np.ndarray:
        """Sorted true positions in the cache after the last forward (as `kept_positions`)."""
        until = self.visible_until[layer, sequence, head, : self.fed(sequence)]
        return np.flatnonzero(until == NEVER).astype(np.int32)

    def num_bytes(self) -> int:
        """Bytes of `visible_until`."""
        return int(self.visible_until.nbytes)
