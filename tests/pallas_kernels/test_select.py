"""`gkv_jax.eviction.select` on the kernels: dispatch, parity with the reference for every
policy, ties, the bfloat16 matmul mode, and generate() end to end."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gkv_jax import policies
from gkv_jax.eviction import EvictionConfig, get_policy, policy_scores, select, select_with_ops
from gkv_jax.pallas_kernels import Ops, _common, resolve_implementation
from tests.pallas_kernels.inputs import boundary_is_clear, history, make_inputs

# Every registered evicting policy (a policy added to the registry is swept here too).
POLICIES = tuple(p for p in policies.POLICIES if get_policy(p).evicts)


def config(policy, budget, W, implementation=None):
    if get_policy(policy).window_role == "current_query":  # h2o, tova: the current query
        W = 1
    return EvictionConfig(policy, budget=budget, window=W, implementation=implementation)


def tie_free_inputs(cfg, B, K, G, S, H, pads, dtype="float32", seed=0, tol=1e-5):
    """The first draw whose reference scores have no near-tie at the top-k boundary."""
    W = cfg.window if cfg.policy_object.needs_queries else 1
    for attempt in range(20):
        queries, keys, valid = make_inputs(seed + 31 * attempt, B, K, G, W, S, H, pads, dtype)
        gs = history(seed + attempt, B, K, cfg.kept_scored) if cfg.has_global_score else None
        scores, _ = policy_scores(cfg, Ops.resolve("xla"), queries, keys, valid, gs)
        if boundary_is_clear(scores, valid[:, : S - cfg.window], cfg.kept_scored, tol):
            return queries, keys, valid, gs
    raise AssertionError("no tie-free draw")


def check_parity(policy, B, K, G, S, H, budget, pads, dtype="float32", interpret=True, W=4):
    cfg = config(policy, budget, W)
    queries, keys, valid, gs = tie_free_inputs(cfg, B, K, G, S, H, pads, dtype)
    if not cfg.policy_object.needs_queries:
        queries = None
    want = select(dataclasses.replace(cfg, implementation="xla"), queries, keys, valid, gs)
    if interpret is None:  # through EvictionConfig: TPU interpret mode on CPU
        got = select(dataclasses.replace(cfg, implementation="pallas"), queries, keys, valid,
                     gs)
    else:
        got = select_with_ops(cfg, Ops.resolve("pallas", interpret), queries, keys, valid, gs)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    if want[1] is None:
        assert got[1] is None
    else:
        np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=1e-5,
                                   atol=1e-7)


def test_dispatch_on_cpu():
    assert jax.default_backend() == "cpu"
    assert not resolve_implementation(None).use_pallas  # auto: the reference (CPU unverified)
    assert not resolve_implementation("xla").use_pallas
    pallas = resolve_implementation("pallas")
    assert pallas.use_pallas and pallas.interpret is not False  # TPU interpret mode
    with pytest.raises(ValueError, match="implementation"):
        resolve_implementation("triton")


def test_select_runs_the_kernels_only_when_asked():
    cfg = config("gkv", 40, 4)
    queries, keys, valid = make_inputs(0, 1, 1, 2, 4, 60, 64, (0,))

    def program(implementation):
        step = functools.partial(select, dataclasses.replace(cfg, implementation=implementation))
        return str(jax.make_jaxpr(step)(queries, keys, valid))

    assert "pallas_call" in program("pallas")
    assert "pallas_call" not in program("xla")
    assert "pallas_call" not in program(None)


def test_gkv_through_eviction_config_matches_reference():
    """EvictionConfig(implementation="pallas") on CPU: TPU interpret mode, left pads, NaN."""
    check_parity("gkv", 2, 2, 2, 127, 64, 80, (0, 40), interpret=None)


@pytest.mark.parametrize("policy", ("streaming", "snapkv", "rkv"))
def test_other_policies_match_reference(policy):
    """(h2o runs in the slow sweep.)"""
    check_parity(policy, 2, 2, 2, 127, 64, 80, (0, 40), dtype="bfloat16")


@pytest.mark.slow
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("S, G, H, budget", [(3, 1, 64, 2), (128, 7, 64, 100),
                                             (513, 2, 128, 300), (2176, 7, 128, 2048)])
def test_policies_sweep_match_reference(policy, S, G, H, budget):
    W = 1 if S == 3 else 16
    check_parity(policy, 2, 2, G, S, H, budget, (0, S // 3), W=W)


def test_ties_keep_the_lowest_slots():
    """Zero queries: every candidate gets the same attention, so snapkv's scores tie exactly
    and both implementations keep the lowest valid slots."""
    cfg = config("snapkv", 20, 4)
    _, keys, valid = make_inputs(0, 1, 2, 2, 4, 40, 64, (3,))
    queries = jnp.zeros((1, 4, 4, 64))
    for implementation in ("xla", "pallas"):
        kept, _ = select(dataclasses.replace(cfg, implementation=implementation), queries,
                         keys, valid)
        assert np.asarray(kept).tolist() == [[list(range(3, 19))] * 2], implementation


# Slow (the fast suite's cold time): the bfloat16 matmul mode's parity is in the fast kernel tests.
@pytest.mark.slow
def test_bfloat16_matmul_mode_keeps_99_percent_of_the_float32_set():
    """On clustered keys, bf16 operands (f32 accumulation) keep >= 99% of each head's set."""
    B, K, G, W, S, H, budget = 1, 2, 7, 16, 400, 128, 300
    cfg = config("gkv", budget, W)
    queries, keys, valid = make_inputs(5, B, K, G, W, S, H, (30,), clustered=True)
    gs = history(5, B, K, cfg.kept_scored)
    want, want_score = select(cfg, queries, keys, valid, gs)
    got, got_score = select_with_ops(cfg, Ops.resolve("pallas", True, "bfloat16"), queries,
                                     keys, valid, gs)
    want, got = np.asarray(want), np.asarray(got)
    for b in range(B):
        for k in range(K):
            agreement = np.intersect1d(want[b, k], got[b, k]).size / cfg.kept_scored
            assert agreement >= 0.99, (b, k, agreement)
    # The mode really changes the scores (else this test would prove nothing).
    assert not np.allclose(np.asarray(got_score), np.asarray(want_score), rtol=1e-5, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("policy, knobs", [
    ("gkv", dict(budget=16, window=4, divide_length=6)),
    ("rkv", dict(budget=14, window=4, divide_length=6)),
    ("h2o", dict(budget=12, divide_length=5)),
])
def test_generate_with_kernels_equals_reference(policy, knobs):
    from gkv_jax import conversion
    from gkv_jax.generation import generate
    from tests.helpers import SPEC_BY_NAME, tiny_hf_model

    spec = SPEC_BY_NAME["qwen2-h32-g2-untied"]
    model = conversion.from_hf(tiny_hf_model(spec))
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, spec.vocab, n).tolist() for n in (3, 25, 11)]
    outs = {}
    for implementation in ("xla", "pallas"):
        eviction = EvictionConfig(policy, implementation=implementation, **knobs)
        outs[implementation] = generate(model, prompts, eviction=eviction, max_new_tokens=30,
                                        eos_token_id=[], return_kept_positions=True)
    assert outs["pallas"].stats["compressions"] > 0
    assert outs["pallas"].tokens == outs["xla"].tokens
    np.testing.assert_array_equal(outs["pallas"].kept_positions, outs["xla"].kept_positions)


def test_eviction_lowers_to_mosaic_kernels_for_tpu():
    """On CPU, export the whole eviction (select + compact) for TPU: every kernel passes the
    Pallas -> Mosaic lowering (block shapes, supported ops) and appears in the program."""
    from jax import export

    from gkv_jax.pallas_kernels.topk_retention import compact

    cfg = config("gkv", 2048, 16)
    B, N, K, S, H = 1, 28, 4, 2176, 128
    shape = jax.ShapeDtypeStruct

    def one_eviction(queries, keys, values, positions, score):
        valid = positions[:, 0] >= 0
        kept, new_score = select_with_ops(cfg, Ops.resolve("pallas", False), queries, keys,
                                          valid, score[:, :, : cfg.kept_scored])
        return compact(keys, values, positions, score, kept, window=16, new_score=new_score,
                       implementation="pallas", interpret=False)

    exported = export.export(jax.jit(one_eviction), platforms=["tpu"])(
        shape((B, N, 16, H), jnp.bfloat16), shape((B, K, S, H), jnp.bfloat16),
        shape((B, K, S, H), jnp.bfloat16), shape((B, K, S), jnp.int32),
        shape((B, K, S), jnp.float32))
    # score update, redundancy, selection, compaction
    assert exported.mlir_module().count("tpu_custom_call") == 4


@pytest.mark.parametrize("backend", ("tpu", "gpu"))
def test_auto_runs_the_kernels_only_on_verified_backends(monkeypatch, backend):
    """One rule for TPU and GPU: None = the kernels on a backend of VERIFIED_BACKENDS only;
    "pallas" forces them on an unverified backend too."""
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    monkeypatch.setattr(_common, "gpu_compute_capability", lambda: 9.0)
    monkeypatch.setattr(_common, "VERIFIED_BACKENDS", frozenset())
    assert not resolve_implementation(None).use_pallas
    forced = resolve_implementation("pallas")
    assert forced.use_pallas and forced.interpret is False and forced.kernels == backend
    monkeypatch.setattr(_common, "VERIFIED_BACKENDS", frozenset({backend}))
    auto = resolve_implementation(None)
    assert auto.use_pallas and auto.interpret is False and auto.kernels == backend
    assert not resolve_implementation("xla").use_pallas


def test_auto_keeps_the_reference_on_a_verified_gpu_older_than_hopper(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(_common, "gpu_compute_capability", lambda: 8.0)
    monkeypatch.setattr(_common, "VERIFIED_BACKENDS", frozenset({"gpu"}))
    assert not resolve_implementation(None).use_pallas
    with pytest.raises(NotImplementedError, match="compute capability >= 9.0"):
        resolve_implementation("pallas")

