"""The tiled redundancy kernel against its float32 reference (which builds S x S)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from gkv_jax.pallas_kernels.redundancy import BlockSizes, redundancy
from tests.pallas_kernels.inputs import INTERPRET_MODES, SWEEP, case_id, make_inputs, pads_for


def check(S, H, dtype, interpret, *, threshold=0.5, B=2, K=2, block_sizes=None,
          clustered=True, seed=0):
    _, keys, valid = make_inputs(seed + S, B, K, 1, 1, S, H, pads_for(S, B), dtype,
                                 clustered=clustered)
    want = redundancy(keys, valid, threshold, implementation="xla")
    got = redundancy(keys, valid, threshold, implementation="pallas", interpret=interpret,
                     block_sizes=block_sizes)
    assert got.shape == (B, K, S) and got.dtype == jnp.float32
    assert not np.isnan(np.asarray(got)).any()
    assert np.all(np.asarray(got)[~np.broadcast_to(np.asarray(valid)[:, None], got.shape)] == 0)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=1e-9)


# (S, H, dtype, interpret mode, (block_rows, block_cols)); clustered keys have many
# near-duplicates, so the "latest similar" correction is exercised across tiles.
FAST = (
    (3, 64, "float32", "tpu", (256, 512)),
    (300, 64, "bfloat16", "generic", (128, 256)),  # 3 x 2 tiles, partial ones
)


@pytest.mark.parametrize("case", FAST, ids=lambda c: "S{}-H{}-{}-{}".format(*c[:4]))
def test_matches_reference(case):
    S, H, dtype, mode, blocks = case
    check(S, H, dtype, INTERPRET_MODES[mode], block_sizes=BlockSizes(*blocks))


@pytest.mark.slow
@pytest.mark.parametrize("threshold", (-0.2, 0.9))
def test_other_thresholds_match_reference(threshold):
    check(200, 64, "float32", True, threshold=threshold, block_sizes=BlockSizes(128, 128))


@pytest.mark.slow
def test_newest_duplicate_survives():
    """Three copies of one key: the newest is the least redundant (docs/algorithm.md section 4)."""
    keys = np.eye(16, dtype=np.float32)[None, None, :10].copy()
    keys[0, 0, [1, 3, 5]] = np.eye(16, dtype=np.float32)[1]
    r = np.asarray(redundancy(jnp.asarray(keys), jnp.ones((1, 10), bool), 0.5,
                              implementation="pallas", interpret=True))[0, 0]
    assert r[1] > r[3] > r[5] and np.isclose(r[5], r[0])


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in SWEEP if c[1] == 1], ids=case_id)
def test_sweep_matches_reference(case):
    S, _, H, dtype = case
    check(S, H, dtype, INTERPRET_MODES["generic"])
