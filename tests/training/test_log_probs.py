"""Teacher-forced log-probs under the recorded masks equal generate()'s, for every policy,
three samplers and both attention implementations; the replay equals the record; the
reference implementation's two defects (masks one compression late, every layer under the
last layer's mask) are caught; on the bundled model at budgets 24, 68 and 136."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest

import gkv_jax
from gkv_jax import training
from gkv_jax.datasets import load_dataset
from gkv_jax.evaluation import format_prompt
from gkv_jax.eviction import EvictionConfig
from gkv_jax.eviction_record import NEVER
from gkv_jax.generation import generate
from gkv_jax.loading import bundled_model_dir
from gkv_jax.sampling import SamplingParams
from tests.training.stepwise import forced_decode
from tests.training.test_record import CASE_PARAMS, CASES, MAX_NEW, recorded, tiny_model

SAMPLERS = {"greedy": dict(), "t0.8": dict(temperature=0.8),
            "top-p0.9-top-k5": dict(temperature=0.8, top_p=0.9, top_k=5)}
TOLERANCE = 1e-4


def generated_log_probs(out) -> np.ndarray:
    """out.logprobs as a [B, M] array, 0 past each row's end."""
    width = max(len(row) for row in out.logprobs)
    padded = np.zeros((len(out.logprobs), width), np.float32)
    for b, row in enumerate(out.logprobs):
        padded[b, :len(row)] = row
    return padded


def sampler(knobs):
    return SamplingParams.create(knobs.get("temperature", 0.0), knobs.get("top_p", 1.0),
                                 knobs.get("top_k", 0))


# h2o's and streaming's records are checked in the fast suite by test_record; their
# log-probs run under `slow`.
LOG_PROB_PARAMS = [pytest.param(*p.values, marks=pytest.mark.slow)
                   if p.values[0] in ("h2o", "streaming") else p for p in CASE_PARAMS]


@pytest.mark.parametrize("name", LOG_PROB_PARAMS)
def test_log_probs_under_the_record_equal_generate_and_replay_equals_record(name):
    model = tiny_model()
    for label, knobs in SAMPLERS.items():
        out = recorded(name, **knobs)
        batch = training.batch_from_generation(out)
        expected = generated_log_probs(out)
        for impl in ("dense", "segments"):
            got = np.asarray(training.token_log_probs(model, batch, sampling=sampler(knobs),
                                                      attention_impl=impl))
            np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0,
                                       err_msg=f"{label} {impl}")
        if label == "greedy":  # the plain softmax is temperature 1 without a sampler
            np.testing.assert_allclose(np.asarray(training.token_log_probs(model, batch)),
                                       expected, atol=TOLERANCE, rtol=0)
    replayed = training.replay_evictions(model, batch.eviction, batch)
    np.testing.assert_array_equal(np.asarray(replayed), np.asarray(batch.visible_until))


def test_full_cache_log_probs_equal_generate():
    model = tiny_model()
    out = generate(model, [[3, 1, 4, 1, 5], [9, 2, 6]], max_new_tokens=20, eos_token_id=[],
                   temperature=0.8, seed=1, return_logprobs=True, return_eviction_record=True)
    batch = training.batch_from_generation(out)
    assert batch.segment_layout is None and int(batch.visible_until.min()) == 0
    got = training.token_log_probs(model, batch, sampling=dict(temperature=0.8))
    np.testing.assert_allclose(np.asarray(got), generated_log_probs(out), atol=TOLERANCE,
                               rtol=0)
    unmasked = training.batch_from_completions(out.prompt_ids, out.tokens)
    assert unmasked.visible_until is None and unmasked.width == batch.width
    np.testing.assert_allclose(np.asarray(training.token_log_probs(model, unmasked,
                                                                   temperature=0.8)),
                               generated_log_probs(out), atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("policy", ["gkv", pytest.param("h2o", marks=pytest.mark.slow)])
def test_replay_of_forced_completions_equals_a_forced_decode(policy):
    """Traces that were never generated (random completions, ragged): the replay equals the
    record of feeding them token by token through the decode pieces."""
    name = "gkv-long-prompt" if policy == "gkv" else policy
    _, knobs, lengths = CASES[name]
    rng = np.random.default_rng(11)
    prompts = [rng.integers(0, 97, n).tolist() for n in lengths]
    completions = [rng.integers(0, 97, n).tolist() for n in (MAX_NEW, 17, 23)]
    eviction = EvictionConfig(policy=policy, **knobs)
    batch = training.batch_from_completions(prompts, completions)
    replayed = np.asarray(training.replay_evictions(tiny_model(), eviction, batch))
    derived, _, _ = forced_decode(tiny_model(), eviction, prompts, completions, batch.width)
    by_slot = training.batch.slot_visible_until(derived, np.asarray(batch.positions))
    np.testing.assert_array_equal(replayed, by_slot)
    assert (derived != NEVER).any()
    # And the forward under the replayed masks is what the forced decode computed.
    forced = training.token_log_probs(tiny_model(), batch.with_visible_until(replayed,
                                                                             eviction))
    assert np.isfinite(np.asarray(forced)).all()


# ------------------------------------------------------------------------ bundled model
@functools.cache
def bundled():
    return gkv_jax.load(bundled_model_dir(), dtype="float32")


@functools.cache
def bundled_generation(budget):
    model, tokenizer = bundled()
    prompts = [format_prompt(p, tokenizer) for p in load_dataset("synthetic", num_problems=2)]
    eviction = EvictionConfig(policy="gkv", budget=budget, window=16, divide_length=16)
    return generate(model, prompts, tokenizer=tokenizer, eviction=eviction,
                    max_new_tokens=520, return_logprobs=True, return_eviction_record=True)


def one_compression_late(visible_until, divide_length):
    """Defect D1: each key stays visible for one more segment than it really was."""
    shifted = visible_until + divide_length
    return jnp.where((visible_until > 0) & (visible_until != NEVER), shifted, visible_until)


# All budgets under `slow` (the fast suite's cold time): the exact-mask invariant stays fast
# on the tiny model (test_log_probs_under_the_record_equal_generate_and_replay_equals_record).
@pytest.mark.parametrize("budget", [pytest.param(24, marks=pytest.mark.slow),
                                    pytest.param(68, marks=pytest.mark.slow),
                                    pytest.param(136, marks=pytest.mark.slow)])
def test_bundled_model_exact_masks_and_the_reference_defects(budget):
    model, _ = bundled()
    out = bundled_generation(budget)
    batch = training.batch_from_generation(out)
    expected = generated_log_probs(out)
    for impl in ("dense", "segments"):
        got = np.asarray(training.token_log_probs(model, batch, attention_impl=impl))
        np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0, err_msg=impl)
    np.testing.assert_array_equal(
        np.asarray(training.replay_evictions(model, batch.eviction, batch)),
        np.asarray(batch.visible_until))

    # Some key is evicted exactly at an event start: the row before sees it, that row not.
    record = out.eviction_record
    event = next(e for e in range(1, record.num_events(0))
                 if record.event_position(0, e) < record.fed(0)
                 and (record.visible_until[:, 0] == record.event_position(0, e)).any())
    start = record.event_position(0, event)
    l, h, key = (int(i[0]) for i in np.nonzero(record.visible_until[:, 0] == start))
    assert key in record.attended(l, 0, h, start - 1)
    assert key not in record.attended(l, 0, h, start)

    # The reference's defects make large errors: D1 (masks one compression late) and D2
    # (every layer under the last layer's mask).
    vu = batch.visible_until
    late = batch.replace(visible_until=one_compression_late(vu, batch.eviction.divide_length))
    last_layer = batch.replace(visible_until=jnp.broadcast_to(vu[-1:], vu.shape))
    for defect, wrong in (("D1", late), ("D2", last_layer)):
        error = np.abs(np.asarray(training.token_log_probs(model, wrong, attention_impl="dense"))
                       - expected).max()
        assert error > 1.0, f"{defect} should be caught, max error {error}"
