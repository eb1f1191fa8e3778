"""The Mosaic GPU kernels (`*/pallas_gpu.py`) against their references.

Three levels:
  * GPU interpret mode on CPU (`interpret="gpu"`): values, for every op (fast subset here, the
    sweep under `slow`);
  * lowering to Mosaic GPU for the "cuda" platform, which works without a GPU: the kernels are
    accepted by the Mosaic GPU lowering (layouts, supported primitives) and become
    `mosaic_gpu` custom calls; the compaction aliases the cache in place;
  * `gpu`-marked tests (skipped unless JAX's backend is a GPU): compiled on the device,
    parity with the reference, and the compiled program contains the kernels.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gkv_jax.eviction import select, select_with_ops
from gkv_jax.pallas_kernels import (
    InterpretGPUParams,
    Ops,
    resolve_implementation,
)
from gkv_jax.pallas_kernels.redundancy import GpuBlockSizes as RedundancyBlocks
from gkv_jax.pallas_kernels.redundancy import pallas_gpu as redundancy_gpu
from gkv_jax.pallas_kernels.redundancy import redundancy
from gkv_jax.pallas_kernels.score_update import BlockSizes as TpuScoreBlocks
from gkv_jax.pallas_kernels.score_update import GpuBlockSizes as ScoreBlocks
from gkv_jax.pallas_kernels.score_update import pallas_gpu as score_update_gpu
from gkv_jax.pallas_kernels.score_update import score_update
from gkv_jax.pallas_kernels.topk_retention import GpuBlockSizes as TopkBlocks
from gkv_jax.pallas_kernels.topk_retention import compact, keep_top
from gkv_jax.pallas_kernels.topk_retention import pallas_gpu as topk_gpu
from tests.pallas_kernels import test_redundancy, test_score_update, test_topk_retention
from tests.pallas_kernels.inputs import history, make_inputs
from tests.pallas_kernels.test_select import config, tie_free_inputs
from tests.pallas_kernels.test_topk_retention import cache, scores_with_ties

GPU = "gpu"  # the `interpret` value that runs the GPU kernels in GPU interpret mode

# The sweep of the acceptance criteria (slow): slots x group size x head dim x dtype.
SWEEP = tuple((S, G, H, dtype) for S in (3, 127, 128, 513) for G in (1, 2, 7)
              for H in (64, 128) for dtype in ("float32", "bfloat16"))


def sweep_id(case) -> str:
    return "S{}-G{}-H{}-{}".format(*case)


# ------------------------------------------------------------------------------- dispatch


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU dispatch rules")
def test_dispatch_selects_gpu_kernels_only_when_asked_on_cpu():
    gpu = resolve_implementation("pallas", GPU)
    assert gpu.use_pallas and gpu.kernels == "gpu"
    assert isinstance(gpu.interpret, InterpretGPUParams)
    params = InterpretGPUParams(uninitialized_memory="zero")
    assert resolve_implementation("pallas", params).interpret is params
    assert resolve_implementation("pallas").kernels == "tpu"  # CPU default: TPU interpret
    assert not resolve_implementation(None, GPU).use_pallas  # auto: the reference off TPU/GPU
    assert not resolve_implementation("xla", GPU).use_pallas
    with pytest.raises(ValueError, match="interpret"):
        resolve_implementation("pallas", "cuda")


def test_block_sizes_must_match_the_kernels():
    queries, keys, valid = make_inputs(0, 1, 1, 1, 2, 8, 64, (0,))
    with pytest.raises(TypeError, match="block sizes"):
        score_update(queries, keys, valid, implementation="pallas", interpret=GPU,
                     block_sizes=TpuScoreBlocks())
    with pytest.raises(ValueError, match="multiple of 64"):
        ScoreBlocks(block_s=96)


# ----------------------------------------------------------- GPU interpret mode: fast subset


# (S, G, H, dtype, block_s): S = 3 and 127 with G = 1 and 7, left pads and NaN in the empty
# slots (make_inputs), several tiles with the last one partial.
SCORE_FAST = (
    (3, 1, 64, "float32", 64),
    (127, 7, 64, "bfloat16", 64),
    (130, 2, 128, "float32", 64),  # 3 tiles, padded to 192
)


@pytest.mark.parametrize("case", SCORE_FAST, ids=lambda c: "S{}-G{}-H{}-{}".format(*c[:4]))
def test_score_update_matches_reference(case):
    S, G, H, dtype, block_s = case
    test_score_update.check(S, G, H, dtype, GPU, block_sizes=ScoreBlocks(block_s))


def test_score_update_bfloat16_matmul_is_close():
    queries, keys, valid = make_inputs(3, 2, 2, 2, 4, 128, 64, (0, 50),
                                                         clustered=True)
    want = score_update(queries, keys, valid, implementation="xla")
    got = score_update(queries, keys, valid, implementation="pallas", interpret=GPU,
                       matmul_dtype="bfloat16")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=0.05)


# (S, H, dtype, (block_rows, block_cols)); clustered keys: many near-duplicates.
REDUNDANCY_FAST = (
    (3, 64, "float32", (64, 64)),
    (128, 64, "bfloat16", (64, 64)),  # 2 x 2 tiles
)


@pytest.mark.parametrize("case", REDUNDANCY_FAST, ids=lambda c: "S{}-H{}-{}".format(*c[:3]))
def test_redundancy_matches_reference(case):
    S, H, dtype, blocks = case
    test_redundancy.check(S, H, dtype, GPU, block_sizes=RedundancyBlocks(*blocks))


def check_keep_top(B, K, P, count, pads, block_p=2048, seed=0, with_carried=True):
    test_topk_retention.check_keep_top(B, K, P, count, pads, GPU, seed=seed,
                                       with_carried=with_carried,
                                       block_sizes=TopkBlocks(block_p=block_p))


# (B, K, P, count, pads, block_p)
KEEP_TOP_FAST = (
    (1, 1, 3, 2, (1,), 2048),  # S = 3: one valid candidate, one pad kept
    (2, 2, 300, 200, (0, 100), 128),  # three chunks, the last partial
    (2, 1, 1000, 100, (0, 950), 2048),  # many dropped; too few valid candidates
)


@pytest.mark.parametrize("case", KEEP_TOP_FAST, ids=lambda c: f"P{c[2]}-count{c[3]}")
def test_keep_top_matches_reference(case):
    B, K, P, count, pads, block_p = case
    check_keep_top(B, K, P, count, pads, block_p)


def test_keep_top_ties_go_to_the_lowest_index():
    scores = np.array([[[1.0, -0.0, 2.0, 0.0, 0.0, 2.0, 0.0, -np.inf, 0.0]]], np.float32)
    valid = np.array([[True] * 6 + [False, True, True]])
    kept, _ = keep_top(scores, None, valid, 5, implementation="pallas", interpret=GPU)
    assert np.asarray(kept).tolist() == [[[0, 2, 3, 4, 5]]]
    kept, _ = keep_top(scores, None, np.zeros((1, 9), bool), 5, implementation="pallas",
                       interpret=GPU)
    assert np.asarray(kept).tolist() == [[[0, 1, 2, 3, 4]]]


def check_compact(B, K, S, H, W, count, dtype, block_rows=64, seed=0):
    """Active / inactive sequences, new scores for some; NaN in empty slots is copied as the
    reference copies it (bit for bit)."""
    rng = np.random.default_rng(seed)
    keys, values, positions, score = cache(rng, B, K, S, H, dtype)
    scores = rng.normal(size=(B, K, S - W)).astype(np.float32)
    kept, _ = keep_top(scores, None, np.ones((B, S - W), bool), count, implementation="xla")
    kwargs = dict(window=W, active=jnp.asarray(np.arange(B) % 3 != 1),
                  new_score=jnp.asarray(rng.uniform(size=(B, K, count)).astype(np.float32)),
                  replace_score=jnp.asarray(np.arange(B) % 2 == 0))
    want = compact(keys, values, positions, score, kept, implementation="xla", **kwargs)
    got = compact(keys, values, positions, score, kept, implementation="pallas", interpret=GPU,
                  block_sizes=TopkBlocks(block_rows=block_rows), **kwargs)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


def test_compact_matches_reference():
    check_compact(3, 2, 3, 64, 1, 1, "float32")


def test_compact_blocks_and_tail_match_reference():
    check_compact(2, 1, 150, 64, 16, 70, "bfloat16", block_rows=64)  # 2 blocks + a tail


def test_compact_rows_unfit_for_tma_are_gathered_by_xla():
    check_compact(2, 1, 20, 8, 4, 8, "float32")  # rows of 32 bytes


# Slow: each GPU kernel is checked against its reference in the fast suite; this chains them.
@pytest.mark.slow
def test_select_on_gpu_kernels_matches_reference():
    """`select_with_ops` (score update, redundancy, top-k) in GPU interpret mode."""
    cfg = config("gkv", 40, 4)
    queries, keys, valid, gs = tie_free_inputs(cfg, 1, 2, 2, 60, 64, (0,))
    want = select(dataclasses.replace(cfg, implementation="xla"), queries, keys, valid, gs)
    got = select_with_ops(cfg, Ops.resolve("pallas", GPU), queries, keys, valid, gs)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=1e-5, atol=1e-7)


# ------------------------------------------------- lowering to Mosaic GPU (no GPU needed)


def lower_for_cuda(fun, *args, **jit_kwargs) -> str:
    """StableHLO text of `fun` lowered for the "cuda" platform (runs the Mosaic GPU lowering
    of every kernel on this machine). The `pallas_gpu` modules are called directly: off a
    GPU, the dispatch never compiles the GPU kernels."""
    return jax.jit(fun, **jit_kwargs).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def decode_inputs(dtype="bfloat16"):
    """The decode shape of eviction_bench (budget 2048 + 128, W 16, H 128, G 7), batch 1."""
    return make_inputs(0, 1, 2, 7, 16, 2176, 128, (0,), dtype)


def test_score_update_and_redundancy_lower_to_mosaic_gpu():
    queries, keys, valid = decode_inputs()
    previous = jnp.zeros((1, 2, 2032), jnp.float32)
    for matmul_dtype in ("float32", "bfloat16"):
        text = lower_for_cuda(functools.partial(score_update_gpu.score_update,
                                                matmul_dtype=matmul_dtype),
                              queries, keys, valid, previous)
        assert text.count("custom_call @mosaic_gpu") == 1
        text = lower_for_cuda(functools.partial(redundancy_gpu.redundancy, threshold=0.5,
                                                matmul_dtype=matmul_dtype), keys, valid)
        assert text.count("custom_call @mosaic_gpu") == 1


def test_top_k_lowers_to_mosaic_gpu_and_compacts_in_place():
    scores = jnp.zeros((1, 2, 2160), jnp.float32)
    valid = jnp.ones((1, 2160), bool)
    text = lower_for_cuda(functools.partial(topk_gpu.keep_top, count=2032), scores, scores,
                          valid)
    assert text.count("custom_call @mosaic_gpu") == 1
    keys = jnp.zeros((1, 2, 2176, 128), jnp.bfloat16)
    kept = jnp.zeros((1, 2, 2032), jnp.int32)
    text = lower_for_cuda(functools.partial(topk_gpu.compact, window=16), keys, keys,
                          jnp.zeros((1, 2, 2176), jnp.int32), jnp.zeros((1, 2, 2176)), kept,
                          donate_argnums=(0, 1, 2, 3))
    assert text.count("custom_call @mosaic_gpu") == 1
    assert "output_operand_aliases" in text  # keys and values written in place
    assert text.count("tf.aliasing_output") == 4  # every cache array is reused


# ----------------------------------------------------------------------------- slow sweep


@pytest.mark.slow
@pytest.mark.parametrize("case", SWEEP, ids=sweep_id)
def test_score_update_sweep(case):
    S, G, H, dtype = case
    test_score_update.check(S, G, H, dtype, GPU, W=16, block_sizes=ScoreBlocks(128))


@pytest.mark.slow
@pytest.mark.parametrize("smooth", ("mean", "sum"))
def test_score_update_smoothing_modes(smooth):
    test_score_update.check(130, 2, 64, "float32", GPU, smooth=smooth)


@pytest.mark.slow
def test_score_update_local_score_and_no_history():
    test_score_update.check(130, 7, 64, "float32", GPU, normalise=False)
    test_score_update.check(127, 2, 64, "bfloat16", GPU, W=1, with_history=False)


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in SWEEP if c[1] == 1], ids=sweep_id)
def test_redundancy_sweep(case):
    S, _, H, dtype = case
    test_redundancy.check(S, H, dtype, GPU, block_sizes=RedundancyBlocks(128, 128))


@pytest.mark.slow
@pytest.mark.parametrize("threshold", (-0.2, 0.9))
def test_redundancy_other_thresholds(threshold):
    test_redundancy.check(200, 64, "float32", GPU, threshold=threshold)


@pytest.mark.slow
@pytest.mark.parametrize("P", (3, 127, 128, 513, 2160))
@pytest.mark.parametrize("dropped", (0, 1, 128, None))
def test_keep_top_sweep(P, dropped):
    count = max(1, P // 3) if dropped is None else max(1, P - dropped)
    check_keep_top(3, 2, P, count, (0, P // 2, P - 1), block_p=512, seed=P)
    check_keep_top(1, 1, P, count, (0,), seed=P + 1, with_carried=False)


@pytest.mark.slow
@pytest.mark.parametrize("S", (3, 127, 128, 513))
@pytest.mark.parametrize("H, dtype", [(64, "float32"), (128, "bfloat16")])
def test_compact_sweep(S, H, dtype):
    W = min(16, S - 1)
    count = max(1, min(S - W, S - W - 128 if S > 256 else (S - W) // 2))
    check_compact(3, 2, S, H, W, count, dtype, seed=S)


# ------------------------------------------------------------------- on a GPU (compiled)


def compiled_text(fun, *args, **jit_kwargs) -> str:
    return jax.jit(fun, **jit_kwargs).lower(*args).compile().as_text()


@pytest.mark.gpu
def test_gpu_dispatch_runs_the_mosaic_kernels():
    from gkv_jax.pallas_kernels._common import gpu_compute_capability

    assert jax.default_backend() == "gpu"
    dispatch = resolve_implementation("pallas")
    assert dispatch.use_pallas and dispatch.kernels == "gpu" and dispatch.interpret is False
    from gkv_jax.pallas_kernels._common import VERIFIED_BACKENDS

    expected_auto = "gpu" in VERIFIED_BACKENDS and gpu_compute_capability() >= 9.0
    assert resolve_implementation(None).use_pallas == expected_auto


@pytest.mark.gpu
@pytest.mark.parametrize("matmul_dtype", ("float32", "bfloat16"))
def test_gpu_score_update_and_redundancy_compile_and_match(matmul_dtype):
    queries, keys, valid = make_inputs(0, 2, 2, 7, 16, 2176, 128,
                                                         (0, 700), "bfloat16", clustered=True)
    previous = history(0, 2, 2, 2032)
    op = functools.partial(score_update, implementation="pallas", matmul_dtype=matmul_dtype)
    assert "mosaic_gpu" in compiled_text(op, queries, keys, valid, previous)
    want = score_update(queries, keys, valid, previous, implementation="xla")
    atol = 2e-6 if matmul_dtype == "float32" else 0.05
    np.testing.assert_allclose(np.asarray(op(queries, keys, valid, previous)),
                               np.asarray(want), rtol=1e-4, atol=atol)
    op = functools.partial(redundancy, threshold=0.5, implementation="pallas",
                           matmul_dtype=matmul_dtype)
    assert "mosaic_gpu" in compiled_text(op, keys, valid)
    want = redundancy(keys, valid, 0.5, implementation="xla")
    got = op(keys, valid)
    if matmul_dtype == "float32":
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-9)
    else:  # near-duplicates may cross the threshold: compare the bulk
        assert np.mean(np.isclose(np.asarray(got), np.asarray(want), rtol=0.05)) > 0.95


@pytest.mark.gpu
def test_gpu_top_k_compiles_and_matches():
    rng = np.random.default_rng(0)
    scores = scores_with_ties(rng, 4, 4, 2160)
    carried = rng.uniform(size=(4, 4, 2160)).astype(np.float32)
    valid = np.arange(2160)[None, :] >= np.array([0, 10, 700, 2000])[:, None]
    op = functools.partial(keep_top, count=2032, implementation="pallas")
    assert "mosaic_gpu" in compiled_text(op, scores, carried, valid)
    got = op(scores, carried, valid)
    want = keep_top(scores, carried, valid, 2032, implementation="xla")
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))


@pytest.mark.gpu
def test_gpu_compact_in_place_with_donation():
    B, K, S, H, W, count = 2, 4, 2176, 128, 16, 2032
    rng = np.random.default_rng(1)
    keys, values, positions, score = cache(rng, B, K, S, H, jnp.bfloat16)
    kept, _ = keep_top(rng.normal(size=(B, K, S - W)).astype(np.float32), None,
                       np.ones((B, S - W), bool), count, implementation="xla")
    want = jax.tree.map(np.asarray, compact(keys, values, positions, score, kept, window=W,
                                            implementation="xla"))
    step = jax.jit(functools.partial(compact, window=W, implementation="pallas"),
                   donate_argnums=(0, 1, 2, 3))
    assert "mosaic_gpu" in step.lower(keys, values, positions, score, kept).compile().as_text()
    got = step(keys, values, positions, score, kept)
    assert keys.is_deleted() and values.is_deleted()
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g, np.float32), w.astype(np.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("policy", ("snapkv", "rkv", "h2o", "gkv"))
def test_gpu_select_matches_reference(policy):
    cfg = config(policy, 2048, 16)
    queries, keys, valid, gs = tie_free_inputs(cfg, 2, 4, 7, 2176, 128, (0, 300))
    want = select(dataclasses.replace(cfg, implementation="xla"), queries, keys, valid, gs)
    got = select(dataclasses.replace(cfg, implementation="pallas"), queries, keys, valid, gs)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    if want[1] is not None:
        np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=1e-4,
                                   atol=1e-6)
