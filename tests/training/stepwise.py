"""A forced decode with the public pieces, and the eviction record derived from it
independently of `record_evictions`: from the positions each forward attended to."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from gkv_jax.decode import (
    cache_capacity,
    decode_step,
    evict,
    init_record,
    initial_state,
    prefill,
    record_evictions,
)
from gkv_jax.eviction_record import NEVER
from gkv_jax.generation_inputs import _left_pad
from gkv_jax.sampling import SamplingParams

GREEDY = SamplingParams.create()
NO_EOS = jnp.zeros((0,), jnp.int32)


@functools.cache
def _jitted(config, eviction, capacity, dtype):
    return (jax.jit(functools.partial(prefill, config, eviction, capacity=capacity,
                                      dtype=dtype)),
            jax.jit(functools.partial(decode_step, config)),
            jax.jit(functools.partial(evict, eviction)),
            jax.jit(record_evictions))


def forced_decode(model, eviction, prompts, completions, width):
    """Feeds `completions` token by token after `prompts` (left-padded to `width`), exactly
    as `generate` would have generated them: prefill, `decode_step`, `evict` of the rows the
    last forward served after every `divide_length`-th forward.

    Returns:
      derived: [L, B, K, P_max + M] int32, per key the first fed query position whose
        forward did not attend to it (NEVER if none), from the attended positions alone.
      looped: the same built with `decode.record_evictions` around each compression.
      final_positions: [L, B, K, C] the cache positions at the end.
    """
    config, params = model.config, model.params()
    B = len(prompts)
    L, K = config.num_layers, config.num_kv_heads
    M = max(len(c) for c in completions)
    P = np.asarray([len(p) for p in prompts])
    span = int(P.max()) + M
    tokens, positions = _left_pad(prompts, width)
    capacity = cache_capacity(eviction, width, M)
    run_prefill, step, compress, note = _jitted(config, eviction, capacity, model.dtype)
    _, cache, _ = run_prefill(params=params, tokens=jnp.asarray(tokens),
                              positions=jnp.asarray(positions))
    looped = init_record(L, B, K, width + M)
    if eviction.evicts:
        looped = note(looped, jnp.asarray(positions), cache.positions, jnp.asarray(P))
    lengths = np.asarray([len(c) for c in completions])
    forced = np.zeros((B, M), np.int32)
    for b, c in enumerate(completions):
        forced[b, :len(c)] = c
    state = initial_state(cache, jnp.asarray(forced[:, 0]), jnp.asarray(P, jnp.int32),
                          done=jnp.asarray(lengths - 1 <= 0))
    derived = np.full((L, B, K, span), NEVER, np.int64)
    for k in range(1, M):
        done_before = np.asarray(state.done)
        state, _ = step(params, state, GREEDY, NO_EOS)
        attended = np.asarray(state.cache.positions)  # [L, B, K, C], the new key included
        for b in np.flatnonzero(~done_before):
            _note_attended(derived[:, b], attended[:, b], int(P[b]) + k - 1)
        state = state.replace(
            last_token=jnp.asarray(np.where(k < lengths, forced[:, min(k, M - 1)], 0)),
            done=jnp.asarray(done_before | (k >= lengths - 1)))
        if eviction.evicts and k % eviction.divide_length == 0:
            compressed, _ = compress(state.cache, jnp.asarray(~done_before))
            looped = note(looped, state.cache.positions, compressed.positions,
                          state.next_position)
            state = state.replace(cache=compressed)
    # A compression after a row's last forward has no query after it: the final cache says
    # what it evicted, expiring at the position the next token would have had.
    final_positions = np.asarray(state.cache.positions)
    for b in range(B):
        fed = int(P[b] + lengths[b] - 1)
        final = np.zeros((L, K, fed), bool)
        for l, h in np.ndindex(L, K):
            kept = final_positions[l, b, h]
            final[l, h, kept[kept >= 0]] = True
        window = derived[:, b, :, :fed]
        window[~final & (window == NEVER)] = fed
    return derived.astype(np.int32), np.asarray(looped)[..., :span], final_positions


def _note_attended(derived, attended, query):
    """derived [L, K, span], attended [L, K, C]: keys fed before `query` that it did not
    see expire at `query`; a key seen again after expiring is an error (evictions are
    permanent)."""
    L, K, _ = derived.shape
    present = np.zeros((L, K, query + 1), bool)
    for l in range(L):
        for h in range(K):
            kept = attended[l, h]
            kept = kept[kept >= 0]
            assert kept.max() == query and kept.min() >= 0
            present[l, h, kept] = True
    window = derived[:, :, :query + 1]
    assert not (present & (window != NEVER)).any(), f"a key came back at query {query}"
    window[~present & (window == NEVER)] = query
