"""`gkv_jax.eviction` against an independent plain-numpy restatement of docs/algorithm.md."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gkv_jax import policies
from gkv_jax.eviction import EvictionConfig, Policy, redundancy, select, window_attention

# The policies `spec_scores` restates (the built-ins; tova and l2norm have their own
# restatements in tests/test_policy_<name>.py). test_the_restatement_covers_every_builtin
# fails when a built-in is added without a restatement here.
SCORED_POLICIES = ("snapkv", "rkv", "h2o", "gkv")
EVICTING_POLICIES = ("streaming", *SCORED_POLICIES)
BUILTIN = tuple(p.name for p in vars(policies.builtin).values() if isinstance(p, Policy))


def test_the_restatement_covers_every_builtin():
    builtin_evicting = {name for name in BUILTIN if policies.get_policy(name).evicts}
    assert set(EVICTING_POLICIES) == builtin_evicting
    assert set(BUILTIN) - builtin_evicting == {"full"}  # the one never-evicting policy


# --------------------------------------------------------------------------------------------
# The specification in plain numpy (float64, loops over sequences and KV heads).


def spec_local_score(q, keys, valid):
    """Step 1 for one (sequence, KV head): q [G, W, H], keys [S, H], valid [S] -> A [S - W]."""
    G, W, H = q.shape
    S = keys.shape[0]
    A = np.zeros(S - W)
    for i in range(W):
        row = S - W + i
        visible = [j for j in range(S) if valid[j] and j <= row]
        best = np.zeros(S)
        for g in range(G):
            probs = np.zeros(S)
            if visible:
                logits = np.array([q[g, i] @ keys[j] / math.sqrt(H) for j in visible])
                e = np.exp(logits - logits.max())
                probs[visible] = e / e.sum()
            best = np.maximum(best, probs)
        A += best[: S - W]
    return A / W


def spec_redundancy(keys, valid, threshold):
    """Step 4 for one (sequence, KV head): keys [S, H], valid [S] -> R [S] (0 at invalid)."""
    S = keys.shape[0]
    unit = keys / (np.linalg.norm(keys, axis=1, keepdims=True) + 1e-6)
    sim = unit @ unit.T
    for m in range(S):
        sim[m, m] = 0.0
    for n in range(S):
        if not valid[n]:
            sim[:, n] = 0.0
    original = sim.copy()
    for n in range(S):
        if not valid[n]:
            continue
        rows = [m for m in range(S) if valid[m] and m != n and original[m, n] > threshold]
        if rows:
            sim[max(rows), n] = 0.0
    s = sim.sum(axis=1) / max(int(valid.sum()), 1)
    R = np.zeros(S)
    idx = np.flatnonzero(valid)
    if idx.size:
        e = np.exp(s[idx] - s[idx].max())
        R[idx] = e / e.sum()
    return R


def spec_pool(x, kernel):
    half = kernel // 2
    return np.array([x[max(0, j - half): j + half + 1].max() for j in range(len(x))])


def spec_normalise(x):
    return x / x.max() if x.max() > 0 else np.zeros_like(x)


def spec_global(smooth, alpha, local, previous):
    """Step 3; previous [C] with NaN = no history (the library's convention), or None."""
    G = local.copy()
    if previous is None:
        return G
    for j, prev in enumerate(previous):
        if np.isnan(prev):
            continue
        if smooth == "max":
            G[j] = max(alpha * prev, local[j])
        elif smooth == "mean":
            G[j] = alpha * prev + (1 - alpha) * local[j]
        else:
            G[j] = alpha * prev + local[j]
    return G


def spec_scores(cfg, q, keys, valid, previous):
    """(F, carried G or None) over the S - W candidates of one (sequence, KV head)."""
    S, W = keys.shape[0], cfg.window
    if cfg.policy == "streaming":
        return -np.arange(S - W, dtype=np.float64), None
    A = spec_local_score(q, keys, valid)
    if cfg.policy == "snapkv":
        return spec_pool(A, cfg.pool_kernel), None
    if cfg.policy == "rkv":
        R = spec_redundancy(keys, valid, cfg.similarity_threshold)[: S - W]
        return cfg.mix_lambda * spec_pool(A, cfg.pool_kernel) - (1 - cfg.mix_lambda) * R, None
    G = spec_global(cfg.smooth, cfg.alpha, spec_normalise(A), previous)
    if cfg.policy == "h2o":
        return G, G
    R = spec_normalise(spec_redundancy(keys, valid, cfg.similarity_threshold)[: S - W])
    return cfg.mix_lambda * G - (1 - cfg.mix_lambda) * R, G


def spec_select(cfg, queries, keys, valid, global_score=None):
    """Steps 6-7 on top of `spec_scores`, plus the largest score gap at the top-k boundary."""
    queries, keys = np.asarray(queries, np.float64), np.asarray(keys, np.float64)
    valid = np.asarray(valid)
    B, K, S, _ = keys.shape
    count, W = cfg.budget - cfg.window, cfg.window
    kept = np.zeros((B, K, count), np.int64)
    carried = np.full((B, K, count), np.nan) if cfg.has_global_score else None
    min_gap = np.inf
    for b in range(B):
        for k in range(K):
            G = queries.shape[1] // K
            q = queries[b, k * G:(k + 1) * G]
            previous = None if global_score is None else np.asarray(global_score)[b, k]
            F, carry = spec_scores(cfg, q, keys[b, k], valid[b], previous)
            F = np.where(valid[b, : S - W], F, -np.inf)
            order = sorted(range(S - W), key=lambda j: (-F[j], j))  # ties: lowest index first
            kept[b, k] = sorted(order[:count])
            finite = np.sort(F[np.isfinite(F)])[::-1]
            if finite.size > count and finite[count - 1] != finite[count]:
                min_gap = min(min_gap, finite[count - 1] - finite[count])
            if carry is not None:
                carried[b, k] = [carry[j] if valid[b, j] else np.nan for j in kept[b, k]]
    return kept, carried, min_gap


# --------------------------------------------------------------------------------------------
# Inputs.


def random_inputs(rng, B, K, G, W, S, H, pads):
    queries = rng.normal(size=(B, K * G, W, H)).astype(np.float32)
    keys = rng.normal(size=(B, K, S, H)).astype(np.float32)
    valid = np.arange(S)[None, :] >= np.asarray(pads)[:, None]
    keys = np.where(valid[:, None, :, None], keys, np.nan).astype(np.float32)  # empty = NaN
    return queries, keys, valid


def make_config(policy, budget, W, **kw):
    if policy == "streaming":
        return EvictionConfig(policy, budget=budget, recent=W, **kw)
    return EvictionConfig(policy, budget=budget, window=W, **kw)


def run_both(cfg, queries, keys, valid, global_score=None, min_gap=1e-5):
    kept, new_gs = select(cfg, jnp.asarray(queries), jnp.asarray(keys), jnp.asarray(valid),
                          None if global_score is None else jnp.asarray(global_score))
    want_kept, want_gs, gap = spec_select(cfg, queries, keys, valid, global_score)
    assert gap > min_gap, "inputs too close to a tie to compare float32 with float64"
    assert kept.dtype == jnp.int32 and kept.shape == want_kept.shape
    np.testing.assert_array_equal(np.asarray(kept), want_kept)
    if want_gs is None:
        assert new_gs is None
    else:
        assert new_gs.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(new_gs), want_gs, rtol=1e-5, atol=1e-6)
    return np.asarray(kept), None if new_gs is None else np.asarray(new_gs)


# (B, K, G, W, S, H, budget, left pads per sequence)
CASES = (
    (1, 1, 1, 4, 13, 8, 9, (0,)),
    (2, 2, 2, 3, 21, 4, 12, (0, 5)),
    (2, 1, 3, 5, 37, 8, 20, (9, 0)),
)


# The exhaustive sweep (slow): more batch sizes, group sizes 1/2/7, S not a multiple of 16,
# larger windows and budgets, heavy left padding.
SWEEP_CASES = tuple(
    (B, K, G, W, S, H, budget, pads)
    for B, pads in ((1, (0,)), (3, (0, 7, 30)))
    for K, G in ((1, 7), (2, 1), (2, 2))
    for W, S, budget in ((1, 17, 6), (4, 50, 20), (16, 129, 48))
    for H in (16,)
    if max(pads) < S - budget
)


@pytest.mark.slow
@pytest.mark.parametrize("policy", EVICTING_POLICIES)
@pytest.mark.parametrize("case", SWEEP_CASES,
                         ids=lambda c: "B{}K{}G{}W{}S{}b{}".format(*c[:5], c[6]))
def test_sweep_matches_spec_on_random_inputs(policy, case):
    B, K, G, W, S, H, budget, pads = case
    cfg = make_config(policy, budget, W)
    # Pooled scores plateau and rkv's redundancy term is nearly uniform on random keys, so
    # boundary gaps are small: take the first draw whose gap is still far above float32
    # rounding of the scores (~1e-8 here).
    min_gap = 1e-6
    for seed in range(20):
        rng = np.random.default_rng(1000 * seed + 7 * S + B + 3 * K * G)
        queries, keys, valid = random_inputs(rng, B, K, G, W, S, H, pads)
        if spec_select(cfg, queries, keys, valid, None)[2] > min_gap:
            break
    run_both(cfg, queries, keys, valid, min_gap=min_gap)


@pytest.mark.parametrize("threshold", (0.5, -0.1))
def test_local_score_and_redundancy_match_spec(threshold):
    """The continuous scores, on a cache with left pads and evicted holes (zero keys)."""
    B, K, G, W, S, H = 2, 2, 2, 3, 19, 4
    queries, keys, valid = random_inputs(np.random.default_rng(17), B, K, G, W, S, H, (0, 2))
    valid[1, [9, 15]] = False  # holes, one right before the window
    keys = np.where(valid[:, None, :, None], keys, 0.0).astype(np.float32)
    A = np.asarray(window_attention(jnp.asarray(queries), jnp.asarray(keys), jnp.asarray(valid)))
    R = np.asarray(redundancy(jnp.asarray(keys), jnp.asarray(valid), threshold))
    for b in range(B):
        for k in range(K):
            q = queries[b, k * G:(k + 1) * G].astype(np.float64)
            want_A = spec_local_score(q, keys[b, k].astype(np.float64), valid[b])
            want_R = spec_redundancy(keys[b, k].astype(np.float64), valid[b], threshold)
            np.testing.assert_allclose(A[b, k], want_A, rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(R[b, k], want_R, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("policy", EVICTING_POLICIES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}K{}G{}W{}S{}".format(*c[:5]))
def test_matches_spec_on_random_inputs(policy, case):
    B, K, G, W, S, H, budget, pads = case
    rng = np.random.default_rng(100 * EVICTING_POLICIES.index(policy) + S)
    queries, keys, valid = random_inputs(rng, B, K, G, W, S, H, pads)
    run_both(make_config(policy, budget, W), queries, keys, valid)


@pytest.mark.parametrize("smooth", ("max", "mean", "sum"))
def test_gkv_smoothing_with_partial_history_matches_spec(smooth):
    B, K, G, W, S, H, budget, pads = CASES[1]
    rng = np.random.default_rng(7)
    queries, keys, valid = random_inputs(rng, B, K, G, W, S, H, pads)
    history = rng.uniform(0, 1, size=(B, K, budget - W)).astype(np.float32)
    history[:, :, ::3] = np.nan  # rows without history
    cfg = EvictionConfig("gkv", budget=budget, window=W, smooth=smooth)
    run_both(cfg, queries, keys, valid, history)


@pytest.mark.parametrize("policy, knobs", [
    ("gkv", dict(similarity_threshold=-0.2, mix_lambda=0.3, alpha=0.6)),
    ("rkv", dict(pool_kernel=3, mix_lambda=0.4, similarity_threshold=0.2)),
    ("snapkv", dict(pool_kernel=1)),
])
def test_non_default_knobs_match_spec(policy, knobs):
    B, K, G, W, S, H, budget, pads = CASES[1]
    rng = np.random.default_rng(13)
    queries, keys, valid = random_inputs(rng, B, K, G, W, S, H, pads)
    history = rng.uniform(0, 1, size=(B, K, budget - W)).astype(np.float32)
    run_both(make_config(policy, budget, W, **knobs), queries, keys, valid, history)


def test_h2o_default_window_is_the_current_query():
    cfg = EvictionConfig("h2o", budget=10)
    assert cfg.window == 1
    rng = np.random.default_rng(3)
    queries, keys, valid = random_inputs(rng, 2, 2, 2, 1, 17, 8, (0, 4))
    run_both(cfg, queries, keys, valid)


@pytest.mark.parametrize("policy", ("gkv", "h2o"))
def test_two_chained_compressions_carry_the_global_score(policy):
    B, K, G, W, H, budget, D = 2, 2, 2, 3, 8, 11, 7
    S1 = 19
    cfg = make_config(policy, budget, W)
    rng = np.random.default_rng(11)
    queries, keys, valid = random_inputs(rng, B, K, G, W, S1, H, (0, 4))
    kept, new_gs = run_both(cfg, queries, keys, valid)
    assert not np.isnan(new_gs).any()
    # Next cycle: the kept rows, then the previous window, then D new tokens.
    new_keys = rng.normal(size=(B, K, D, H)).astype(np.float32)
    kept_keys = np.take_along_axis(keys, kept[..., None], axis=2)
    keys2 = np.concatenate([kept_keys, keys[:, :, S1 - W:], new_keys], axis=2)
    valid2 = np.ones((B, budget + D), bool)  # enough valid candidates: every kept row is valid
    queries2 = rng.normal(size=queries.shape).astype(np.float32)
    kept2, new_gs2 = run_both(cfg, queries2, keys2, valid2, new_gs)
    # The history really mattered: without it the second step keeps something else.
    fresh, fresh_gs, _ = spec_select(cfg, queries2, keys2, valid2, None)
    assert not (np.array_equal(kept2, fresh) and np.allclose(new_gs2, fresh_gs))


# --------------------------------------------------------------------------------------------
# Small cases checkable by eye.


def one_hot_keys(S, H=16):
    """Key j = unit vector e_j: all keys orthogonal, so no redundancy unless made so."""
    return np.eye(H, dtype=np.float32)[:S][None, None]


@pytest.mark.parametrize("policy", ("gkv", "rkv"))
def test_newest_duplicate_survives(policy):
    S, W = 10, 2
    keys = one_hot_keys(S)
    keys[0, 0, [1, 3, 5]] = np.eye(16, dtype=np.float32)[1]  # three copies of one key
    queries = np.zeros((1, 1, W, 16), np.float32)  # uniform attention: redundancy decides
    cfg = make_config(policy, budget=S - 2, W=W)  # 8 candidates, keep 6: drop two
    kept, _ = select(cfg, queries, keys, np.ones((1, S), bool))
    # s[1] = 2/S, s[3] = 1/S, s[5] = 0: the two older copies go, the newest stays.
    assert np.asarray(kept)[0, 0].tolist() == [0, 2, 4, 5, 6, 7]


def test_high_past_attention_survives_under_gkv_but_not_snapkv():
    S, W, H = 10, 2, 16
    keys = one_hot_keys(S, H)
    weight = np.zeros(H, np.float32)
    weight[[0, 6, 7]] = 8.0  # logits +2: attended now
    weight[[1, 2, 3, 4, 5]] = -8.0  # logits -2: ignored now
    queries = np.broadcast_to(weight, (1, 1, W, H)).copy()
    valid = np.ones((1, S), bool)
    snap_kept, _ = select(make_config("snapkv", S - 1, W), queries, keys, valid)
    assert 3 not in np.asarray(snap_kept)[0, 0]  # max-pool(A) is lowest at row 3
    history = np.zeros((1, 1, S - 1 - W), np.float32)
    history[0, 0, 3] = 1.0  # row 3 was heavily attended before
    gkv_kept, gkv_gs = select(make_config("gkv", S - 1, W), queries, keys, valid, history)
    gkv_kept = np.asarray(gkv_kept)[0, 0].tolist()
    assert 3 in gkv_kept
    np.testing.assert_allclose(np.asarray(gkv_gs)[0, 0, gkv_kept.index(3)], 0.8, rtol=1e-6)


def test_streaming_keeps_the_first_sink_valid_positions():
    cfg = EvictionConfig("streaming", budget=9, sink=4)
    assert (cfg.recent, cfg.window) == (5, 5)
    S = 20
    valid = np.arange(S)[None, :] >= np.array([[0], [3], [13]])
    keys = np.random.default_rng(0).normal(size=(3, 2, S, 4)).astype(np.float32)
    kept, new_gs = select(cfg, None, keys, valid)
    assert new_gs is None
    kept = np.asarray(kept)
    assert kept[0].tolist() == [[0, 1, 2, 3]] * 2
    assert kept[1].tolist() == [[3, 4, 5, 6]] * 2
    # Only 2 valid candidates (13, 14) before the recent tail: the rest point at empty slots.
    assert kept[2].tolist() == [[0, 1, 13, 14]] * 2


@pytest.mark.parametrize("policy", ("gkv", "h2o"))
def test_nan_global_score_means_no_history(policy):
    W = 1 if policy == "h2o" else 3
    cfg = make_config(policy, 9, W)
    queries, keys, valid = random_inputs(np.random.default_rng(5), 2, 2, 2, W, 15, 8, (0, 2))
    kept_none, gs_none = select(cfg, queries, keys, valid, None)
    nan_history = jnp.full((2, 2, 9 - W), jnp.nan)
    kept_nan, gs_nan = select(cfg, queries, keys, valid, nan_history)
    np.testing.assert_array_equal(np.asarray(kept_nan), np.asarray(kept_none))
    np.testing.assert_array_equal(np.asarray(gs_nan), np.asarray(gs_none))
    ones = jnp.ones_like(nan_history)  # a real history changes the result
    _, gs_ones = select(cfg, queries, keys, valid, ones)
    assert not np.allclose(np.asarray(gs_ones), np.asarray(gs_none))


@pytest.mark.parametrize("policy", EVICTING_POLICIES)
def test_pads_never_kept_while_enough_valid_candidates(policy):
    W, budget, S = 3, 10, 20
    cfg = make_config(policy, budget, W)
    # Sequence 0: exactly budget - W valid candidates; sequence 1: two fewer.
    pads = (S - W - (budget - W), S - W - (budget - W) + 2)
    queries, keys, valid = random_inputs(np.random.default_rng(9), 2, 2, 2, W, S, 8, pads)
    kept, new_gs = select(cfg, queries, keys, valid)
    kept = np.asarray(kept)
    assert kept.dtype == np.int32 and kept.shape == (2, 2, budget - W)
    for row in kept.reshape(-1, budget - W):
        assert np.all(np.diff(row) > 0) and row.min() >= 0 and row.max() < S - W
    assert valid[0][kept[0]].all()
    # Every valid candidate of sequence 1 is kept; the two extra entries are the lowest pads.
    assert kept[1].tolist() == [[0, 1, *range(pads[1], S - W)]] * 2
    if new_gs is not None:
        new_gs = np.asarray(new_gs)
        assert not np.isnan(new_gs[0]).any()
        assert np.isnan(new_gs[1, :, :2]).all() and not np.isnan(new_gs[1, :, 2:]).any()


def test_bfloat16_inputs_and_jit_with_static_config():
    cfg = EvictionConfig("gkv", budget=8, window=2)
    queries, keys, valid = random_inputs(np.random.default_rng(4), 1, 2, 2, 2, 12, 8, (0,))
    step = jax.jit(select, static_argnums=0)
    kept, new_gs = step(cfg, jnp.asarray(queries, jnp.bfloat16), jnp.asarray(keys, jnp.bfloat16),
                        jnp.asarray(valid))
    assert kept.dtype == jnp.int32 and new_gs.dtype == jnp.float32
    assert kept.shape == new_gs.shape == (1, 2, 6)


# --------------------------------------------------------------------------------------------
# Configuration.


def test_policy_defaults():
    gkv = EvictionConfig("gkv", budget=64)
    assert (gkv.window, gkv.divide_length, gkv.alpha, gkv.mix_lambda, gkv.similarity_threshold,
            gkv.smooth, gkv.pool_kernel) == (16, 128, 0.8, 0.5, 0.5, "max", None)
    assert (gkv.kept_scored, gkv.capacity, gkv.has_global_score) == (48, 192, True)
    h2o = EvictionConfig("h2o", budget=64)
    assert (h2o.window, h2o.alpha, h2o.smooth, h2o.mix_lambda) == (1, 0.8, "sum", None)
    rkv = EvictionConfig("rkv", budget=64)
    assert (rkv.window, rkv.pool_kernel, rkv.mix_lambda, rkv.similarity_threshold,
            rkv.alpha) == (16, 5, 0.1, 0.5, None)
    snap = EvictionConfig("snapkv", budget=64)
    assert (snap.window, snap.pool_kernel, snap.has_global_score) == (16, 5, False)
    stream = EvictionConfig("streaming", budget=64)
    assert (stream.sink, stream.recent, stream.window, stream.kept_scored) == (4, 60, 60, 4)
    assert EvictionConfig("streaming", budget=64, recent=50).sink == 14
    full = EvictionConfig("full")
    assert (full.evicts, full.kept_scored, full.capacity) == (False, None, None)
    assert "budget=64" in gkv.describe()


def test_config_is_hashable_and_compares_by_value():
    a = EvictionConfig("gkv", budget=64)
    b = EvictionConfig("gkv", budget=64, window=16, alpha=0.8)
    assert a == b and hash(a) == hash(b)
    assert a != EvictionConfig("gkv", budget=64, alpha=0.7)
    with pytest.raises(AttributeError):
        a.budget = 3


@pytest.mark.parametrize("kwargs, parameter", [
    (dict(policy="lru", budget=64), "policy"),
    (dict(policy="gkv"), "budget"),
    (dict(policy="gkv", budget=16), "budget"),
    (dict(policy="gkv", budget=64.0), "budget"),
    (dict(policy="gkv", budget=64, window=0), "window"),
    (dict(policy="gkv", budget=64, divide_length=0), "divide_length"),
    (dict(policy="gkv", budget=64, alpha=-0.1), "alpha"),
    (dict(policy="h2o", budget=64, alpha=1.5), "alpha"),
    (dict(policy="gkv", budget=64, mix_lambda=1.1), "mix_lambda"),
    (dict(policy="rkv", budget=64, mix_lambda=-0.5), "mix_lambda"),
    (dict(policy="gkv", budget=64, similarity_threshold=1.5), "similarity_threshold"),
    (dict(policy="snapkv", budget=64, pool_kernel=4), "pool_kernel"),
    (dict(policy="snapkv", budget=64, pool_kernel=0), "pool_kernel"),
    (dict(policy="gkv", budget=64, smooth="median"), "smooth"),
    (dict(policy="gkv", budget=64, implementation="cuda"), "implementation"),
    (dict(policy="streaming", budget=64, sink=4, recent=61), "recent"),
    (dict(policy="streaming", budget=64, sink=0), "sink"),
    (dict(policy="streaming", budget=4), "recent"),
    (dict(policy="streaming", budget=64, window=10, recent=20), "window"),
    (dict(policy="snapkv", budget=64, alpha=0.8), "alpha"),
    (dict(policy="gkv", budget=64, pool_kernel=5), "pool_kernel"),
    (dict(policy="gkv", budget=64, sink=4), "sink"),
    (dict(policy="full", window=16), "window"),
])
def test_config_validation(kwargs, parameter):
    with pytest.raises(ValueError, match=parameter):
        EvictionConfig(**kwargs)


def test_select_rejects_bad_inputs():
    cfg = EvictionConfig("gkv", budget=8, window=2)
    queries, keys, valid = random_inputs(np.random.default_rng(0), 1, 2, 2, 2, 12, 8, (0,))
    with pytest.raises(ValueError, match="full"):
        select(EvictionConfig("full"), queries, keys, valid)
    with pytest.raises(ValueError, match="budget"):
        select(cfg, queries, keys[:, :, :7], valid[:, :7])
    with pytest.raises(ValueError, match="queries"):
        select(cfg, queries[:, :, :1], keys, valid)
    with pytest.raises(ValueError, match="queries"):
        select(cfg, queries[:, :3], keys, valid)
    with pytest.raises(ValueError, match="keys"):
        select(cfg, queries, keys[0], valid)
    with pytest.raises(ValueError, match="valid"):
        select(cfg, queries, keys, valid.astype(np.int32))
    with pytest.raises(ValueError, match="global_score"):
        select(cfg, queries, keys, valid, np.zeros((1, 2, 7), np.float32))
