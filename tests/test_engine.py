"""The slot engine: every request's tokens, log-probs and eviction record equal `generate`
alone with its seed, whatever the arrival order, its neighbours or its slot; requests coming
and going never recompile; cancellation and bad requests harm no other request."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from gkv_jax import conversion
from gkv_jax import engine as engine_lib
from gkv_jax.engine import Engine
from gkv_jax.eviction import POLICIES, EvictionConfig, get_policy
from gkv_jax.generation import generate
from gkv_jax.sharding import make_mesh, shard_model
from tests.test_generate import SPEC, tiny

RNG = np.random.default_rng(23)
# Ragged prompts of one bucket (16); 15 and 13 exceed budget 12: compressed at the prefill.
PROMPTS = [RNG.integers(1, SPEC.vocab, n).tolist() for n in (5, 15, 9, 13, 3)]
MAX_NEW = (20, 33, 33, 20, 33)  # mixed per-request limits
SAMPLED = (False, True, False, True, True)
# Per-request samplers (no nucleus: a top_p cut-off turns float noise between two programs
# into a visible change of the reported log-prob of a token whose neighbour sits on it).
TOP_K = (0, 0, 0, 12, 0)
DIVIDE = 6


def knobs(policy: str) -> dict:
    if not get_policy(policy).evicts:
        return dict(divide_length=DIVIDE)
    default_window = get_policy(policy).knobs.get("window")
    extra = {"window": 4} if default_window is not None and default_window >= 12 else {}
    return dict(budget=12, divide_length=DIVIDE, **extra)


@functools.cache
def alone(policy: str, b: int, eos: tuple[int, ...] = ()):
    """`generate` of prompt b alone, with request b's seed, sampler and limit."""
    _, model = tiny()
    return generate(model, [PROMPTS[b]], eviction=EvictionConfig(policy, **knobs(policy)),
                    max_new_tokens=MAX_NEW[b], eos_token_id=list(eos), seed=100 + b,
                    temperature=0.8 if SAMPLED[b] else 0.0, top_k=TOP_K[b],
                    return_logprobs=True, return_eviction_record=True)


def submit(engine, b: int, eos: tuple[int, ...] = ()) -> int:
    return engine.submit(PROMPTS[b], max_new_tokens=MAX_NEW[b], seed=100 + b,
                         temperature=0.8 if SAMPLED[b] else 0.0, top_k=TOP_K[b],
                         eos_token_id=list(eos))


def assert_equals_alone(output, reference) -> None:
    assert output.tokens == reference.tokens[0]
    np.testing.assert_allclose(output.logprobs, reference.logprobs[0], atol=1e-5)
    np.testing.assert_array_equal(output.eviction_record.visible_until,
                                  reference.eviction_record.visible_until)
    np.testing.assert_array_equal(output.eviction_record.lengths,
                                  reference.eviction_record.lengths)


def check_policy(policy: str) -> None:
    """Five requests through two slots, in a random order: three first, two more after a few
    events (while others run); request 2 has an EOS that comes mid-cycle."""
    _, model = tiny()
    eviction = EvictionConfig(policy, **knobs(policy))
    eos = (alone(policy, 2).tokens[0][8],)  # forward 8 is mid-cycle (divide_length 6)
    engine = Engine(model, eviction=eviction, slots=2, max_new_tokens=max(MAX_NEW),
                    max_prompt_length=32, eos_token_id=[], record=True)
    order = np.random.default_rng(sum(map(ord, policy))).permutation(len(PROMPTS)).tolist()
    ids = {b: submit(engine, b, eos if b == 2 else ()) for b in order[:3]}
    stream = engine.stream()
    streamed = {}
    for _, event in zip(range(4), stream, strict=False):
        streamed.setdefault(event.request_id, []).extend(event.tokens)
    ids.update({b: submit(engine, b, eos if b == 2 else ()) for b in order[3:]})
    for event in stream:
        streamed.setdefault(event.request_id, []).extend(event.tokens)
    outputs = {b: engine._requests[request_id].output for b, request_id in ids.items()}
    for b, output in outputs.items():
        assert streamed[ids[b]] == output.tokens  # the stream is the output, in order
        assert_equals_alone(output, alone(policy, b, eos if b == 2 else ()))
    assert outputs[2].finish_reason == "eos" and len(outputs[2].tokens) < 33
    assert outputs[0].finish_reason == "length"
    stats = engine.stats
    assert stats["finished"] == 5 and stats["prefills"] == 5
    assert stats["useful_tokens"] == sum(len(o.tokens) for o in outputs.values())
    assert 0 < stats["occupancy"] <= 1


def test_every_request_equals_generate_alone():
    check_policy("gkv")


# Slow: every other registered policy and the full cache (gkv above is the fast sibling).
@pytest.mark.slow
@pytest.mark.parametrize("policy", [p for p in POLICIES if p != "gkv"])
def test_every_policy_equals_generate_alone(policy):
    check_policy(policy)


@pytest.mark.slow
def test_slots_over_a_mesh_give_the_one_device_tokens():
    model = conversion.from_hf(tiny()[0])  # its own copy: moved onto the mesh
    eviction = EvictionConfig("gkv", **knobs("gkv"))
    one = Engine(tiny()[1], eviction=eviction, slots=4, max_new_tokens=33,
                 max_prompt_length=32, eos_token_id=[], record=True)
    mesh = make_mesh(data=2, model=4)
    shard_model(model, mesh)
    sharded = Engine(model, eviction=eviction, slots=4, max_new_tokens=33,
                     max_prompt_length=32, eos_token_id=[], record=True, mesh=mesh)
    for engine in (one, sharded):
        for b in range(len(PROMPTS)):
            submit(engine, b)
    a, b = one.run(), sharded.run()
    assert sharded.stats["cache_bytes"] == one.stats["cache_bytes"]
    for (_, x), (_, y) in zip(sorted(a.items()), sorted(b.items()), strict=True):
        assert x.tokens == y.tokens
        np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-4)
        np.testing.assert_array_equal(x.eviction_record.visible_until,
                                      y.eviction_record.visible_until)


# Slow (the fast suite's cold time; CI runs it with the slow sweeps).
@pytest.mark.slow
def test_requests_coming_and_going_never_recompile():
    _, model = tiny()
    eviction = EvictionConfig("gkv", **knobs("gkv"))
    engine = Engine(model, eviction=eviction, slots=2, max_new_tokens=33,
                    max_prompt_length=32, eos_token_id=[], prefill_batch=2)
    for wave in ((0,), (0, 2), (1, 30)):  # buckets 16 and 32, groups of 1 and 2
        for b in wave:
            if b == 30:  # a 30-token prompt: bucket 32
                engine.submit(list(range(1, 31)), max_new_tokens=20)
            else:
                submit(engine, b)
        engine.run()
    programs = engine_lib.compiled_programs()
    # One prefill per (bucket, group size): (16, 1), (16, 2), (32, 1); one insert, one cycle.
    assert engine.stats["compiled_programs"] == 5
    for wave in ((2, 3, 4), (1,), (4, 0, 2, 3), (3, 1, 0)):  # other arrivals, mixes, limits
        for b in wave:
            submit(engine, b)
        engine.run()
    assert engine_lib.compiled_programs() == programs
    assert engine.stats["compiled_programs"] == 5 and engine.stats["finished"] == 16


def test_samples_share_one_prefill_and_cancel_frees_the_slot():
    _, model = tiny()
    eviction = EvictionConfig("gkv", **knobs("gkv"))
    engine = Engine(model, eviction=eviction, slots=2, max_new_tokens=33,
                    max_prompt_length=32, eos_token_id=[], record=True)
    group = engine.submit_group(PROMPTS[1], [101, 7, 8], max_new_tokens=33, temperature=0.8)
    doomed = submit(engine, 3)  # waiting: cancelled before it starts
    running = submit(engine, 4)
    assert engine.cancel(doomed) and not engine.cancel(doomed)
    stream = engine.stream()
    for event in stream:  # cancel the first sample once it is running
        if event.request_id == group[1] and event.tokens:
            assert engine.cancel(group[1])
            break
    outputs = {event.request_id: event.output for event in stream if event.finished}
    outputs[doomed] = engine._requests[doomed].output
    assert outputs[doomed].finish_reason == "cancelled" and outputs[doomed].tokens == []
    assert engine._requests[group[1]].output.finish_reason == "cancelled"
    # The others are untouched: the group's first sample is request 1 alone (seed 101).
    assert_equals_alone(outputs[group[0]], alone("gkv", 1))
    assert_equals_alone(outputs[running], alone("gkv", 4))
    assert engine.stats["prefills"] == 2  # the group's prompt once, request 4's once


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt=[1, SPEC.vocab]), r"prompt has token ids outside \[0, 97\)"),
    (dict(prompt=[1.5, 2]), "prompt must hold integer token ids"),
    (dict(prompt="text"), "prompt is a string: give the Engine a tokenizer"),
    (dict(prompt=list(range(1, 40))), "at most max_prompt_length=32"),
    (dict(max_new_tokens=34), r"max_new_tokens must be an integer in \[1, 33\]"),
    (dict(temperature=-1.0), "temperature must be"),
    (dict(seed=2**32), r"seed\[0\] must be an integer in \[0, 2\*\*32\)"),
    (dict(eos_token_id=list(range(9))), "eos_token_id: at most 8 ids"),
])
def test_a_bad_request_is_refused_at_submit_and_harms_no_other(kwargs, message):
    _, model = tiny()
    engine = Engine(model, eviction=EvictionConfig("gkv", **knobs("gkv")), slots=2,
                    max_new_tokens=33, max_prompt_length=32, eos_token_id=[], record=True)
    good = submit(engine, 0)
    with pytest.raises(ValueError, match=message):
        engine.submit(**{"prompt": PROMPTS[0], **kwargs})
    outputs = engine.run()
    assert list(outputs) == [good]
    assert_equals_alone(outputs[good], alone("gkv", 0))


@pytest.mark.parametrize("kwargs, message", [
    (dict(slots=0), r"slots must be an integer >= 1"),
    (dict(max_new_tokens=512), r"max_new_tokens must be an integer in \[1, 511\]"),
    (dict(max_prompt_length=500), r"max_prompt_length must be an integer in \[1, 479\]"),
    (dict(eviction="gkv"), "eviction must be an EvictionConfig"),
])
def test_engine_arguments_are_checked(kwargs, message):
    _, model = tiny()
    with pytest.raises((ValueError, TypeError), match=message):
        Engine(model, **{"max_new_tokens": 33, **kwargs})
