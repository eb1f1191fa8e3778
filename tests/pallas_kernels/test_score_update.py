"""The score-update kernel against its float32 reference."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from gkv_jax.pallas_kernels.score_update import BlockSizes, score_update
from tests.pallas_kernels.inputs import (
    INTERPRET_MODES,
    SWEEP,
    case_id,
    history,
    make_inputs,
    pads_for,
)


def check(S, G, H, dtype, interpret, *, W=4, B=2, K=2, normalise=True, smooth="max",
          with_history=True, block_sizes=None, seed=0):
    W = min(W, S - 1)
    queries, keys, valid = make_inputs(seed + S + G, B, K, G, W, S, H, pads_for(S, B), dtype)
    gs = history(seed, B, K, max(1, (S - W) // 2)) if normalise and with_history else None
    kwargs = dict(normalise=normalise, smooth=smooth)
    want = score_update(queries, keys, valid, gs, implementation="xla", **kwargs)
    got = score_update(queries, keys, valid, gs, implementation="pallas", interpret=interpret,
                       block_sizes=block_sizes, **kwargs)
    assert got.shape == (B, K, S - W) and got.dtype == jnp.float32
    assert not np.isnan(np.asarray(got)).any()
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-7)


# (S, G, H, dtype, interpret mode, block_s): S = 3, 127, 128 with G = 1, 2, 7, several tiles.
FAST = (
    (3, 1, 64, "float32", "tpu", 1024),
    (127, 7, 64, "bfloat16", "tpu", 1024),
    (300, 2, 64, "float32", "generic", 128),  # 3 tiles, the last partial
)


@pytest.mark.parametrize("case", FAST, ids=lambda c: "S{}-G{}-H{}-{}-{}".format(*c[:5]))
def test_matches_reference(case):
    S, G, H, dtype, mode, block_s = case
    check(S, G, H, dtype, INTERPRET_MODES[mode], block_sizes=BlockSizes(block_s))


@pytest.mark.slow
@pytest.mark.parametrize("smooth", ("mean", "sum"))
def test_smoothing_modes_match_reference(smooth):
    check(130, 2, 64, "float32", True, smooth=smooth, block_sizes=BlockSizes(128))


@pytest.mark.slow
def test_local_score_without_normalisation_matches_reference():
    check(130, 7, 64, "float32", True, normalise=False, block_sizes=BlockSizes(128))


@pytest.mark.slow
def test_window_of_one_and_no_history():
    check(127, 2, 64, "bfloat16", True, W=1, with_history=False)


@pytest.mark.slow
def test_bfloat16_matmul_mode_is_close():
    queries, keys, valid = make_inputs(3, 2, 2, 2, 4, 200, 64, (0, 50), clustered=True)
    want = score_update(queries, keys, valid, implementation="xla")
    got = score_update(queries, keys, valid, implementation="pallas", interpret=True,
                       matmul_dtype="bfloat16")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=0.05)


@pytest.mark.slow
@pytest.mark.parametrize("case", SWEEP, ids=case_id)
def test_sweep_matches_reference(case):
    S, G, H, dtype = case
    check(S, G, H, dtype, INTERPRET_MODES["generic"], W=16, B=2, K=2,
          block_sizes=BlockSizes(512))
