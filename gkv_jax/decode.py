"""The functional decode loop: prefill, decode cycles, and the whole generation, all jit-able.

Timing follows docs/algorithm.md section 2. Forward 0 (the prefill) produces generated token 0;
decode forward k feeds token k-1 and produces token k. After forward 0 and after every decode
forward k with k % divide_length == 0, every active sequence's cache is compressed (evicting
where it holds more than `budget` real tokens). The current token always attends over the
uncompressed cache first, so a buffer of `budget + divide_length` slots is enough.

Slot layout invariant (evicting policies): after the prefill, every sequence's cache has
`lengths == budget` (a short prompt is written right-aligned at the end of the first `budget`
slots, its left part empty), and every compression brings active sequences back to `budget`.
So at each compression every active sequence's buffer is exactly full (S == capacity) and the
last W slots are the last W tokens, for all sequences of the batch at once.

Public, jit-able pieces: `cache_capacity`, `prefill`, `decode_step`, `compress_layer`, `evict`,
`record_evictions`, `run_cycles`; `gkv_jax.generate` assembles them into one compiled program.
This module holds the sizes, the prefill, the cycles and `generate_tokens`; it re-exports the
per-step state and step (`gkv_jax.decode_state`), the compressions (`gkv_jax.compression`)
and the eviction record's `init_record` and `record_evictions` (`gkv_jax.eviction_record`).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from gkv_jax.cache import EMPTY_POSITION, KVCache, init_cache
from gkv_jax.compression import compress_layer, evict
from gkv_jax.decode_state import (
    NO_LIMIT,
    DecodeState,
    StepOutput,
    decode_step,
    initial_state,
    is_eos,
    start_state,
)
from gkv_jax.eviction import EvictionConfig
from gkv_jax.eviction_record import NEVER, init_record, record_evictions
from gkv_jax.models.config import ModelConfig
from gkv_jax.models.transformer import forward_cached, lm_logits, unstack_layers
from gkv_jax.pallas_kernels import traced_platform
from gkv_jax.sampling import SamplingParams, seed_keys
from gkv_jax.sharding.local import constrain_cache


def query_window_size(eviction: EvictionConfig) -> int:
    """W of the query ring the cache must keep: the policy's window, none for a policy that
    scores without queries (`streaming`) or never evicts (`full`)."""
    return eviction.query_window_size


def cache_capacity(eviction: EvictionConfig, prompt_length: int, max_new_tokens: int) -> int:
    """C slots per (layer, sequence, KV head): `budget + divide_length` for evicting policies
    (independent of `max_new_tokens`), prompt + generated tokens for `full`."""
    if eviction.evicts:
        return eviction.capacity
    return prompt_length + max_new_tokens - 1


# Growing full caches read their live slots in blocks of at least MIN_LIVE_BLOCK slots, in
# at most about MAX_LIVE_BLOCKS blocks (fewer, larger trips for long caches). Measured on
# CPU (benchmarks/full_cache_bench.py). On accelerators each trip launches its own kernels,
# so blocks are larger there (not yet measured: no device has been lent).
MIN_LIVE_BLOCK, MAX_LIVE_BLOCKS = 512, 16
ACCELERATOR_MIN_LIVE_BLOCK, ACCELERATOR_MAX_LIVE_BLOCKS = 2048, 8


def live_attention_block(eviction: EvictionConfig, capacity: int) -> int:
    """The decode steps' `attention_block` (see `forward_cached`): the whole buffer in one
    pass for evicting policies, whose buffer is full at every step, and for caches of at
    most two minimum blocks; otherwise the smallest multiple of the minimum block that cuts
    the capacity into at most the most blocks of the platform traced for (`traced_platform`),
    read up to the longest row."""
    smallest, most = ((MIN_LIVE_BLOCK, MAX_LIVE_BLOCKS) if traced_platform() == "cpu"
                      else (ACCELERATOR_MIN_LIVE_BLOCK, ACCELERATOR_MAX_LIVE_BLOCKS))
    if eviction.evicts or capacity <= 2 * smallest:
        return capacity
    per_block = -(-capacity // most)
    return -(-per_block // smallest) * smallest



__all__ = ["NEVER", "NO_LIMIT", "DecodeState", "Outputs", "StepOutput", "cache_capacity",
           "compress_layer", "compress_served", "decode_step", "decode_steps", "evict",
           "generate_tokens", "init_record", "initial_state", "is_eos", "prefill",
           "query_window_size", "record_evictions", "run_cycles", "start_state"]


# ------------------------------------------------------------------------------ prefill
def prefill(config: ModelConfig, eviction: EvictionConfig, params: dict, tokens: Array,
            positions: Int[Array, "B T"], capacity: int, dtype
            ) -> tuple[Float[Array, "B V"], KVCache, Bool[Array, " B"]]:
    """Forward 0 over left-padded prompts, then the prefill compression.

    Args:
      tokens: [B, T] int32 prompts, left-padded.
      positions: [B, T] int32 true positions, -1 on pads.
      capacity: C of the returned cache (see `cache_capacity`).
      dtype: the model's parameter dtype (of the cached keys and values).

    Returns:
      logits [B, V] float32 of the last prompt token, the cache, and [B] bool which
      sequences evicted at the prefill.
    """
    B, T = tokens.shape
    W = query_window_size(eviction)
    no_eviction = jnp.zeros((B,), bool)
    # The prompt attends over a prompt-sized cache (scores [B, N, T, T]), never over the
    # whole capacity, whose other slots are still empty.
    cache = constrain_cache(init_cache(config, B, T, W, dtype))
    hidden, cache = forward_cached(config, params, tokens, positions, cache)
    logits = lm_logits(config, params, hidden[:, -1:])[:, 0]
    if not eviction.evicts or T <= eviction.budget:
        # An evicting policy's prompt is right-aligned within the first `budget` slots.
        first_slot = eviction.budget - T if eviction.evicts else 0
        return logits, constrain_cache(place_slots(cache, capacity, first_slot)), no_eviction
    cache, evicted = evict(eviction, cache, jnp.ones((B,), bool), capacity)
    return logits, cache, evicted


def place_slots(cache: KVCache, capacity: int, first_slot: int) -> KVCache:
    """`cache`'s S slots moved to slots [first_slot, first_slot + S) of a cache of
    `capacity` slots whose other slots are empty; `lengths` advance by `first_slot`."""
    def place(buffer, fill):
        pad = [(0, 0)] * buffer.ndim
        pad[3] = (first_slot, capacity - first_slot - buffer.shape[3])
        return jnp.pad(buffer, pad, constant_values=fill)

    return cache.replace(keys=place(cache.keys, 0), values=place(cache.values, 0),
                         positions=place(cache.positions, EMPTY_POSITION),
                         global_score=place(cache.global_score, jnp.nan),
                         lengths=cache.lengths + first_slot)



# ------------------------------------------------------------------------------ decoding
@chex.dataclass(frozen=True)
class Outputs:
    """Per-token outputs written in place as cycles run.

    Attributes:
      tokens: [B, M] int32 generated ids (token j at column j).
      log_probs: [B, M] float32.
      compressions: [] int32 number of compression steps at which some sequence evicted.
      visible_until: [L, B, K, Tp + M] int32 eviction record by true position (see
        `gkv_jax.eviction_record`), or None when not recorded (a static choice: the pytree
        structure differs).
    """

    tokens: Int[Array, "B M"]
    log_probs: Float[Array, "B M"]
    compressions: Int[Array, ""]
    visible_until: Int[Array, "L B K P"] | None = None


def decode_steps(config: ModelConfig, params: dict, state: DecodeState,
                 sampling: SamplingParams, eos_ids: Int[Array, "*B E"], num_steps: int,
                 attention_block: int | None = None
                 ) -> tuple[DecodeState, Int[Array, "B n"], Float[Array, "B n"], Bool[Array, " B"]]:
    """`num_steps` decode steps under `lax.scan` (static `num_steps`, `attention_block`).

    Returns:
      the state; tokens [B, num_steps] and log_probs [B, num_steps] (fillers and 0 where a
      sequence was done); served [B]: the sequences the last forward served (not done before
      it), which a compression after these steps compresses (see `compress_served`).
    """

    def step(carry, _):
        state, _ = carry
        before = state.done
        state, emitted = decode_step(config, params, state, sampling, eos_ids,
                                     attention_block)
        return (state, before), (emitted.tokens, emitted.log_probs)

    (state, done_before_last), (tokens, log_probs) = jax.lax.scan(
        step, (state, state.done), None, length=num_steps)
    return state, tokens.T, log_probs.T, ~done_before_last


def compress_served(eviction: EvictionConfig, state: DecodeState, served: Bool[Array, " B"],
                    visible_until: Int[Array, "L B K P"] | None = None):
    """The compression at the end of a cycle: `evict` of the sequences the cycle's last
    forward served (so a sequence whose last token came at a compression step is
    compressed, then frozen), and the eviction record updated when one is kept.

    Returns:
      (state, visible_until or None, evicted [B]).
    """
    cache, evicted = evict(eviction, state.cache, served)
    if visible_until is not None:
        visible_until = record_evictions(visible_until, state.cache.positions, cache.positions,
                                         state.next_position)
    return state.replace(cache=cache), visible_until, evicted


def _write_tokens(outputs: Outputs, start, tokens, log_probs) -> Outputs:
    """`outputs` with [B, n] new tokens and log-probs written from column `start`."""
    return outputs.replace(
        tokens=jax.lax.dynamic_update_slice_in_dim(outputs.tokens, tokens, start, axis=1),
        log_probs=jax.lax.dynamic_update_slice_in_dim(outputs.log_probs, log_probs, start,
                                                      axis=1))


def run_cycles(config: ModelConfig, eviction: EvictionConfig, params: dict,
               state: DecodeState, outputs: Outputs, sampling: SamplingParams,
               eos_ids: Int[Array, " E"], max_new_tokens: int) -> tuple[DecodeState, Outputs]:
    """Decode forwards 1 .. max_new_tokens - 1 in cycles of `divide_length` steps.

    Each full cycle ends with one `evict` of the sequences its last forward served (so a
    sequence whose EOS came at a compression step is compressed, then frozen). A final
    partial cycle ends without a compression. The loop stops early, at cycle granularity,
    once every sequence is done. A full cache's steps attend over its live slots only
    (`live_attention_block`).
    """
    period = eviction.divide_length
    attention_block = live_attention_block(eviction, state.cache.capacity)
    num_full, remainder = divmod(max_new_tokens - 1, period)

    def cycle(carry):
        index, state, outputs = carry
        start = state.step
        state, tokens, log_probs, served = decode_steps(config, params, state, sampling,
                                                        eos_ids, period, attention_block)
        outputs = _write_tokens(outputs, start, tokens, log_probs)
        if eviction.evicts:
            state, visible_until, evicted = compress_served(eviction, state, served,
                                                            outputs.visible_until)
            outputs = outputs.replace(
                visible_until=visible_until,
                compressions=outputs.compressions + jnp.any(evicted).astype(jnp.int32))
        return index + 1, state, outputs

    def unfinished(carry):
        index, state, _ = carry
        return (index < num_full) & ~jnp.all(state.done)

    if num_full:
        _, state, outputs = jax.lax.while_loop(unfinished, cycle,
                                               (jnp.int32(0), state, outputs))
    if remainder:
        def tail(carry):
            _, state, outputs = carry
            start = state.step
            state, tokens, log_probs, _ = decode_steps(config, params, state, sampling,
                                                       eos_ids, remainder, attention_block)
            return jnp.bool_(True), state, _write_tokens(outputs, start, tokens, log_probs)

        def tail_due(carry):
            ran, state, _ = carry
            return ~ran & ~jnp.all(state.done)

        # A loop of at most one trip, not a `cond`: a cond's branch that passes the state
        # through unchanged copies the whole cache (measured in the compiled TPU program).
        _, state, outputs = jax.lax.while_loop(tail_due, tail,
                                               (jnp.bool_(False), state, outputs))
    return state, outputs


def decode_params(params: dict) -> dict:
    """The weights as the decode steps read them: split per layer on CPU, where XLA copies
    every slice of a stacked weight before its product (`unstack_layers`: one copy per
    call instead of one per step; the split weights double the weights' memory while the
    program runs, which host memory affords). For the accelerators (`traced_platform`) the
    stacked weights, whose slices their compilers read in place, and which must not be held
    twice."""
    if traced_platform() != "cpu":
        return params
    return unstack_layers(params)


def generate_tokens(config: ModelConfig, eviction: EvictionConfig, max_new_tokens: int,
                    params: dict, tokens: Array, positions: Array, sampling: SamplingParams,
                    seeds: Array, eos_ids: Array, record: bool = False
                    ) -> tuple[Outputs, DecodeState]:
    """The whole generation as one jit-able function (config, eviction, max_new_tokens and
    record static): prefill, sample token 0, then `run_cycles`.

    Args:
      tokens: [B, T] int32 left-padded prompts; positions: [B, T] true positions (-1 pads).
      seeds: [B] int32 sampler seed of each row (uint32 bits): row b draws token j with
        `fold_in(PRNGKey(seeds[b]), j)`. eos_ids: [E] int32 (E may be 0).
      record: also build `Outputs.visible_until`, the eviction record ([L, B, K, T +
        max_new_tokens], by true position), on the device: two scatters per compression.
    """
    dtype = jax.tree.leaves(params)[0].dtype
    capacity = cache_capacity(eviction, tokens.shape[1], max_new_tokens)
    logits, cache, evicted = prefill(config, eviction, params, tokens, positions, capacity,
                                     dtype)
    B = tokens.shape[0]
    next_position = jnp.max(positions, axis=1) + 1
    state, first = start_state(cache, logits, next_position, seed_keys(seeds),
                               jnp.full((B,), max_new_tokens, jnp.int32), sampling, eos_ids)
    visible_until = None
    if record and eviction.evicts:
        visible_until = init_record(config.num_layers, B, config.num_kv_heads,
                                    tokens.shape[1] + max_new_tokens)
        visible_until = record_evictions(visible_until, positions, cache.positions,
                                         next_position)
    outputs = Outputs(
        tokens=jnp.zeros((B, max_new_tokens), jnp.int32).at[:, 0].set(first.tokens),
        log_probs=jnp.zeros((B, max_new_tokens), jnp.float32).at[:, 0].set(first.log_probs),
        compressions=jnp.any(evicted).astype(jnp.int32), visible_until=visible_until)
    state, outputs = run_cycles(config, eviction, decode_params(params), state, outputs,
                                sampling, eos_ids, max_new_tokens)
    return outputs, state.replace(cache=constrain_cache(state.cache))
