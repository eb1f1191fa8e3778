"""The full-cache guard of post-training (`select_by`): the run returns its best evaluated
step among those that keep the full cache within the tolerance, step 0 included, so a run
that only does harm returns the model it was given."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from gkv_jax import training
from gkv_jax.training.run_dir import RunDir
from gkv_jax.training.selection import Selection
from tests.training.test_post_training import GKV, distill_config, distill_data
from tests.training.test_record import tiny_model


def _params(value: float) -> dict:
    return {"w": jax.numpy.full((3, 4), value, jax.numpy.float32)}


def _run(tmp_path) -> RunDir:
    run = RunDir(str(tmp_path / "run"), {"kind": "test"})
    run.open()
    return run


# step: (full, gkv@68)
SCORES = {0: (1.0, 0.10), 1: (1.0, 0.50), 2: (0.90, 0.95), 3: (0.995, 0.60), 4: (1.0, 0.55)}


def test_the_best_step_within_the_full_cache_tolerance_is_kept(tmp_path):
    run = _run(tmp_path)
    selection = Selection(run, "gkv@68", tolerance=0.01)
    for step, (full, gkv) in SCORES.items():
        selection.offer(step, {"full": full, "gkv@68": gkv}, _params(step), None,
                        checkpoint=False)
    # step 2 scores best but lost 10 points of the full cache; step 3 lost 0.5
    assert (selection.step, selection.score) == (3, 0.60)
    restored = selection.best_params(_params(4.0), final_step=4)
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.full((3, 4), 3.0))
    assert sorted(p.name for p in (tmp_path / "run" / "best").iterdir()) == ["3", "best.json"]
    # a resumed run rebuilds the same choice from its logged evaluations
    history = [{"step": s, "eval": {"full": f, "gkv@68": g}} for s, (f, g) in SCORES.items()]
    again = Selection(run, "gkv@68", tolerance=0.01)
    again.resume(history)
    assert again.step == 3 and again.summary()["full_cache_before"] == 1.0
    run.close()


def test_a_tie_goes_to_the_better_full_cache_then_the_earlier_step(tmp_path):
    run = _run(tmp_path)
    selection = Selection(run, "gkv@68", tolerance=0.01)
    # the default recipe on the bundled model: gkv@68 1.0 from step 25, full 0.98 .. 1.0
    for step, full in ((0, 1.0), (25, 0.98), (50, 0.99), (75, 1.0), (100, 1.0)):
        selection.offer(step, {"full": full, "gkv@68": 0.1 if step == 0 else 1.0},
                        _params(float(step)), None, checkpoint=False)
    assert selection.step == 75  # 50 ties on gkv with a lower full cache; 100 only ties
    again = Selection(run, "gkv@68", tolerance=0.01)
    again.resume([{"step": 0, "eval": {"full": 1.0, "gkv@68": 0.1}},
                  {"step": 50, "eval": {"full": 0.99, "gkv@68": 1.0}},
                  {"step": 75, "eval": {"full": 1.0, "gkv@68": 1.0}}])
    assert again.step == 75
    run.close()


def test_a_run_that_only_does_harm_returns_step_0(tmp_path):
    run = _run(tmp_path)
    selection = Selection(run, "gkv@68", tolerance=0.0)
    selection.offer(0, {"full": 1.0, "gkv@68": 0.5}, _params(0.0), None, checkpoint=False)
    selection.offer(5, {"full": 0.99, "gkv@68": 0.9}, _params(5.0), None, checkpoint=False)
    selection.offer(9, {"full": 1.0, "gkv@68": 0.5}, _params(9.0), None, checkpoint=False)
    assert selection.step == 0  # 5 lost the full cache, 9 only ties
    assert float(selection.best_params(_params(9.0), 9)["w"][0, 0]) == 0.0
    with pytest.raises(ValueError, match=r"without 'gkv@68'"):
        selection.offer(10, {"full": 1.0}, _params(1.0), None)
    run.close()


def test_select_by_is_checked():
    with pytest.raises(ValueError, match="select_by must be None or a key"):
        training.DistillConfig(eviction=GKV, steps=1, select_by="")
    with pytest.raises(ValueError, match=r"full_cache_tolerance must be a number in \[0.0, 1.0\]"):
        training.GRPOConfig(eviction=GKV, steps=1, full_cache_tolerance=2.0)


@pytest.mark.slow
def test_distill_returns_the_selected_step_and_resumes_to_it(tmp_path):
    model = tiny_model()
    scores = iter([(1.0, 0.1), (1.0, 0.4), (0.5, 0.9), (1.0, 0.3), (1.0, 0.2)] * 2)
    seen = {}

    def eval_fn(trained, step):
        seen[step] = jax.tree.map(np.asarray, trained.params())
        full, gkv = next(scores)
        return {"full": full, "gkv": gkv}

    # checkpoint_every=1: the periodic checkpoint and the new best fall on the same steps
    config = distill_config(steps=4, eval_every=1, checkpoint_every=1, select_by="gkv")
    with pytest.raises(ValueError, match="pass an eval_fn"):
        training.distill(model, model, distill_data(), config, run_dir=str(tmp_path / "x"),
                         progress=False)
    assert not (tmp_path / "x").exists()
    trained, history = training.distill(model, model, distill_data(), config,
                                        run_dir=str(tmp_path / "a"), eval_fn=eval_fn,
                                        progress=False)
    assert sorted(seen) == [0, 1, 2, 3, 4]
    for got, want in zip(jax.tree.leaves(trained.params()), jax.tree.leaves(seen[1]),
                         strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)  # step 2 lost the full cache
    assert history[-1]["selection"]["selected_step"] == 1
    # the finished run, called again, returns the same selected model
    again, _ = training.distill(model, model, distill_data(), config,
                                run_dir=str(tmp_path / "a"), eval_fn=eval_fn, progress=False)
    for got, want in zip(jax.tree.leaves(again.params()), jax.tree.leaves(seen[1]),
                         strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.slow
def test_grpo_that_only_lowers_the_full_cache_returns_the_model_it_was_given(tmp_path):
    from tests.training.test_record import SPEC

    model = tiny_model()
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, SPEC.vocab, n).tolist() for n in (6, 9)]

    def eval_fn(trained, step):  # every update "costs" the full cache 5 points
        return {"full": 1.0 - 0.05 * step, "gkv": 0.1 * step}

    config = training.GRPOConfig(eviction=GKV, steps=2, prompts_per_step=2, group_size=3,
                                 max_new_tokens=20, learning_rate=1e-3, warmup_ratio=0.0,
                                 checkpoint_every=0, eval_every=1, select_by="gkv")
    trained, history = training.grpo(model, prompts, [7, 11], lambda ids, a: a in ids, config,
                                     run_dir=str(tmp_path), eval_fn=eval_fn, progress=False)
    assert history[-1]["selection"]["selected_step"] == 0
    for got, want in zip(jax.tree.leaves(trained.params()), jax.tree.leaves(model.params()),
                         strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
