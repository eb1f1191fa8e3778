"""The decode loop's per-step state and its one-step transition: `DecodeState` (the scan
carry), its starts after a prefill (`initial_state`, `start_state`), `decode_step` and what it
emits (`StepOutput`), and the stopping test (`is_eos`, `NO_LIMIT`).

`gkv_jax.decode` re-exports all of these and runs the steps in cycles (`decode_steps`,
`run_cycles`); compression is not part of a step (`gkv_jax.compression`).
"""

from __future__ import annotations

import chex
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from gkv_jax.cache import EMPTY_POSITION, KVCache
from gkv_jax.models.config import ModelConfig
from gkv_jax.models.transformer import forward_cached, lm_logits
from gkv_jax.sampling import SamplingParams, sample, seed_keys, token_keys
from gkv_jax.sharding.local import constrain_cache


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
