"""Post-training refuses what `generate` refuses, before any step runs or any file is written,
and a refused start leaves its run directory usable (regressions of the second bad-input
round: each of these trained silently, or left a lock, before)."""

from __future__ import annotations

import json
import os

import numpy as np
import optax
import pytest

from gkv_jax import training
from gkv_jax.eviction import EvictionConfig
from tests.training.test_post_training import GKV, distill_config, distill_data
from tests.training.test_record import SPEC, tiny_model

GOOD = distill_data()


def _refused_without_a_trace(tmp_path, call, error, match):
    """`call(run_dir)` raises `error` matching `match`, and run_dir is not even created."""
    run_dir = tmp_path / "run"
    with pytest.raises(error, match=match):
        call(str(run_dir))
    assert not run_dir.exists()


def _distill(data, **changes):
    model = tiny_model()
    return lambda run_dir: training.distill(model, model, data, distill_config(**changes),
                                            run_dir=run_dir, progress=False)


@pytest.mark.parametrize("data, match", [
    # Token ids outside the vocabulary trained an all-NaN model.
    ([(GOOD[0][0], [3, 3, SPEC.vocab + 2, 4])] + GOOD[1:],
     rf"data\[0\] completion_ids has token ids outside \[0, {SPEC.vocab}\): 99 at index 2"),
    ([(GOOD[0][0], [-1, 4])], r"data\[0\] completion_ids has token ids outside"),
    # Float ids were truncated by int().
    ([([1.7, 2.2, 3.9], [4.5, 5.5])] + GOOD, r"data\[0\] prompt_ids must hold integer token "
                                             r"ids \(ints or numpy integers\), got 1.7"),
    # Strings were split into characters and failed with int()'s message.
    ([("H5 I9", "00 A 1")], r"data\[0\] prompt_ids is a string; token ids are expected "
                            r"\(tokenize it first"),
    # A prompt beyond the context trained at positions the model never saw.
    ([(list(range(1, 90)) * 6, [5, 6])] + GOOD,
     r"data\[0\]: prompt length 534 \+ completion 2 = 536 exceeds the model's context "
     r"\(max_position_embeddings=512\)"),
    ([([], [5])], r"data\[0\]: prompt_ids and completion_ids need at least one token"),
])
def test_distill_refuses_bad_data_naming_the_example(tmp_path, data, match):
    _refused_without_a_trace(tmp_path, _distill(data), training.DataError, match)
    with pytest.raises(training.DataError) as caught:
        _distill(data)(str(tmp_path / "again"))
    assert caught.value.index == 0


def test_a_budget_that_never_evicts_is_refused(tmp_path):
    # The longest sequence is 20 + 28 tokens: at budget 48 a compression never holds more.
    longest = max(GKV.peak_tokens(len(p), len(c)) for p, c in GOOD)
    budget = dataclasses_replace_budget(longest)
    _refused_without_a_trace(tmp_path, _distill(GOOD, eviction=budget), ValueError,
                             rf"budget {longest} never evicts: .* at most {longest} "
                             rf"tokens .* use a budget below {longest}")
    _refused_without_a_trace(tmp_path, _distill(GOOD, budgets=(12, 400)), ValueError,
                             r"budgets: budget 400 never evicts")
    # One below evicts the longest sequence: accepted (checked by the same arithmetic).
    pairs = training.inputs.distill_pairs(GOOD, GKV, (longest - 1,), tiny_model().config)
    assert len(pairs) == len(GOOD)


def dataclasses_replace_budget(budget):
    return EvictionConfig("gkv", budget=budget, window=GKV.window,
                          divide_length=GKV.divide_length)


def test_steps_that_overflow_the_optimizer_are_refused():
    for steps in (2**31, 10**20):
        with pytest.raises(ValueError, match=r"DistillConfig.steps must be an integer in "
                                             r"\[1, 2147483647\] \(optax counts steps"):
            distill_config(steps=steps)
        with pytest.raises(ValueError, match=r"GRPOConfig.steps must be an integer in"):
            training.GRPOConfig(eviction=GKV, steps=steps)
    # The largest accepted run builds its schedule and takes a step without overflowing.
    optimizer = training.make_optimizer(training.OptimizerConfig(), training.MAX_STEPS)
    params = {"w": np.ones(3, np.float32)}
    updates, _ = optimizer.update(params, optimizer.init(params), params)
    assert np.isfinite(np.asarray(optax.global_norm(updates)))


def _grpo(prompts, grade=lambda c, a: True, **changes):
    model = tiny_model()
    config = training.GRPOConfig(**{**dict(eviction=GKV, steps=1, prompts_per_step=1,
                                           group_size=2, max_new_tokens=16), **changes})
    return lambda run_dir: training.grpo(model, prompts, [0] * len(prompts), grade, config,
                                         run_dir=run_dir, progress=False)


@pytest.mark.parametrize("prompts, changes, match", [
    ([[1, SPEC.vocab]], {}, rf"prompts\[0\] has token ids outside \[0, {SPEC.vocab}\)"),
    ([[1, 2.5]], {}, r"prompts\[0\] must hold integer token ids"),
    ([list(range(1, 90)) * 6], {}, r"max_new_tokens: prompts\[0\]: prompt length 534 \+ "
                                   r"max_new_tokens 16 = 550 exceeds the model's context"),
    ([[1, 2, 3]], {"eviction": dataclasses_replace_budget(100)},
     r"budget 100 never evicts"),
    (["text"], {}, "prompts are strings: pass tokenizer="),
    ([[1, 2], "text"], {}, "all strings or all lists of token ids"),
    ([list(range(1, 30))], {"prompt_width": 16}, "prompt_width: .* below the longest prompt"),
])
def test_grpo_refuses_bad_prompts_before_its_run_dir(tmp_path, prompts, changes, match):
    # These were raised by the first rollout's generate, after run.json was written.
    _refused_without_a_trace(tmp_path, _grpo(prompts, **changes), ValueError, match)


def test_grade_fn_must_return_a_bool(tmp_path):
    # "no" used to count as a correct answer (bool("no") is True).
    with pytest.raises(TypeError, match=r"grade_fn must return a bool .* got 'no' \(str\)"):
        _grpo([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]], grade=lambda c, a: "no")(
            str(tmp_path / "run"))


def test_a_failed_start_leaves_no_lock_and_a_changed_run_names_what_changed(tmp_path):
    model = tiny_model()
    run_dir = str(tmp_path / "run")
    # A run that dies in its first step (here: its grade_fn) leaves run.json but no step:
    # the corrected call takes the directory over.
    with pytest.raises(ZeroDivisionError):
        _grpo([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]],
              grade=lambda c, a: 1 / 0)(run_dir)
    assert os.path.isfile(os.path.join(run_dir, "run.json"))
    training.distill(model, model, GOOD, distill_config(steps=2, checkpoint_every=1),
                     run_dir=run_dir, progress=False)
    with open(os.path.join(run_dir, "run.json")) as f:
        assert json.load(f)["kind"] == "distill"
    # A run that took steps is kept: the message names each setting with both values.
    changed = dataclasses_replace_budget(16)
    with pytest.raises(training.RunDirError,
                       match=r"holds a different run \(budget: 12 there, 16 now; steps: 2 "
                             r"there, 3 now\)") as caught:
        training.distill(model, model, GOOD, distill_config(steps=3, eviction=changed),
                         run_dir=run_dir, progress=False)
    assert caught.value.differences == [("budget", "12", "16"), ("steps", 2, 3)]
