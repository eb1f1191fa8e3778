"""One `select` call validates its inputs once and resolves the backend once, for every
registered evicting policy on both backends; a standalone op call still validates (traced
with `jax.eval_shape`: nothing is compiled)."""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import pytest

from gkv_jax import policies
from gkv_jax.eviction import EvictionConfig, get_policy, select, selection
from gkv_jax.pallas_kernels import _common
from gkv_jax.pallas_kernels.ops import Ops
from gkv_jax.pallas_kernels.score_update import score_update

EVICTING = tuple(p for p in policies.POLICIES if get_policy(p).evicts)
# The ops' own validators (validate_keys_valid is called by these, not counted apart).
OP_VALIDATORS = ("validate_score_update", "validate_redundancy", "validate_keep_top",
                 "validate_compact")


@pytest.fixture
def calls(monkeypatch):
    """Counts calls of the select-level validation, the ops' validators and the backend
    resolution: name -> count."""
    counts = collections.Counter()

    def counting(module, name, key):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            counts[key] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    counting(selection, "validate_inputs", "select validation")
    for name in OP_VALIDATORS:
        counting(_common, name, "op validation")
    counting(_common, "resolve_implementation", "resolution")
    return counts


def shapes(cfg, B=1, K=2, G=2, S=12, H=8):
    """Abstract (queries, keys, valid, global_score) for `select` under `cfg`."""
    f32 = jnp.float32
    queries = jax.ShapeDtypeStruct((B, K * G, cfg.window, H), f32)
    keys = jax.ShapeDtypeStruct((B, K, S, H), f32)
    valid = jax.ShapeDtypeStruct((B, S), jnp.bool_)
    history = jax.ShapeDtypeStruct((B, K, cfg.kept_scored), f32)
    return queries, keys, valid, history


@pytest.mark.parametrize("implementation", ("xla", "pallas"))
@pytest.mark.parametrize("policy", EVICTING)
def test_select_validates_once_and_resolves_once(policy, implementation, calls):
    window = 1 if get_policy(policy).window_role == "current_query" else 2
    cfg = EvictionConfig(policy, budget=8, window=window, implementation=implementation)
    # The undecorated `select`: a jitted one would skip tracing on a cache hit.
    jax.eval_shape(lambda *arrays: select.__wrapped__(cfg, *arrays), *shapes(cfg))
    assert calls == {"select validation": 1, "resolution": 1}, policy


def test_standalone_ops_still_validate(calls):
    cfg = EvictionConfig("gkv", budget=8, window=2)
    queries, keys, valid, _ = shapes(cfg)
    jax.eval_shape(lambda q, k, v: score_update(q, k, v, implementation="xla"),
                   queries, keys, valid)
    assert calls == {"op validation": 1, "resolution": 1}
    ops = Ops.resolve("xla")
    calls.clear()
    jax.eval_shape(lambda q, k, v: ops.score_update(q, k, v), queries, keys, valid)
    assert calls == {"op validation": 1}  # resolved already, still validated
    with pytest.raises(ValueError, match="queries"):
        ops.score_update(jnp.zeros((1, 3, 2, 8)), jnp.zeros((1, 2, 12, 8)),
                         jnp.ones((1, 12), bool))


def test_a_policy_scoring_the_wrong_shape_gets_a_clear_error():
    from gkv_jax.policies import Policy, register_policy
    from gkv_jax.policies.registry import unregister_policy

    register_policy(Policy("short_score", lambda cfg, ops, q, keys, valid, g: (keys[..., 0], None),
                           knobs={"window": 16}, needs_queries=False, window_role="recent"))
    try:
        cfg = EvictionConfig("short_score", budget=8, window=2)
        with pytest.raises(ValueError, match="short_score.*must score the candidates"):
            jax.eval_shape(lambda k, v: select.__wrapped__(cfg, None, k, v), *shapes(cfg)[1:3])
    finally:
        unregister_policy("short_score")
