"""The functional decode loop: prefill, decode steps, and eviction, all jit-able.

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
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from gkv_jax.cache import EMPTY_POSITION, KVCache, init_cache
from gkv_jax.eviction import EvictionConfig, Ops, select_with_ops
from gkv_jax.eviction_record import NEVER, init_record, record_evictions
from gkv_jax.models.config import ModelConfig
from gkv_jax.models.transformer import forward_cached, lm_logits, unstack_layers
from gkv_jax.pallas_kernels import traced_platform
from gkv_jax.sampling import SamplingParams, sample, seed_keys, token_keys
from gkv_jax.sharding.local import constrain_cache, per_head_blocks, per_sequence


@chex.dataclass(frozen=True)
class DecodeState:
    """Everything a decode step carries (a pytree of fixed shapes).

    Attributes:
      cache: the `KVCache`.
      last_token: [B] int32, the token the next forward feeds.
      next_position: [B] int32, its true position (prompt length + tokens generated before it).
      done: [B] bool, the sequence produced an EOS or its last token; its cache is frozen.
      keys: [B, 2] uint32, each sequence's base key (`sampling.seed_keys` of its seed): token
        j is drawn with `fold_in(keys[b], j)`, so a sequence's tokens never depend on its row
        or its neighbours.
      token_index: [B] int32, j of the token the next forward samples (1 after the prefill).
      max_tokens: [B] int32, tokens the sequence generates at most (done after token
        max_tokens - 1).
      step: [] int32 index of the next forward of the batch (1 right after the prefill).
    """

    cache: KVCache
    last_token: Int[Array, " B"]
    next_position: Int[Array, " B"]
    done: Bool[Array, " B"]
    keys: Array
    token_index: Int[Array, " B"]
    max_tokens: Int[Array, " B"]
    step: Int[Array, ""]


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


def real_token_counts(cache: KVCache) -> Int[Array, " B"]:
    """[B] number of real (non-empty) slots; every layer and KV head holds the same count."""
    return layer_real_token_counts(cache.positions[0])


def layer_real_token_counts(positions: Int[Array, "B K S"]) -> Int[Array, " B"]:
    """[B] real slots of one layer's positions (the same for every KV head)."""
    return jnp.sum(positions[:, 0, :] >= 0, axis=-1).astype(jnp.int32)


__all__ = ["NEVER", "NO_LIMIT", "DecodeState", "Outputs", "StepOutput", "cache_capacity",
           "compress_layer", "compress_served", "decode_step", "decode_steps", "evict",
           "generate_tokens", "init_record", "initial_state", "is_eos", "prefill",
           "query_window_size", "record_evictions", "run_cycles", "start_state"]


# ------------------------------------------------------------------------------ eviction
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
def _freeze_finished(done: Bool[Array, " B"], new: KVCache, old: KVCache) -> KVCache:
    """Finished sequences keep their lengths and query ring (their slot writes were empty)."""
    return new.replace(
        lengths=jnp.where(done, old.lengths, new.lengths),
        query_window=jnp.where(done[None, :, None, None, None], old.query_window,
                               new.query_window))


@chex.dataclass(frozen=True)
class StepOutput:
    """What one decode step emits.

    Attributes:
      tokens: [B] int32 sampled tokens (finished sequences repeat the filler).
      log_probs: [B] float32 log-probability of each sampled token.
      logits: [B, V] float32 logits of the step (dropped by XLA when unused).
    """

    tokens: Int[Array, " B"]
    log_probs: Float[Array, " B"]
    logits: Float[Array, "B V"]


def is_eos(tokens: Int[Array, " B"], eos_ids: Int[Array, "*B E"]) -> Bool[Array, " B"]:
    """[B] whether each token is one of the EOS ids: `eos_ids` [E] for every row, or [B, E]
    per row (padded with -1, which no token equals); E may be 0."""
    ids = eos_ids if eos_ids.ndim == 2 else eos_ids[None, :]
    return jnp.any(tokens[:, None] == ids, axis=-1)


NO_LIMIT = 2**31 - 1  # max_tokens of a sequence that only stops at an EOS (or the loop's end)


def initial_state(cache: KVCache, last_token: Int[Array, " B"],
                  next_position: Int[Array, " B"], *, seeds: Int[Array, " B"] | None = None,
                  done: Bool[Array, " B"] | None = None,
                  max_tokens: Int[Array, " B"] | None = None) -> DecodeState:
    """A `DecodeState` after a prefill whose token 0 is `last_token` (for decode loops of
    one's own): seeds [B] (default 0 each), done [B] (default none), max_tokens [B] (default
    no limit)."""
    B = last_token.shape[0]
    seeds = jnp.zeros((B,), jnp.int32) if seeds is None else jnp.asarray(seeds, jnp.int32)
    return DecodeState(
        cache=cache, last_token=jnp.asarray(last_token, jnp.int32),
        next_position=jnp.broadcast_to(jnp.asarray(next_position, jnp.int32), (B,)),
        done=jnp.zeros((B,), bool) if done is None else jnp.asarray(done, bool),
        keys=seed_keys(seeds), token_index=jnp.ones((B,), jnp.int32),
        max_tokens=jnp.full((B,), NO_LIMIT, jnp.int32) if max_tokens is None
        else jnp.asarray(max_tokens, jnp.int32), step=jnp.int32(1))


def start_state(cache: KVCache, logits: Float[Array, "B V"], next_position: Int[Array, " B"],
                keys: Array, max_tokens: Int[Array, " B"], sampling: SamplingParams,
                eos_ids: Int[Array, "*B E"]) -> tuple[DecodeState, StepOutput]:
    """The state after the prefill: token 0 drawn from the prompts' last logits with
    `fold_in(keys[b], 0)`; done where it is an EOS or `max_tokens` is 1."""
    B = logits.shape[0]
    first, first_log_prob = sample(logits, token_keys(keys, jnp.zeros((B,), jnp.int32)),
                                   sampling)
    state = DecodeState(cache=cache, last_token=first, next_position=next_position,
                        done=is_eos(first, eos_ids) | (max_tokens <= 1), keys=keys,
                        token_index=jnp.ones((B,), jnp.int32), max_tokens=max_tokens,
                        step=jnp.int32(1))
    return state, StepOutput(tokens=first, log_probs=first_log_prob, logits=logits)


def decode_step(config: ModelConfig, params: dict, state: DecodeState,
                sampling: SamplingParams, eos_ids: Int[Array, "*B E"],
                attention_block: int | None = None) -> tuple[DecodeState, StepOutput]:
    """One decode forward: feeds `state.last_token` and samples the next token of every
    sequence with its own key (`fold_in(keys[b], token_index[b])`).

    A finished sequence feeds an empty slot (position -1) and its cache stays frozen; its
    output token is a filler (its first EOS id, or 0). A sequence is done after an EOS
    (`eos_ids` [E], or [B, E] per row) or after its `max_tokens`-th token. Compression is
    not part of a step: call `evict` after every `divide_length`-th step, as `run_cycles`
    does. `attention_block` (static): see `forward_cached` and `live_attention_block`.
    """
    done = state.done
    positions = jnp.where(done, EMPTY_POSITION, state.next_position)[:, None]
    hidden, cache = forward_cached(config, params, state.last_token[:, None], positions,
                                   state.cache, attention_block)
    cache = constrain_cache(_freeze_finished(done, cache, state.cache))
    logits = lm_logits(config, params, hidden)[:, 0]
    tokens, log_probs = sample(logits, token_keys(state.keys, state.token_index), sampling)
    tokens = jnp.where(done, _filler(eos_ids, tokens.shape[0]), tokens)
    log_probs = jnp.where(done, 0.0, log_probs)
    finished = is_eos(tokens, eos_ids) | (state.token_index + 1 >= state.max_tokens)
    new_state = state.replace(
        cache=cache, last_token=tokens,
        next_position=jnp.where(done, state.next_position, state.next_position + 1),
        done=done | finished, token_index=jnp.where(done, state.token_index,
                                                    state.token_index + 1),
        step=state.step + 1)
    return new_state, StepOutput(tokens=tokens, log_probs=log_probs, logits=logits)


def _filler(eos_ids: Int[Array, "*B E"], B: int) -> Int[Array, " B"]:
    """The token a finished sequence repeats: its first EOS id (>= 0), else 0."""
    if eos_ids.shape[-1] == 0:
        return jnp.zeros((B,), jnp.int32)
    first = eos_ids[..., 0] if eos_ids.ndim == 2 else jnp.broadcast_to(eos_ids[0], (B,))
    return jnp.maximum(first, 0).astype(jnp.int32)


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
