"""Score update: local attention score A of the window, its normalisation, the global score.

docs/algorithm.md section 4 (A, Â, G), for all KV heads of a layer at once. `reference.py`
is the float32 specification (gkv_jax.eviction's functions), `pallas.py` the Mosaic TPU
kernel, `pallas_gpu.py` the Mosaic GPU kernel; `score_update` validates its inputs once and
dispatches on `implementation` (see `_common.resolve_implementation`).
"""

from __future__ import annotations

from typing import Any

from jaxtyping import Array, Bool, Float

from gkv_jax.pallas_kernels import _common
from gkv_jax.pallas_kernels.score_update import pallas, pallas_gpu, reference
from gkv_jax.pallas_kernels.score_update.pallas import BlockSizes
from gkv_jax.pallas_kernels.score_update.pallas_gpu import BlockSizes as GpuBlockSizes

__all__ = ["BlockSizes", "GpuBlockSizes", "score_update", "score_update_on"]


def score_update(
    queries: Float[Array, "B N W H"],
    keys: Float[Array, "B K S H"],
    valid: Bool[Array, "B S"],
    global_score: Float[Array, "B K C"] | None = None,
    *,
    normalise: bool = True,
    smooth: str = "max",
    alpha: float = 0.8,
    implementation: str | None = None,
    matmul_dtype: str = "float32",
    block_sizes: BlockSizes | GpuBlockSizes | None = None,
    interpret: Any = None,
) -> Float[Array, "B K S-W"]:
    """The local score A, or the global score G, of the S - W oldest rows of each KV head.

    A[b, k, j] is the attention probability of the W window queries on row j (window query i
    sits at row S - W + i, causal inside the window; invalid keys masked; softmax over S),
    maximised over the query heads of KV head k's group and averaged over the W queries.
    With `normalise`, Â = A / max_j A (per sequence and head), and G = Â where a row has no
    history, else max(alpha G_prev, Â) ("max"), alpha G_prev + (1 - alpha) Â ("mean") or
    alpha G_prev + Â ("sum").

    Args:
      queries: [B, N, W, H] the last W queries, post-RoPE, oldest first; N = G * K.
      keys: [B, K, S, H] post-RoPE keys, the window rows last; invalid rows may hold
        anything (NaN included).
      valid: [B, S] bool, False for pads and empty slots.
      global_score: [B, K, C] (C <= S - W) history of rows 0..C-1, NaN = no history; None =
        no row has history. Needs `normalise`.
      normalise: False returns A itself (snapkv, rkv); True returns G.
      smooth, alpha: the global-score update ("max" | "mean" | "sum").
      implementation: "xla" (reference), "pallas", or None (auto: Pallas on a backend of
        `_common.VERIFIED_BACKENDS`, the reference elsewhere).
      matmul_dtype: "float32" (exact) or "bfloat16" operands of q.k (float32 accumulation);
        Pallas only (the reference is float32).
      block_sizes: the kernel's tiling (`BlockSizes` for the TPU kernel, `GpuBlockSizes` for
        the GPU one).
      interpret: the Pallas interpret mode (see `_common.resolve_implementation`).

    Returns:
      [B, K, S - W] float32, 0 at invalid rows.

    >>> import jax.numpy as jnp
    >>> q, k = jnp.zeros((1, 2, 2, 8)), jnp.ones((1, 1, 6, 8))
    >>> valid = jnp.array([[False, True, True, True, True, True]])
    >>> score_update(q, k, valid, implementation="xla").round(3).tolist()
    [[[0.0, 1.0, 1.0, 1.0]]]
    """
    _common.validate_score_update(queries, keys, valid, global_score, normalise, smooth, alpha)
    _common.check_matmul_dtype(matmul_dtype)
    dispatch = _common.resolve_implementation(implementation, interpret)
    return score_update_on(dispatch, queries, keys, valid, global_score, normalise=normalise,
                           smooth=smooth, alpha=alpha, matmul_dtype=matmul_dtype,
                           block_sizes=block_sizes)


def score_update_on(
    dispatch: _common.Dispatch,
    queries: Float[Array, "B N W H"],
    keys: Float[Array, "B K S H"],
    valid: Bool[Array, "B S"],
    global_score: Float[Array, "B K C"] | None = None,
    *,
    normalise: bool = True,
    smooth: str = "max",
    alpha: float = 0.8,
    matmul_dtype: str = "float32",
    block_sizes: BlockSizes | GpuBlockSizes | None = None,
) -> Float[Array, "B K S-W"]:
    """`score_update` on an already resolved backend, the inputs not validated again (for
    a caller that validated them: `Ops` inside `gkv_jax.eviction.select`)."""
    if not dispatch.use_pallas:
        return reference.score_update(queries, keys, valid, global_score, normalise=normalise,
                                      smooth=smooth, alpha=alpha)
    kernels = pallas_gpu if dispatch.kernels == "gpu" else pallas
    _common.check_block_sizes(block_sizes, kernels.BlockSizes)
    return kernels.score_update(queries, keys, valid, global_score, normalise=normalise,
                               smooth=smooth, alpha=float(alpha), matmul_dtype=matmul_dtype,
                               block_sizes=block_sizes, interpret=dispatch.interpret)
