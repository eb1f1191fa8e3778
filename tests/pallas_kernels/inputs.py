"""Inputs shared by the kernel tests: awkward shapes, left pads, NaN in empty slots."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import tpu as pltpu

# Interpret modes of the Pallas path on CPU: the TPU interpreter (TPU memory model, NaN in
# uninitialised memory) and the generic one (faster).
TPU_INTERPRET = pltpu.InterpretParams()
INTERPRET_MODES = {"tpu": TPU_INTERPRET, "generic": True}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# The full sweep of the acceptance criteria (slow): slots x group size x head dim x dtype.
SWEEP = tuple((S, G, H, dtype) for S in (3, 127, 128, 513, 2176) for G in (1, 2, 7)
              for H in (64, 128) for dtype in ("float32", "bfloat16"))


def case_id(case) -> str:
    return "S{}-G{}-H{}-{}".format(*case)


def pads_for(S: int, B: int) -> tuple[int, ...]:
    """Left pads of each sequence: none for the first, about a third for the others."""
    return (0,) + tuple(min(S - 1, (S // 3) + b) for b in range(1, B))


def make_inputs(seed: int, B: int, K: int, G: int, W: int, S: int, H: int, pads,
                dtype: str = "float32", clustered: bool = False):
    """queries [B, K*G, W, H], keys [B, K, S, H] (NaN at invalid rows) in `dtype`, valid
    [B, S]. `clustered` draws keys and queries around a few directions, as real keys are
    (many near-duplicates, peaked attention)."""
    rng = np.random.default_rng(seed)
    if clustered:
        centres = rng.normal(size=(B, K, 24, H)) * 2.0
        keys = np.take_along_axis(centres, rng.integers(0, 24, (B, K, S))[..., None], axis=2)
        keys = keys + rng.normal(size=(B, K, S, H)) * 0.7
        queries = rng.normal(size=(B, K * G, W, H)) * 0.4
        queries += centres[:, :, :G].reshape(B, K * G, 1, H) * 0.15  # G <= 24
    else:
        keys = rng.normal(size=(B, K, S, H))
        queries = rng.normal(size=(B, K * G, W, H))
    valid = np.arange(S)[None, :] >= np.asarray(pads)[:, None]
    keys = np.where(valid[:, None, :, None], keys, np.nan)
    jdtype = DTYPES[dtype]
    return (jnp.asarray(queries.astype(np.float32), jdtype),
            jnp.asarray(keys.astype(np.float32), jdtype), jnp.asarray(valid))


def history(seed: int, B: int, K: int, C: int):
    """A global score with some rows without history (NaN)."""
    rng = np.random.default_rng(seed)
    score = rng.uniform(0.0, 1.0, size=(B, K, C)).astype(np.float32)
    score[:, :, ::3] = np.nan
    return jnp.asarray(score)


def boundary_is_clear(scores, valid, count: int, tol: float) -> bool:
    """True when no score lies within `tol` (relative to the count-th best score t, or to the
    largest |score| when t is 0) of t without being equal to it (exact ties are fine: both
    implementations break them by lowest index)."""
    scores = np.where(np.asarray(valid)[:, None, :], np.asarray(scores, np.float64), -np.inf)
    for row in scores.reshape(-1, scores.shape[-1]):
        finite = row[np.isfinite(row)]
        if finite.size <= count:
            continue
        t = np.sort(finite)[::-1][count - 1]
        close = np.abs(finite - t) < tol * (abs(t) or np.abs(finite).max())
        if np.any(close & (finite != t)):
            return False
    return True
