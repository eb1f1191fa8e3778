"""The eviction record of `generate`: equal to the one derived step by step from the public
decode pieces (what every forward attended to), for every policy, ragged batches with an EOS
mid-way and prompts longer than the budget; consistent with the final cache; the helpers;
compiled once."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from gkv_jax import conversion
from gkv_jax.eviction import EvictionConfig
from gkv_jax.eviction_record import NEVER, EvictionRecord
from gkv_jax.generation import compiled_programs, generate
from tests.helpers import SPEC_BY_NAME, tiny_hf_model
from tests.training.stepwise import forced_decode

SPEC = SPEC_BY_NAME["qwen2-h32-g2-untied"]
MAX_NEW = 26

# (policy, knobs, prompt lengths): the 31-token prompt is longer than the budget.
CASES = {
    "gkv": ("gkv", dict(budget=20, window=4, divide_length=6), (9, 3, 14)),
    "gkv-long-prompt": ("gkv", dict(budget=20, window=4, divide_length=6), (31, 9, 4)),
    "gkv-mean": ("gkv", dict(budget=20, window=4, divide_length=6, smooth="mean"), (9, 3, 14)),
    "h2o": ("h2o", dict(budget=16, divide_length=5), (9, 3, 14)),
    "snapkv": ("snapkv", dict(budget=18, window=4, divide_length=6), (9, 3, 14)),
    "rkv": ("rkv", dict(budget=18, window=4, divide_length=6), (31, 9, 4)),
    "streaming": ("streaming", dict(budget=16, sink=4, divide_length=5), (9, 3, 14)),
}


@functools.cache
def tiny_model():
    return conversion.from_hf(tiny_hf_model(SPEC))


def case_prompts(name):
    lengths = CASES[name][2]
    rng = np.random.default_rng(sum(lengths))
    return [rng.integers(0, SPEC.vocab, n).tolist() for n in lengths]


def _generate(name, eos, temperature=0.0, top_p=1.0, top_k=0):
    policy, knobs, _ = CASES[name]
    return generate(tiny_model(), case_prompts(name),
                    eviction=EvictionConfig(policy=policy, **knobs), max_new_tokens=MAX_NEW,
                    eos_token_id=[eos], temperature=temperature, top_p=top_p, top_k=top_k,
                    seed=5, return_logprobs=True, return_kept_positions=True,
                    return_eviction_record=True)


@functools.cache
def eos_for(name):
    """An EOS id that makes the greedy batch ragged: the middle row stops mid-way, the first
    runs to the end (tried in id order; every try reuses one compiled program)."""
    for eos in range(SPEC.vocab):
        lengths = [len(t) for t in _generate(name, eos).tokens]
        if lengths[0] == MAX_NEW and 8 <= lengths[1] < 20:
            return eos
    raise AssertionError("no EOS id ends only the middle sequence")


@functools.cache
def recorded(name, temperature=0.0, top_p=1.0, top_k=0):
    """generate() with the record, the log-probs and the final cache (ragged by EOS)."""
    return _generate(name, eos_for(name), temperature, top_p, top_k)


# Each case compiles a generation and a stepwise decode: three distinct code paths run in
# the fast suite (a prompt longer than the budget, h2o's window of 1, streaming's unscored
# selection), the rest under `slow`.
FAST = ("gkv-long-prompt", "h2o")  # the others under `slow` (the fast suite's cold time)
CASE_PARAMS = [pytest.param(name, marks=() if name in FAST else pytest.mark.slow)
               for name in CASES]


@pytest.mark.parametrize("name", CASE_PARAMS)
def test_record_equals_the_record_derived_step_by_step(name):
    out = recorded(name)
    record = out.eviction_record
    lengths = [len(t) for t in out.tokens]
    assert min(lengths) < MAX_NEW == max(lengths), "the batch must be ragged"
    L, K = SPEC.layers, SPEC.kv_heads
    P_max = max(len(p) for p in out.prompt_ids)
    assert record.visible_until.shape == (L, 3, K, P_max + MAX_NEW)
    assert record.visible_until.dtype == np.int32
    assert record.lengths.tolist() == lengths
    assert record.prompt_lengths.tolist() == [len(p) for p in out.prompt_ids]

    derived, looped, final_positions = forced_decode(
        tiny_model(), record.eviction, out.prompt_ids, out.tokens,
        out.stats["prompt_bucket"])
    np.testing.assert_array_equal(record.visible_until, derived)
    np.testing.assert_array_equal(record.visible_until, looped)
    np.testing.assert_array_equal(out.kept_positions, final_positions)

    # Evictions happened, and only at event starts P + e * D, e < the row's event count.
    assert (record.visible_until[:, 0] != NEVER).any(), "no eviction: the case tests nothing"
    for b in range(3):
        until = record.visible_until[:, b]
        expired = np.unique(until[until != NEVER])
        events = {record.event_position(b, e) for e in range(record.num_events(b))}
        assert set(expired.tolist()) <= events, (b, expired)


@pytest.mark.parametrize("name", ["gkv-long-prompt", "h2o"])
def test_record_matches_the_final_cache_and_its_helpers(name):
    out = recorded(name)
    record = out.eviction_record
    for (l, b, h) in np.ndindex(SPEC.layers, 3, SPEC.kv_heads):
        kept = out.kept_positions[l, b, h]
        np.testing.assert_array_equal(record.final_kept(l, b, h), np.sort(kept[kept >= 0]))
        fed = record.fed(b)
        # The NEVER positions below the sequence's end are exactly the final cache.
        never = np.flatnonzero(record.visible_until[l, b, h, :fed] == NEVER)
        np.testing.assert_array_equal(never, np.sort(kept[kept >= 0]))
        for e in range(record.num_events(b)):
            start = record.event_position(b, e)
            kept_e = record.kept_after(e, l, b, h)
            assert len(kept_e) <= record.eviction.budget
            if start < fed:  # the next query sees exactly the kept set and itself
                np.testing.assert_array_equal(record.attended(l, b, h, start),
                                              np.append(kept_e, start))
    with pytest.raises(ValueError, match="query must be a fed position"):
        record.attended(0, 0, 0, record.fed(0))
    with pytest.raises(ValueError, match="event must be in"):
        record.kept_after(record.num_events(0), 0, 0, 0)


def test_prefill_compression_is_event_zero():
    out = recorded("gkv-long-prompt")
    record = out.eviction_record
    P = int(record.prompt_lengths[0])
    assert P > record.eviction.budget
    until = record.visible_until[:, 0, :, :P]
    assert (until == P).any(), "the prefill compression evicts prompt keys at position P"
    assert record.kept_after(0, 0, 0, 0).size == record.eviction.budget


def test_full_policy_record_is_never_and_the_flag_compiles_once():
    model = tiny_model()
    prompts = case_prompts("gkv")
    out = generate(model, prompts, max_new_tokens=12, eos_token_id=[],
                   return_eviction_record=True)
    record = out.eviction_record
    assert isinstance(record, EvictionRecord) and record.eviction.policy == "full"
    assert (record.visible_until == NEVER).all() and record.num_events(0) == 0
    assert record.attended(0, 0, 0, 5).tolist() == list(range(6))

    first = _generate("h2o", eos_for("h2o"))  # compiles here if no earlier test did
    name_policy, knobs, _ = CASES["h2o"]
    before = compiled_programs()
    again = generate(model, [p[::-1] for p in case_prompts("h2o")],
                     eviction=EvictionConfig(policy=name_policy, **knobs),
                     max_new_tokens=MAX_NEW, eos_token_id=[eos_for("h2o")], seed=9,
                     temperature=0.5, return_eviction_record=True)
    assert compiled_programs() == before, "same shapes and flag: nothing new to compile"
    assert again.stats["compile_seconds"] == 0.0
    assert again.eviction_record.visible_until.shape == first.eviction_record.visible_until.shape


def test_peak_tokens_says_exactly_which_sequences_evict():
    """`EvictionConfig.peak_tokens(P, M) > budget` iff generate's record shows an eviction,
    for prompts on both sides of the boundary (the check post-training uses to refuse a budget
    under which nothing is ever evicted)."""
    eviction = EvictionConfig("gkv", budget=20, window=4, divide_length=6)
    max_new = 9  # compressions after the prefill and after decode forward 6: P and P + 6
    lengths = (13, 14, 15, 20, 21)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, SPEC.vocab, n).tolist() for n in lengths]
    out = generate(tiny_model(), prompts, eviction=eviction, max_new_tokens=max_new,
                   eos_token_id=[], return_eviction_record=True)
    evicted = (np.asarray(out.eviction_record.visible_until) != NEVER).any(axis=(0, 2, 3))
    predicted = [eviction.peak_tokens(n, max_new) > eviction.budget for n in lengths]
    assert predicted == [False, False, True, True, True]
    assert evicted.tolist() == predicted
    assert eviction.peak_tokens(14, 6) == 14 and eviction.peak_tokens(14, 7) == 20
