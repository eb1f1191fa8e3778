"""Post-training losses and loops on a tiny model: distillation and GRPO against direct
computations, a few steps that lower the loss and compile once, an exact resume, the
log-prob guard, and bad input."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gkv_jax import training
from gkv_jax.eviction import EvictionConfig
from gkv_jax.generation import generate
from gkv_jax.models import forward, forward_visible, lm_logits
from gkv_jax.sampling import SamplingParams
from gkv_jax.training import grpo_loop, loop_common
from tests.training.test_record import SPEC, recorded, tiny_model

GKV = EvictionConfig(policy="gkv", budget=12, window=4, divide_length=4)


def _softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def test_distill_loss_equals_a_numpy_kl_and_vanishes_for_the_teacher():
    model = tiny_model()
    batch = training.batch_from_generation(recorded("gkv-long-prompt"))
    teacher = model
    # A different student: the teacher's weights, perturbed.
    noisy = jax.tree.map(lambda w: w * 1.05, model.params())
    student = loop_common._with_params(model, noisy)
    T = 0.6
    hidden, _ = forward_visible(model.config, noisy, batch.tokens, batch.positions,
                                batch.visible_until)
    z_s = np.asarray(lm_logits(model.config, noisy, hidden), np.float64)
    z_t = np.asarray(forward(model.config, model.params(), batch.tokens, batch.positions),
                     np.float64)
    rows = slice(batch.width - 1, batch.width - 1 + batch.targets.shape[1])
    p_t, p_s = _softmax(z_t[:, rows] / T), _softmax(z_s[:, rows] / T)
    kl = (p_t * (np.log(p_t) - np.log(p_s))).sum(-1) * T * T
    mask = np.asarray(batch.loss_mask)
    expected_sum = (kl * mask).sum() / mask.shape[0]
    expected_mean = (kl * mask).sum() / mask.sum()
    got = training.distill_loss(student, teacher, batch, temperature=T)
    np.testing.assert_allclose(float(got), expected_sum, rtol=1e-4)
    got_mean = training.distill_loss(student, teacher, batch, T, reduction="token_mean",
                                     attention_impl="dense")
    np.testing.assert_allclose(float(got_mean), expected_mean, rtol=1e-4)
    # Student == teacher with a budget covering the sequence: nothing is evicted, KL = 0.
    wide = dataclasses.replace(GKV, budget=256)
    unevicted = batch.with_visible_until(training.replay_evictions(model, wide, batch), wide)
    assert abs(float(training.distill_loss(model, teacher, unevicted))) < 1e-5
    assert float(got) > 1e-3


def test_group_advantages_on_hand_made_groups():
    np.testing.assert_array_equal(training.group_advantages([[1, 1, 1], [0, 0, 0]]), 0.0)
    rewards = np.array([[1.0, 0.0, 0.0, 0.0]])
    expected = (rewards - 0.25) / (np.std(rewards, ddof=1) + 1e-8)
    np.testing.assert_allclose(training.group_advantages(rewards), expected, rtol=1e-6)
    truncated = np.array([[False, True, False, False]])
    clipped = training.group_advantages(rewards, truncated)
    assert clipped[0, 1] == 0.0 and clipped[0, 2] < 0 and clipped[0, 0] > 0
    with pytest.raises(ValueError, match="G >= 2"):
        training.group_advantages([[1.0], [0.0]])
    with pytest.raises(ValueError, match="truncated must have the shape"):
        training.group_advantages(rewards, [[True]])


def test_grpo_gradient_equals_the_direct_reinforce_gradient_and_the_guard_holds():
    model = tiny_model()
    out = recorded("h2o", temperature=0.8, top_p=0.9, top_k=5)
    batch = training.batch_from_generation(out)
    advantages = jnp.asarray([1.0, -0.5, 0.25])
    sampling = SamplingParams.create(0.8, 0.9, 5)
    loss, aux = training.grpo_loss(model, batch, advantages, 0.8, sampling=sampling,
                                   attention_impl="dense")
    assert float(aux["guard"]) < 1e-4

    def mean_log_prob(params, row):
        lp = training.token_log_probs_from_params(model.config, params, batch, 0.8,
                                                  attention_impl="dense")
        mask = batch.loss_mask[row]
        return jnp.sum(jnp.where(mask, lp[row], 0.0)) / jnp.sum(mask)

    params = model.params()
    direct = None
    for row in range(3):
        grad = jax.grad(mean_log_prob)(params, row)
        term = jax.tree.map(lambda g, a=advantages[row]: -a * g / 3, grad)
        direct = term if direct is None else jax.tree.map(jnp.add, direct, term)
    values = [float(mean_log_prob(params, r)) for r in range(3)]
    np.testing.assert_allclose(float(loss), -np.mean(np.asarray(advantages) * values),
                               rtol=1e-5)
    grads = jax.grad(lambda p: training.grpo_loss_from_params(
        model.config, p, batch, advantages, 0.8, None, "dense")[0])(params)
    for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direct), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(d), atol=1e-6, rtol=1e-4)


@functools.cache
def distill_data():
    rng = np.random.default_rng(3)
    return [(rng.integers(0, SPEC.vocab, n).tolist(), rng.integers(0, SPEC.vocab, m).tolist())
            for n, m in ((9, 30), (14, 26), (5, 33), (20, 28))]


def distill_config(**changes):
    base = dict(eviction=GKV, steps=6, batch_size=2, learning_rate=3e-3, seed=1,
                checkpoint_every=2, warmup_ratio=0.0, schedule="constant")
    return training.DistillConfig(**{**base, **changes})


# Slow (the fast suite's cold time; CI runs it with the slow sweeps): the KL test above
# keeps the distillation step in the fast suite, tests/training/test_inputs.py the run
# directory.
@pytest.mark.slow
def test_distill_lowers_the_loss_compiles_once_and_resumes_exactly(tmp_path):
    teacher = tiny_model()
    student = loop_common._with_params(teacher,
                                       jax.tree.map(lambda w: w * 1.1, teacher.params()))
    data = distill_data()[:1] * 4  # every batch the same: the loss must fall
    before = training.distill_step._cache_size()
    trained, history = training.distill(student, teacher, data, distill_config(),
                                        run_dir=str(tmp_path / "a"), progress=False)
    losses = [e["loss"] for e in history if "loss" in e]
    assert len(losses) == 6 and losses[-1] < 0.7 * losses[0], losses
    assert training.distill_step._cache_size() == before + 1, "one compiled step for the run"

    # Interrupted after step 3 (checkpoint at 2), then resumed: same final parameters.
    class Interrupt(Exception):
        pass

    def interrupt(model, step):
        raise Interrupt

    config = distill_config(eval_every=3)
    with pytest.raises(Interrupt):
        training.distill(student, teacher, data, config, run_dir=str(tmp_path / "b"),
                         eval_fn=interrupt, progress=False)
    resumed, resumed_history = training.distill(student, teacher, data, config,
                                                run_dir=str(tmp_path / "b"), progress=False)
    for a, b in zip(jax.tree.leaves(trained.params()), jax.tree.leaves(resumed.params()),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [e["step"] for e in resumed_history] == list(range(1, 7))
    # The same run_dir with other settings is refused.
    with pytest.raises(training.RunDirError, match="holds a different run"):
        training.distill(student, teacher, data, distill_config(learning_rate=1e-3),
                         run_dir=str(tmp_path / "b"), progress=False)


@pytest.mark.slow
def test_distill_options_budgets_full_rows_and_on_policy(tmp_path):
    teacher = tiny_model()
    config = distill_config(steps=2, batch_size=4, budgets=(12, 16), full_attention_share=0.25,
                            on_policy=True, max_new_tokens=24, checkpoint_every=0)
    _, history = training.distill(teacher, teacher, distill_data(), config,
                                  run_dir=str(tmp_path), progress=False)
    assert {e["budget"] for e in history} <= {12, 16}
    # On-policy with student == teacher and nothing to fix: the KL is only the masks' effect.
    assert all(np.isfinite(e["loss"]) for e in history)


# Slow: the GRPO gradient test keeps the guard in the fast suite.
@pytest.mark.slow
def test_grpo_steps_keep_the_guard_and_compile_once(tmp_path):
    model = tiny_model()
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, SPEC.vocab, n).tolist() for n in (6, 9)]
    answers = [7, 11]

    def grade(ids, answer):
        return answer in ids

    config = training.GRPOConfig(eviction=GKV, steps=3, prompts_per_step=2, group_size=3,
                                 max_new_tokens=20, learning_rate=1e-3, warmup_ratio=0.0,
                                 checkpoint_every=0)
    before = training.grpo_step._cache_size()
    _, history = training.grpo(model, prompts, answers, grade, config, run_dir=str(tmp_path),
                               progress=False)
    assert len(history) == 3
    assert all(e["guard"] < 1e-4 for e in history), [e["guard"] for e in history]
    assert all(e["prefills"] == 2 for e in history)  # prompts, not prompts x group size
    assert training.grpo_step._cache_size() == before + 1


def test_grpo_rollouts_prefill_each_prompt_once_and_equal_generate():
    """The engine's rollouts of a GRPO step: one prefill per prompt (not per rollout), and
    the rollouts `generate` gives the repeated prompts with the step's seed (tokens,
    log-probs and records, which the update trains under)."""
    from gkv_jax.engine import Engine

    model = tiny_model()
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, SPEC.vocab, n).tolist() for n in (6, 9)]
    # top_p 1: a nucleus cut-off amplifies float noise between two programs into the
    # reported log-prob of a token whose neighbour sits on the boundary.
    config = training.GRPOConfig(eviction=GKV, steps=1, prompts_per_step=2, group_size=3,
                                 max_new_tokens=20, top_p=1.0)
    engine = Engine(model, None, GKV, slots=6, max_new_tokens=20, max_prompt_length=16,
                    prefill_batch=2, prompt_buckets=[16], record=True)
    out, prefills = grpo_loop._rollouts(engine, model.params(), prompts, config, seed=40,
                                        width=16)
    assert prefills == 2 and engine.stats["inserted"] == 6
    repeated = [p for p in prompts for _ in range(3)]
    reference = generate(model, repeated, eviction=GKV, max_new_tokens=20, temperature=0.8,
                         seed=40, prompt_buckets=[16], return_logprobs=True,
                         return_eviction_record=True)
    assert out.tokens == reference.tokens and out.prompt_ids == reference.prompt_ids
    for got, want in zip(out.logprobs, reference.logprobs, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_array_equal(out.eviction_record.visible_until,
                                  reference.eviction_record.visible_until)
    batch = training.batch_from_generation(out, num_targets=20)
    want = training.batch_from_generation(reference, num_targets=20)
    np.testing.assert_array_equal(batch.visible_until, want.visible_until)


def test_post_training_bad_input(tmp_path):
    model = tiny_model()
    with pytest.raises(ValueError, match="policy 'full' evicts nothing"):
        training.DistillConfig(eviction=EvictionConfig(policy="full"), steps=1)
    with pytest.raises(ValueError, match="learning_rate must be a number in"):
        training.DistillConfig(eviction=GKV, steps=1, learning_rate=0.0)
    with pytest.raises(ValueError, match=r"steps must be an integer in \[1, 2147483647\]"):
        training.DistillConfig(eviction=GKV, steps=0)
    with pytest.raises(ValueError, match="group_size must be an integer >= 2"):
        training.GRPOConfig(eviction=GKV, steps=1, group_size=1)
    with pytest.raises(ValueError, match="data must be a non-empty sequence"):
        training.distill(model, model, [], distill_config(), run_dir=str(tmp_path))
    other = dataclasses.replace(model.config, vocab_size=SPEC.vocab + 3)
    from gkv_jax.models import Transformer
    with pytest.raises(ValueError, match="teacher: vocabulary of 100 tokens"):
        training.distill(model, Transformer(other), distill_data(), distill_config(),
                         run_dir=str(tmp_path))
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(training.RunDirError, match="not empty and holds no run.json"):
        training.distill(model, model, distill_data(), distill_config(), run_dir=str(tmp_path))
    assert (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="answers must have one entry per prompt"):
        training.grpo(model, [[1, 2]], [], lambda c, a: True,
                      training.GRPOConfig(eviction=GKV, steps=1, max_new_tokens=16),
                      run_dir=str(tmp_path / "g"))
    assert generate  # generate is the rollout engine (imported for the reader)
