"""The Mosaic TPU kernels (`*/pallas.py`) compiled on a TPU, against their references.

`tpu`-marked and skipped unless JAX's backend is a TPU (elsewhere the kernels are tested in
TPU interpret mode: test_score_update.py, test_redundancy.py, test_topk_retention.py,
test_select.py). Run by `benchmarks/device_check.sh` on a TPU, at the shapes of
R1-Distill-Qwen-7B at budget 2048 (S = 2176 slots, H = 128, group 7), like the `gpu` tests.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gkv_jax.eviction import select
from gkv_jax.pallas_kernels import resolve_implementation
from gkv_jax.pallas_kernels.redundancy import redundancy
from gkv_jax.pallas_kernels.score_update import score_update
from gkv_jax.pallas_kernels.topk_retention import compact, keep_top
from tests.pallas_kernels.inputs import history, make_inputs
from tests.pallas_kernels.test_select import config, tie_free_inputs
from tests.pallas_kernels.test_topk_retention import cache, scores_with_ties

pytestmark = [pytest.mark.tpu,
              pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU backend")]

# The custom call a Mosaic TPU kernel becomes in a compiled program.
MOSAIC_TPU_CALL = "tpu_custom_call"


def compiled_text(fun, *args, **jit_kwargs) -> str:
    return jax.jit(fun, **jit_kwargs).lower(*args).compile().as_text()


def test_tpu_dispatch_compiles_the_kernels():
    dispatch = resolve_implementation("pallas")
    assert dispatch.use_pallas and dispatch.kernels == "tpu" and dispatch.interpret is False


@pytest.mark.parametrize("matmul_dtype", ("float32", "bfloat16"))
def test_tpu_score_update_and_redundancy_compile_and_match(matmul_dtype):
    queries, keys, valid = make_inputs(0, 2, 2, 7, 16, 2176, 128, (0, 700), "bfloat16",
                                       clustered=True)
    previous = history(0, 2, 2, 2032)
    op = functools.partial(score_update, implementation="pallas", matmul_dtype=matmul_dtype)
    assert MOSAIC_TPU_CALL in compiled_text(op, queries, keys, valid, previous)
    want = score_update(queries, keys, valid, previous, implementation="xla")
    atol = 2e-6 if matmul_dtype == "float32" else 0.05
    np.testing.assert_allclose(np.asarray(op(queries, keys, valid, previous)),
                               np.asarray(want), rtol=1e-4, atol=atol)
    op = functools.partial(redundancy, threshold=0.5, implementation="pallas",
                           matmul_dtype=matmul_dtype)
    assert MOSAIC_TPU_CALL in compiled_text(op, keys, valid)
    want = np.asarray(redundancy(keys, valid, 0.5, implementation="xla"))
    got = np.asarray(op(keys, valid))
    if matmul_dtype == "float32":
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-9)
    else:  # near-duplicates may cross the threshold: compare the bulk
        assert np.mean(np.isclose(got, want, rtol=0.05)) > 0.95


def test_tpu_top_k_compiles_and_matches():
    rng = np.random.default_rng(0)
    scores = scores_with_ties(rng, 4, 4, 2160)
    carried = rng.uniform(size=(4, 4, 2160)).astype(np.float32)
    valid = np.arange(2160)[None, :] >= np.array([0, 10, 700, 2000])[:, None]
    op = functools.partial(keep_top, count=2032, implementation="pallas")
    assert MOSAIC_TPU_CALL in compiled_text(op, scores, carried, valid)
    got = op(scores, carried, valid)
    want = keep_top(scores, carried, valid, 2032, implementation="xla")
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))


def test_tpu_compact_in_place_with_donation():
    B, K, S, H, W, count = 2, 4, 2176, 128, 16, 2032
    rng = np.random.default_rng(1)
    keys, values, positions, score = cache(rng, B, K, S, H, jnp.bfloat16)
    kept, _ = keep_top(rng.normal(size=(B, K, S - W)).astype(np.float32), None,
                       np.ones((B, S - W), bool), count, implementation="xla")
    want = jax.tree.map(np.asarray, compact(keys, values, positions, score, kept, window=W,
                                            implementation="xla"))
    step = jax.jit(functools.partial(compact, window=W, implementation="pallas"),
                   donate_argnums=(0, 1, 2, 3))
    assert MOSAIC_TPU_CALL in step.lower(keys, values, positions, score, kept).compile(
    ).as_text()
    got = step(keys, values, positions, score, kept)
    assert keys.is_deleted() and values.is_deleted()
    # Kept rows are exact; the NaN of an empty slot becomes 0 (the TPU kernel's one-hot copy).
    np.testing.assert_array_equal(np.asarray(got[0], np.float32),
                                  np.nan_to_num(want[0].astype(np.float32)))
    for g, w in zip(got[1:], want[1:], strict=True):
        np.testing.assert_array_equal(np.asarray(g, np.float32), w.astype(np.float32))


@pytest.mark.parametrize("policy", ("snapkv", "rkv", "h2o", "gkv"))
def test_tpu_select_matches_reference(policy):
    cfg = config(policy, 2048, 16)
    queries, keys, valid, gs = tie_free_inputs(cfg, 2, 4, 7, 2176, 128, (0, 300))
    want = select(dataclasses.replace(cfg, implementation="xla"), queries, keys, valid, gs)
    got = select(dataclasses.replace(cfg, implementation="pallas"), queries, keys, valid, gs)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    if want[1] is not None:
        np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=1e-4,
                                   atol=1e-6)
