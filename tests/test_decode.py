"""The decode loop against a teacher-forced reference: at every step, the logits equal a full
forward over the same tokens with attention masked, per layer and KV head, to the positions
the step attended to; plus the invariants of the kept positions."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gkv_jax import conversion
from gkv_jax.decode import cache_capacity, decode_step, evict, initial_state, prefill
from gkv_jax.eviction import EvictionConfig
from gkv_jax.generation import generate
from gkv_jax.models import forward
from gkv_jax.sampling import SamplingParams
from tests.helpers import SPEC_BY_NAME, tiny_hf_model

SPEC = SPEC_BY_NAME["qwen2-h32-g2-untied"]
GREEDY = SamplingParams.create()
NO_EOS = jnp.zeros((0,), jnp.int32)


@functools.cache
def tiny_model():
    return conversion.from_hf(tiny_hf_model(SPEC))


def run_stepwise(model, eviction, prompt, max_new_tokens):
    """Greedy decoding of one prompt with the public pieces, recording per forward the logits
    and the positions each layer and KV head attended to ([L, K, slots], -1 = empty)."""
    config, params = model.config, model.params()
    P = len(prompt)
    tokens = jnp.asarray([prompt], jnp.int32)
    positions = jnp.arange(P, dtype=jnp.int32)[None]
    capacity = cache_capacity(eviction, P, max_new_tokens)
    logits, cache, _ = prefill(config, eviction, params, tokens, positions, capacity,
                               model.dtype)
    step = jax.jit(functools.partial(decode_step, config))
    compress = jax.jit(functools.partial(evict, eviction))
    first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    state = initial_state(cache, first, jnp.asarray([P]))
    records = [(np.asarray(logits[0]), None)]  # the prefill attends to the whole prompt
    generated = [int(first[0])]
    kept_after = []
    for k in range(1, max_new_tokens):
        state, out = step(params, state, GREEDY, NO_EOS)
        records.append((np.asarray(out.logits[0]), np.asarray(state.cache.positions[:, 0])))
        generated.append(int(out.tokens[0]))
        if eviction.evicts and k % eviction.divide_length == 0:
            cache, _ = compress(state.cache, ~state.done)
            state = state.replace(cache=cache)
            kept_after.append((P + k, np.asarray(cache.positions[:, 0])))
    return generated, records, np.asarray(state.cache.positions), kept_after


def masked_reference_logits(model, prompt, generated, records):
    """Teacher-forced logits of every forward, each query restricted to what it attended."""
    config = model.config
    sequence = np.asarray(prompt + generated[:-1])
    T, P = len(sequence), len(prompt)
    mask = np.tril(np.ones((T, T), bool))
    mask = np.broadcast_to(mask, (config.num_layers, 1, config.num_kv_heads, T, T)).copy()
    for k, (_, attended) in enumerate(records):
        if attended is None:
            continue
        query = P + k - 1
        mask[:, 0, :, query, :] = False
        for layer in range(config.num_layers):
            for head in range(config.num_kv_heads):
                seen = attended[layer, head]
                mask[layer, 0, head, query, seen[seen >= 0]] = True
    logits = forward(config, model.params(), jnp.asarray(sequence[None]),
                     kv_mask=jnp.asarray(mask))
    return np.asarray(logits[0, P - 1:])


# The fast suite keeps one case per kind of schedule (a global score, an accumulated score, a
# positional policy); the other score variants, whose
# selection is checked against a numpy restatement in test_eviction, run under `slow`.
_SLOW = pytest.mark.slow
CASES = [
    ("gkv", dict(budget=20, window=4, divide_length=6), 9),
    # A prompt longer than the budget (the prefill evicts): slow here; the fast suite has it
    # in tests/test_sharding.py and tests/training/test_log_probs.py (gkv-long-prompt).
    pytest.param("gkv", dict(budget=20, window=4, divide_length=6), 31, marks=_SLOW),
    pytest.param("gkv", dict(budget=20, window=4, divide_length=6, smooth="mean"), 9,
                 marks=_SLOW),
    ("h2o", dict(budget=16, divide_length=5), 9),
    pytest.param("snapkv", dict(budget=18, window=4, divide_length=6), 9, marks=_SLOW),
    pytest.param("rkv", dict(budget=18, window=4, divide_length=6), 31, marks=_SLOW),
    # Slow (the fast suite's cold time): streaming's schedule is exact in test_record.
    pytest.param("streaming", dict(budget=16, sink=4, divide_length=5), 9, marks=_SLOW),
]
_IDS = [f"{v[0]}-P{v[2]}-{v[1].get('smooth', '')}"
        for v in (getattr(c, "values", c) for c in CASES)]


@pytest.mark.parametrize("policy, knobs, prompt_length", CASES,
                         ids=_IDS)
def test_every_step_equals_masked_full_forward(policy, knobs, prompt_length):
    model = tiny_model()
    eviction = EvictionConfig(policy=policy, **knobs)
    prompt = np.random.default_rng(prompt_length).integers(0, SPEC.vocab, prompt_length).tolist()
    max_new_tokens = 40
    generated, records, final_positions, kept_after = run_stepwise(
        model, eviction, prompt, max_new_tokens)
    reference = masked_reference_logits(model, prompt, generated, records)
    for k, (logits, _) in enumerate(records):
        np.testing.assert_allclose(logits, reference[k], atol=1e-4, rtol=0,
                                   err_msg=f"forward {k}")
    assert len(kept_after) == (max_new_tokens - 1) // eviction.divide_length

    # Kept positions: sorted, unique, in range, the last W tokens always kept; streaming keeps
    # exactly the sinks and the recent tail.
    W = eviction.window
    for fed, positions in kept_after:
        for row in positions.reshape(-1, positions.shape[-1]):
            kept = row[row >= 0]
            assert len(kept) == min(eviction.budget, fed)
            assert (np.diff(kept) > 0).all() and kept.min() >= 0 and kept.max() < fed
            assert set(range(fed - W, fed)) <= set(kept.tolist())
            if policy == "streaming" and fed > eviction.budget:
                assert kept.tolist() == list(range(eviction.sink)) + list(range(fed - W, fed))
            if fed <= eviction.budget:
                assert kept.tolist() == list(range(fed))

    # generate() runs the same schedule in one compiled program.
    out = generate(model, [prompt], eviction=eviction, max_new_tokens=max_new_tokens,
                   return_kept_positions=True)
    assert out.tokens[0] == generated
    np.testing.assert_array_equal(_sets(out.kept_positions[:, 0]), _sets(final_positions[:, 0]))


def _sets(positions):
    """[L, K, C] slots -> sorted valid positions per (layer, head), padded with -1."""
    out = np.full_like(positions, -1)
    for index in np.ndindex(positions.shape[:-1]):
        kept = np.sort(positions[index][positions[index] >= 0])
        out[index][:len(kept)] = kept
    return out


def test_eviction_keeps_high_attention_tokens_not_just_the_tail():
    """A sanity check that score-based eviction is not streaming in disguise."""
    model = tiny_model()
    eviction = EvictionConfig(policy="gkv", budget=20, window=4, divide_length=6)
    prompt = np.random.default_rng(0).integers(0, SPEC.vocab, 30).tolist()
    _, _, _, kept_after = run_stepwise(model, eviction, prompt, 20)
    fed, positions = kept_after[-1]
    kept = positions[positions >= 0].reshape(-1)
    assert (kept < fed - eviction.budget).any()
    per_head = {tuple(row[row >= 0]) for row in positions.reshape(-1, positions.shape[-1])}
    assert len(per_head) > 1, "each KV head chooses its own tokens"
