"""The slot engine's pure core: three jit-compiled functions over fixed shapes, built on the
decode pieces `generate` uses (`gkv_jax.decode`), never on copies of them.

A slot is one batch row of a fixed-size cache (`budget + divide_length` slots per layer and
KV head for an evicting policy), so an engine of S slots is one `DecodeState` of S rows:

* `prefill_group`: G new prompts of one padded width (a prompt bucket) through
  `decode.prefill`, exactly as `generate` runs its prefill: full attention over the prompts,
  then the prefill compression. The result (`Prefix`) holds each prompt's compressed cache
  and its last logits; token 0 is drawn later, per slot, with the slot's own seed.
* `insert`: writes prefix rows into free slots (one prefix row may fill several slots: the
  samples of a pass@k problem or a GRPO group share one prefill), drawing each slot's
  token 0 with `fold_in(PRNGKey(seed), 0)` (`decode.start_state`).
* `run_cycle`: `divide_length` decode steps of every slot (`decode.decode_steps`), then one
  compression of the slots the last step served (`decode.compress_served`). Requests enter
  at cycle boundaries only, so every slot is at the same phase of the compression schedule
  (`generate` compresses after the prefill and every `divide_length`-th decode forward) and
  the compression stays one batched call.

Free slots are `done` rows: they feed empty positions and their caches stay frozen. Every
function is compiled once per shape: requests coming and going never recompile.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from gkv_jax.cache import KVCache, init_cache
from gkv_jax.decode import (
    DecodeState,
    compress_served,
    decode_steps,
    init_record,
    live_attention_block,
    prefill,
    query_window_size,
    record_evictions,
    start_state,
)
from gkv_jax.eviction import EvictionConfig
from gkv_jax.models.config import ModelConfig
from gkv_jax.sampling import SamplingParams, seed_keys
from gkv_jax.sharding.local import constrain_cache

__all__ = ["Prefix", "Slots", "init_slots", "insert", "prefill_group", "release", "run_cycle"]


@chex.dataclass(frozen=True)
class Slots:
    """The engine's device state: S slots of fixed shape.

    Attributes:
      state: the `DecodeState` of the S slots (cache [L, S, K, C, H] and per-slot rows).
      sampling: `SamplingParams` with [S] knobs, each slot's request's own.
      eos_ids: [S, E] int32 each slot's EOS ids, padded with -1.
      visible_until: [L, S, K, R] int32 eviction record of each slot by true position
        (`gkv_jax.eviction_record`), or None when the engine keeps none.
    """

    state: DecodeState
    sampling: SamplingParams
    eos_ids: Int[Array, "S E"]
    visible_until: Int[Array, "L S K R"] | None = None


@chex.dataclass(frozen=True)
class Prefix:
    """G prefilled prompts, ready to be inserted into slots.

    Attributes:
      cache: [L, G, K, C, H] each prompt's cache after the prefill compression.
      logits: [G, V] float32 logits of each prompt's last token (token 0 is drawn from them).
      next_position: [G] int32 each prompt's length.
      evicted: [G] bool whether the prefill compression evicted tokens of the prompt.
      visible_until: [L, G, K, R] int32 the record of the prefill compression, or None.
    """

    cache: KVCache
    logits: Float[Array, "G V"]
    next_position: Int[Array, " G"]
    evicted: Bool[Array, " G"]
    visible_until: Int[Array, "L G K R"] | None = None


def init_slots(config: ModelConfig, eviction: EvictionConfig, num_slots: int, capacity: int,
               eos_width: int, record_width: int | None, dtype) -> Slots:
    """S free slots (done, empty caches) of `capacity` cache slots each."""
    cache = constrain_cache(init_cache(config, num_slots, capacity,
                                       query_window_size(eviction), dtype))
    state = DecodeState(
        cache=cache, last_token=jnp.zeros((num_slots,), jnp.int32),
        next_position=jnp.zeros((num_slots,), jnp.int32), done=jnp.ones((num_slots,), bool),
        keys=seed_keys(jnp.zeros((num_slots,), jnp.int32)),
        token_index=jnp.zeros((num_slots,), jnp.int32),
        max_tokens=jnp.ones((num_slots,), jnp.int32), step=jnp.int32(0))
    sampling = SamplingParams(temperature=jnp.zeros((num_slots,), jnp.float32),
                              top_p=jnp.ones((num_slots,), jnp.float32),
                              top_k=jnp.zeros((num_slots,), jnp.int32))
    visible_until = None
    if record_width is not None and eviction.evicts:
        visible_until = init_record(config.num_layers, num_slots, config.num_kv_heads,
                                    record_width)
    return Slots(state=state, sampling=sampling,
                 eos_ids=jnp.full((num_slots, eos_width), -1, jnp.int32),
                 visible_until=visible_until)


def prefill_group(config: ModelConfig, eviction: EvictionConfig, capacity: int,
                  record_width: int | None, params: dict, tokens: Int[Array, "G T"],
                  positions: Int[Array, "G T"]) -> Prefix:
    """Prefills G left-padded prompts (`decode.prefill`, as `generate` does) into caches of
    `capacity` slots; with `record_width`, also their eviction record (config, eviction,
    capacity and record_width static)."""
    dtype = jax.tree.leaves(params)[0].dtype
    logits, cache, evicted = prefill(config, eviction, params, tokens, positions, capacity,
                                     dtype)
    next_position = jnp.max(positions, axis=1) + 1
    visible_until = None
    if record_width is not None and eviction.evicts:
        visible_until = record_evictions(
            init_record(config.num_layers, tokens.shape[0], config.num_kv_heads,
                        record_width), positions, cache.positions, next_position)
    return Prefix(cache=cache, logits=logits, next_position=next_position, evicted=evicted,
                  visible_until=visible_until)


def insert(slots: Slots, prefix: Prefix, rows: Int[Array, " n"], slot_ids: Int[Array, " n"],
           seeds: Int[Array, " n"], sampling: SamplingParams, max_tokens: Int[Array, " n"],
           eos_ids: Int[Array, "n E"]) -> tuple[Slots, Int[Array, " n"], Float[Array, " n"]]:
    """Writes prefix row `rows[i]` into slot `slot_ids[i]` and draws that slot's token 0.

    Args:
      rows: [n] prefix rows (a row may repeat: several samples of one prompt).
      slot_ids: [n] target slots; an id >= S marks an unused entry (dropped).
      seeds: [n] int32 each new request's seed (uint32 bits).
      sampling: `SamplingParams` with [n] knobs. max_tokens: [n] each request's limit.
      eos_ids: [n, E] each request's EOS ids (-1 padded).

    Returns:
      the slots, and [n] token 0 and its log-probability for each entry.
    """
    cache = jax.tree.map(lambda x: jnp.take(x, rows, axis=0 if x.ndim == 1 else 1),
                         prefix.cache)
    state, first = start_state(cache, prefix.logits[rows], prefix.next_position[rows],
                               seed_keys(seeds), max_tokens, sampling, eos_ids)
    new = slots.state
    placed = state.replace(step=new.step)
    new = jax.tree.map(lambda old, rows_: _set_rows(old, rows_, slot_ids), new, placed)
    visible_until = slots.visible_until
    if visible_until is not None:
        visible_until = visible_until.at[:, slot_ids].set(prefix.visible_until[:, rows],
                                                          mode="drop")
    return slots.replace(
        state=new.replace(cache=constrain_cache(new.cache)),
        sampling=jax.tree.map(lambda old, rows_: old.at[slot_ids].set(rows_, mode="drop"),
                              slots.sampling, sampling),
        eos_ids=slots.eos_ids.at[slot_ids].set(eos_ids, mode="drop"),
        visible_until=visible_until), first.tokens, first.log_probs


def _set_rows(old: Array, rows: Array, slot_ids: Array) -> Array:
    """`old` with batch rows `slot_ids` set to `rows`: batch axis 1 of the [L, B, ...] cache
    buffers (4 or 5 dimensions), 0 of the [B] and [B, 2] rows; the scalar step is kept. Ids
    out of range are dropped."""
    if old.ndim == 0:
        return old
    if old.ndim >= 4:
        return old.at[:, slot_ids].set(rows, mode="drop")
    return old.at[slot_ids].set(rows, mode="drop")


def run_cycle(config: ModelConfig, eviction: EvictionConfig, params: dict, slots: Slots
              ) -> tuple[Slots, Int[Array, "S d"], Float[Array, "S d"]]:
    """One cycle: `divide_length` decode steps of every slot, then the compression of the
    slots the last step served (evicting policies). `params` as `decode.decode_params` gives
    them (config and eviction static).

    Returns:
      the slots, and tokens [S, divide_length] and log_probs [S, divide_length] (fillers and
      0 where a slot was done or free).
    """
    state = slots.state
    block = live_attention_block(eviction, state.cache.capacity)
    state, tokens, log_probs, served = decode_steps(
        config, params, state, slots.sampling, slots.eos_ids, eviction.divide_length, block)
    visible_until = slots.visible_until
    if eviction.evicts:
        state, visible_until, _ = compress_served(eviction, state, served, visible_until)
    return slots.replace(state=state, visible_until=visible_until), tokens, log_probs


def release(slots: Slots, mask: Bool[Array, " S"]) -> Slots:
    """The slots with those in `mask` marked done (a cancelled request stops decoding)."""
    return slots.replace(state=slots.state.replace(done=slots.state.done | mask))
