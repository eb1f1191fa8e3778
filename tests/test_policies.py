"""The policy registry: every policy is one `Policy` object; a policy of one's own is
registered without touching the library, and runs through `select` on both backends."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from gkv_jax.eviction import POLICIES, EvictionConfig, Ops, get_policy, select
from gkv_jax.policies import Policy, register_policy, unregister_policy


def newest_first_score(cfg, ops, queries, keys, valid, global_score):
    """A toy policy: the local attention score A plus a bonus for recency (no history)."""
    local = ops.score_update(queries, keys, valid, normalise=False)
    recency = jnp.arange(local.shape[-1], dtype=jnp.float32) / local.shape[-1]
    return local + recency, None


@pytest.fixture
def toy_policy():
    policy = register_policy(Policy("toy", newest_first_score, knobs={"window": 2}))
    yield policy
    unregister_policy("toy")


def test_builtin_policies_in_order():
    builtin = ("full", "streaming", "snapkv", "rkv", "h2o", "gkv")
    assert tuple(POLICIES[:6]) == builtin and {"tova", "l2norm"} <= set(POLICIES)
    assert [get_policy(p).carries_global_score for p in builtin] == [
        False, False, False, False, True, True]
    assert [get_policy(p).needs_queries for p in builtin] == [
        False, False, True, True, True, True]
    assert not get_policy("full").evicts


def test_a_registered_policy_is_a_config_and_runs_on_both_backends(toy_policy):
    assert "toy" in POLICIES and POLICIES[-1] == "toy"
    cfg = EvictionConfig("toy", budget=5)
    assert cfg.window == 2 and cfg.query_window_size == 2 and not cfg.has_global_score
    with pytest.raises(ValueError, match="alpha is not used"):
        EvictionConfig("toy", budget=5, alpha=0.5)
    rng = np.random.default_rng(0)
    queries = jnp.asarray(rng.normal(size=(1, 2, 2, 8)), jnp.float32)
    keys = jnp.asarray(rng.normal(size=(1, 1, 9, 8)), jnp.float32)
    valid = jnp.ones((1, 9), bool).at[0, 0].set(False)
    kept = {implementation: select(dataclasses.replace(cfg, implementation=implementation),
                                   queries, keys, valid)
            for implementation in ("xla", "pallas")}
    assert kept["xla"][1] is None and kept["pallas"][1] is None
    np.testing.assert_array_equal(kept["xla"][0], kept["pallas"][0])
    assert kept["xla"][0].shape == (1, 1, 3) and 0 not in np.asarray(kept["xla"][0])


def test_registration_errors(toy_policy):
    with pytest.raises(ValueError, match="already registered"):
        register_policy(Policy("toy", newest_first_score))
    register_policy(dataclasses.replace(toy_policy, knobs={"window": 3}), replace=True)
    assert EvictionConfig("toy", budget=5).window == 3
    with pytest.raises(TypeError, match="takes a Policy"):
        register_policy("toy")
    with pytest.raises(ValueError, match="window_role"):
        Policy("bad", newest_first_score, window_role="sideways")
    with pytest.raises(ValueError, match="policy must be one of"):
        EvictionConfig("nope", budget=5)


def test_knobs_and_names_are_checked_when_the_policy_is_built():
    # An unknown knob fails at Policy(...), before registration (it used to fail only when
    # an EvictionConfig was built).
    with pytest.raises(ValueError, match=r"knobs \['gamma'\] are not EvictionConfig knobs"):
        Policy("myknob", newest_first_score, knobs={"window": 8, "gamma": 0.3})
    with pytest.raises(ValueError, match="default of knob 'window' must be an integer"):
        Policy("myknob", newest_first_score, knobs={"window": 2.5})
    with pytest.raises(ValueError, match="default of knob 'smooth' must be an string"):
        Policy("myknob", newest_first_score, knobs={"smooth": 1})
    with pytest.raises(TypeError, match="knobs must be a mapping"):
        Policy("myknob", newest_first_score, knobs=["window"])
    assert "myknob" not in POLICIES
    # Names the CLI's comma-separated --policies can name.
    for name in ("a,b", 123, "", " toy", "my policy", None):
        with pytest.raises(ValueError, match="non-empty string without commas"):
            Policy(name, newest_first_score)
    with pytest.raises(TypeError, match="score must be callable"):
        Policy("uncallable", "not a function")


def test_full_refuses_a_budget():
    assert EvictionConfig("full").budget is None
    with pytest.raises(ValueError, match="budget is not used by policy 'full'"):
        EvictionConfig("full", budget=24)


def _policy_returning(name, make, carries=False):
    def score(cfg, ops, queries, keys, valid, global_score):
        local = ops.score_update(queries, keys, valid, normalise=False)
        return make(local)
    return register_policy(Policy(name, score, knobs={"window": 2},
                                  carries_global_score=carries))


SELECT_INPUTS = dict(
    queries=jnp.asarray(np.random.default_rng(0).normal(size=(1, 2, 2, 8)), jnp.float32),
    keys=jnp.asarray(np.random.default_rng(1).normal(size=(1, 1, 18, 8)), jnp.float32),
    valid=jnp.ones((1, 18), bool).at[0, :2].set(False))


@pytest.mark.parametrize("make, carries, message", [
    (lambda a: (a, a), False, "registered with carries_global_score=False"),
    (lambda a: (a, None), True, "returned None for it"),
    (lambda a: (a, a[..., :-1]), True, r"got float32\[1, 1, 16\], float32\[1, 1, 15\]"),
    (lambda a: a, False, "must return a pair"),
])
def test_a_policys_carried_score_is_checked_like_its_scores(make, carries, message):
    _policy_returning("checked", make, carries)
    try:
        for implementation in ("xla", "pallas"):
            cfg = EvictionConfig("checked", budget=8, implementation=implementation)
            with pytest.raises(ValueError, match=message):
                select(cfg, **SELECT_INPUTS)
    finally:
        unregister_policy("checked")


def test_nan_scores_never_win_a_place_through_select():
    """A policy scoring NaN on even candidates: on both backends every real score is kept
    before any NaN one; an all-NaN policy keeps valid rows (oldest first), never pads."""
    def nan_on_even(a):
        return jnp.where(jnp.arange(a.shape[-1]) % 2 == 0, jnp.nan, a), None

    _policy_returning("nan-even", nan_on_even)
    _policy_returning("nan-all", lambda a: (jnp.full_like(a, jnp.nan), None))
    try:
        for implementation in ("xla", "pallas"):
            kept, _ = select(EvictionConfig("nan-even", budget=8, implementation=implementation),
                             **SELECT_INPUTS)
            kept = np.asarray(kept)[0, 0]
            # 7 real (odd, valid) candidates for 6 places: only real ones are kept.
            assert len(kept) == 6 and set(kept) <= {3, 5, 7, 9, 11, 13, 15}, implementation
            kept, _ = select(EvictionConfig("nan-all", budget=8, implementation=implementation),
                             **SELECT_INPUTS)
            assert np.asarray(kept).tolist() == [[[2, 3, 4, 5, 6, 7]]], implementation
    finally:
        unregister_policy("nan-even")
        unregister_policy("nan-all")


def test_ops_resolve_once():
    assert Ops.resolve("xla") == Ops("xla", None, "float32")
    pallas = Ops.resolve("pallas", matmul_dtype="bfloat16")
    assert pallas.implementation == "pallas" and pallas.interpret is not None
    with pytest.raises(ValueError, match="matmul_dtype"):
        Ops.resolve("xla", matmul_dtype="float16")


# Slow (the fast suite's cold time): custom policies are registered and run in the fast registry
# tests.
@pytest.mark.slow
def test_guide_walkthrough_adds_a_policy_in_a_file_of_ones_own(capsys):
    """The policies guide's "Adding a policy" code (docs/guides/policies.md), run as a
    user's file: no library edit."""
    guide = (Path(__file__).resolve().parent.parent / "docs" / "guides" / "policies.md")
    text = guide.read_text()
    section = text[text.index("## Adding a policy"):]
    start = section.index("```python\n") + len("```python\n")
    code = section[start: section.index("\n```", start)]
    try:
        exec(compile(code, "docs/guides/policies.md: Adding a policy", "exec"), {})
        assert "recent-attention" in POLICIES
    finally:
        if "recent-attention" in POLICIES:
            unregister_policy("recent-attention")
    text, compressions = capsys.readouterr().out.rsplit(" ", 1)
    assert int(compressions) > 0
