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
    register_policy(Policy("odd", newest_first_score, knobs={"temperature": 1.0}))
    try:
        with pytest.raises(ValueError, match="EvictionConfig lacks"):
            EvictionConfig("odd", budget=5)
    finally:
        unregister_policy("odd")
    with pytest.raises(ValueError, match="policy must be one of"):
        EvictionConfig("nope", budget=5)


def test_ops_resolve_once():
    assert Ops.resolve("xla") == Ops("xla", None, "float32")
    pallas = Ops.resolve("pallas", matmul_dtype="bfloat16")
    assert pallas.implementation == "pallas" and pallas.interpret is not None
    with pytest.raises(ValueError, match="matmul_dtype"):
        Ops.resolve("xla", matmul_dtype="float16")


def test_readme_walkthrough_adds_a_policy_in_a_file_of_ones_own(capsys):
    """The README's "Adding a policy" code, run as a user's file: no library edit."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("### Adding a policy"):]
    start = section.index("```python\n") + len("```python\n")
    code = section[start: section.index("\n```", start)]
    try:
        exec(compile(code, "README.md: Adding a policy", "exec"), {})
        assert "recent-attention" in POLICIES
    finally:
        if "recent-attention" in POLICIES:
            unregister_policy("recent-attention")
    text, compressions = capsys.readouterr().out.rsplit(" ", 1)
    assert int(compressions) > 0
