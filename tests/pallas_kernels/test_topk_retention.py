"""Top-k retention kernels: selection equals the reference (ties included), compaction is
exact and in place."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gkv_jax.pallas_kernels.topk_retention import BlockSizes, compact, keep_top
from tests.pallas_kernels.inputs import INTERPRET_MODES, TPU_INTERPRET


def scores_with_ties(rng, B, K, P):
    scores = rng.normal(size=(B, K, P)).astype(np.float32)
    scores[..., ::5] = 0.0
    scores[..., 1::5] = -0.0  # below 0.0 (IEEE total order, as jax.lax.top_k)
    scores[..., 2::7] = 0.75
    return scores


def check_keep_top(B, K, P, count, pads, interpret, seed=0, with_carried=True,
                   block_sizes=None):
    rng = np.random.default_rng(seed)
    scores = scores_with_ties(rng, B, K, P)
    carried = rng.uniform(size=(B, K, P)).astype(np.float32) if with_carried else None
    valid = np.arange(P)[None, :] >= np.asarray(pads)[:, None]
    want = keep_top(scores, carried, valid, count, implementation="xla")
    got = keep_top(scores, carried, valid, count, implementation="pallas", interpret=interpret,
                   block_sizes=block_sizes)
    assert got[0].dtype == jnp.int32 and got[0].shape == (B, K, count)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    if with_carried:
        np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
    else:
        assert got[1] is None


# (B, K, P, count, pads, interpret mode)
FAST = (
    (1, 1, 3, 2, (1,), "tpu"),  # S = 3: one valid candidate, one pad kept
    (2, 2, 2160, 2112, (0, 700), "tpu"),  # the decode shape, heavy ties, few dropped
    (2, 1, 1000, 100, (0, 950), "generic"),  # many dropped; too few valid candidates
)


@pytest.mark.parametrize("case", FAST, ids=lambda c: f"P{c[2]}-count{c[3]}-{c[5]}")
def test_keep_top_matches_reference(case):
    B, K, P, count, pads, mode = case
    check_keep_top(B, K, P, count, pads, INTERPRET_MODES[mode])


def test_ties_go_to_the_lowest_index_in_both_implementations():
    scores = np.array([[[1.0, -0.0, 2.0, 0.0, 0.0, 2.0, 0.0, -np.inf, 0.0]]], np.float32)
    valid = np.array([[True] * 6 + [False, True, True]])
    for implementation in ("xla", "pallas"):
        kept, _ = keep_top(scores, None, valid, 5, implementation=implementation,
                           interpret=True)
        # 2.0 (slots 2, 5), 1.0 (slot 0), then the first two 0.0 (slots 3, 4): slot 6 is
        # invalid, and -0.0 (slot 1) ranks below 0.0 in the total order of jax.lax.top_k.
        assert np.asarray(kept).tolist() == [[[0, 2, 3, 4, 5]]], implementation
    # Too few valid candidates: invalid ones (-inf) are kept, lowest index first.
    for implementation in ("xla", "pallas"):
        kept, _ = keep_top(scores, None, np.zeros((1, 9), bool), 5,
                           implementation=implementation, interpret=True)
        assert np.asarray(kept).tolist() == [[[0, 1, 2, 3, 4]]], implementation


def numpy_keep_top(scores, valid, count):
    """The documented order, written independently: valid real scores (-inf included; -0.0
    below 0.0), then valid NaN scores, then invalid candidates; ties to the lowest slot."""
    B, K, P = scores.shape
    kept = np.zeros((B, K, count), np.int64)
    for b in range(B):
        for k in range(K):
            def rank(j, b=b, k=k):
                x = float(scores[b, k, j])
                if not valid[b, j]:
                    return (0, 0.0, 0, j)
                if np.isnan(x):
                    return (1, 0.0, 0, j)
                return (2, -x, 1 if np.signbit(x) else 0, j)
            order = sorted(range(P), key=lambda j: (-rank(j)[0], *rank(j)[1:]))
            kept[b, k] = sorted(order[:count])
    return kept


def nan_scores(rng, B, K, P):
    """Scores with NaN of both signs and payloads at valid rows, -inf, and ties."""
    scores = scores_with_ties(rng, B, K, P)
    scores[..., 3::4] = np.nan
    scores[..., 6::9] = -np.nan
    scores[..., 10::11] = np.float32(np.uint32(0x7FC0_0123).view(np.float32))  # a payload
    scores[..., 8::13] = -np.inf
    return scores


@pytest.mark.parametrize("mode", ["xla", "tpu", "generic", "gpu"])
def test_nan_scores_rank_below_every_real_score(mode):
    rng = np.random.default_rng(7)
    B, K, P = 2, 2, 150
    scores = nan_scores(rng, B, K, P)
    carried = rng.uniform(size=(B, K, P)).astype(np.float32)
    valid = np.arange(P)[None, :] >= np.array([0, 40])[:, None]
    interpret = {"tpu": TPU_INTERPRET, "generic": True, "gpu": "gpu"}.get(mode)
    implementation = "xla" if mode == "xla" else "pallas"
    # One count that cuts row 0 among its NaN scores and row 1 among its invalid candidates.
    count = P - 20
    assert (~np.isnan(scores[0])).sum(-1).max() < count and valid[1].sum() < count
    kept, got_carried = keep_top(scores, carried, valid, count,
                                 implementation=implementation, interpret=interpret)
    want = numpy_keep_top(scores, valid, count)
    np.testing.assert_array_equal(np.asarray(kept), want)
    want_carried = np.where(valid[:, None, :], carried, np.nan)
    np.testing.assert_array_equal(np.asarray(got_carried),
                                  np.take_along_axis(want_carried, want, -1))
    # All NaN: the valid rows first, then the invalid ones, lowest slots first.
    kept, _ = keep_top(np.full((1, 1, 6), np.nan, np.float32), None,
                       np.array([[False, True, True, False, True, True]]), 5,
                       implementation=implementation, interpret=interpret)
    assert np.asarray(kept).tolist() == [[[0, 1, 2, 4, 5]]]


def cache(rng, B, K, S, H, dtype):
    keys = rng.normal(size=(B, K, S, H)).astype(np.float32)
    positions = np.broadcast_to(np.arange(S, dtype=np.int32), (B, K, S)).copy()
    positions[:, :, :3] = -1  # empty slots ...
    keys[:, :, :3] = np.nan  # ... holding NaN, which must not leak into kept rows
    values = rng.normal(size=(B, K, S, H)).astype(np.float32)
    score = rng.uniform(size=(B, K, S)).astype(np.float32)
    return (jnp.asarray(keys, dtype), jnp.asarray(values, dtype), jnp.asarray(positions),
            jnp.asarray(score))


def check_compact(B, K, S, H, W, count, dtype, interpret, block_sizes, seed=0):
    rng = np.random.default_rng(seed)
    keys, values, positions, score = cache(rng, B, K, S, H, dtype)
    scores = rng.normal(size=(B, K, S - W)).astype(np.float32)
    kept, _ = keep_top(scores, None, np.ones((B, S - W), bool), count, implementation="xla")
    active = jnp.asarray(np.arange(B) % 3 != 1)
    new_score = jnp.asarray(rng.uniform(size=(B, K, count)).astype(np.float32))
    replace = jnp.asarray(np.arange(B) % 2 == 0)
    kwargs = dict(window=W, active=active, new_score=new_score, replace_score=replace)
    want = compact(keys, values, positions, score, kept, implementation="xla", **kwargs)
    got = compact(keys, values, positions, score, kept, implementation="pallas",
                  interpret=interpret, block_sizes=block_sizes, **kwargs)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
    # Kept rows are exact; NaN of empty slots becomes 0 (only where an empty slot is kept).
    np.testing.assert_array_equal(np.asarray(got[0], np.float32),
                                  np.nan_to_num(np.asarray(want[0], np.float32)))
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
    np.testing.assert_array_equal(np.asarray(got[2]), np.asarray(want[2]))
    np.testing.assert_array_equal(np.asarray(got[3]), np.asarray(want[3]))
    return kept, got


def test_compact_matches_reference():
    """S = 3, inactive sequences, new scores for some (larger S: the slow sweep)."""
    check_compact(3, 2, 3, 64, 1, 1, "float32", TPU_INTERPRET, BlockSizes(256, 128))


def test_compact_in_place_with_donation():
    """Decode shape (S = budget + 128); blocks tile S, so TPU interpret mode aliases too."""
    B, K, S, H, W, count = 2, 1, 2176, 128, 16, 2112
    rng = np.random.default_rng(1)
    keys, values, positions, score = cache(rng, B, K, S, H, jnp.bfloat16)
    kept, _ = keep_top(rng.normal(size=(B, K, S - W)).astype(np.float32), None,
                       np.ones((B, S - W), bool), count, implementation="xla")
    want = jax.tree.map(np.asarray, compact(keys, values, positions, score, kept, window=W,
                                            implementation="xla"))
    step = jax.jit(functools.partial(compact, window=W, implementation="pallas",
                                     interpret=TPU_INTERPRET, block_sizes=BlockSizes(128, 128)),
                   donate_argnums=(0, 1, 2, 3))
    hlo = step.lower(keys, values, positions, score, kept).as_text()
    assert hlo.count("tf.aliasing_output") == 4  # every cache array is reused
    got = step(keys, values, positions, score, kept)
    assert keys.is_deleted() and values.is_deleted()
    np.testing.assert_array_equal(np.asarray(got[0], np.float32),
                                  np.nan_to_num(want[0].astype(np.float32)))
    np.testing.assert_array_equal(np.asarray(got[1]), want[1])
    np.testing.assert_array_equal(np.asarray(got[2]), want[2])
    np.testing.assert_array_equal(np.asarray(got[3]), want[3])


@pytest.mark.slow
@pytest.mark.parametrize("P", (3, 127, 128, 513, 2160))
@pytest.mark.parametrize("dropped", (0, 1, 128, None))
def test_keep_top_sweep(P, dropped):
    count = max(1, P // 3) if dropped is None else max(1, P - dropped)
    check_keep_top(3, 2, P, count, (0, P // 2, P - 1), True, seed=P)
    check_keep_top(1, 1, P, count, (0,), True, seed=P + 1, with_carried=False)


@pytest.mark.slow
@pytest.mark.parametrize("S", (3, 127, 128, 513, 2176))
@pytest.mark.parametrize("H, dtype", [(64, "float32"), (128, "bfloat16")])
def test_compact_sweep(S, H, dtype):
    W = min(16, S - 1)
    count = max(1, min(S - W, S - W - 128 if S > 256 else (S - W) // 2))
    check_compact(3, 2, S, H, W, count, dtype, True, BlockSizes(256, 128), seed=S)
