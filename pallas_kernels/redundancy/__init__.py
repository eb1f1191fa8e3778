"""Redundancy: the R-KV key-similarity score, tile by tile (docs/algorithm.md section 4,
redundancy R). `reference.py` is the float32 specification (materialises S x S), `pallas.py` the
Mosaic TPU kernel and `pallas_gpu.py` the Mosaic GPU kernel (neither does); `redundancy`
validates once and dispatches (see `_common.resolve_implementation`)."""

from __future__ import annotations

from typing import Any

from jaxtyping import Array, Bool, Float

from gkv_jax.pallas_kernels import _common
from gkv_jax.pallas_kernels.redundancy import pallas, pallas_gpu, reference
from gkv_jax.pallas_kernels.redundancy.pallas import BlockSizes
from gkv_jax.pallas_kernels.redundancy.pallas_gpu import BlockSizes as GpuBlockSizes

__all__ = ["BlockSizes", "GpuBlockSizes", "redundancy", "redundancy_on"]


def redundancy(
    keys: Float[Array, "B K S H"],
    valid: Bool[Array, "B S"],
    threshold: float,
    *,
    implementation: str | None = None,
    matmul_dtype: str = "float32",
    block_sizes: BlockSizes | GpuBlockSizes | None = None,
    interpret: Any = None,
) -> Float[Array, "B K S"]:
    """The redundancy R of every row (window included), 0 at invalid rows.

    Keys are normalised (k / (|k| + 1e-6)); Sim[m, n] is their cosine with a zero diagonal
    and zero invalid columns. For each valid column n the largest valid row m != n with
    Sim[m, n] > threshold gets Sim[m, n] = 0 (the newest of near-duplicates is the least
    redundant). s[m] = sum_n Sim[m, n] / N_valid; R = softmax of s over the valid rows.

    Args:
      keys: [B, K, S, H] post-RoPE keys; invalid rows may hold anything (NaN included).
      valid: [B, S] bool.
      threshold: the cosine above which two keys are near-duplicates (static).
      implementation: "xla" (reference), "pallas", or None (auto: Pallas on a backend of
        `_common.VERIFIED_BACKENDS`, the reference elsewhere).
      matmul_dtype: "float32" (exact) or "bfloat16" cosine operands (float32 accumulation);
        Pallas only.
      block_sizes: the kernel's tiling (`BlockSizes` for the TPU kernel, `GpuBlockSizes` for
        the GPU one).
      interpret: the Pallas interpret mode (see `_common.resolve_implementation`).

    Returns:
      [B, K, S] float32 probabilities over the valid rows.

    >>> import jax.numpy as jnp
    >>> keys = jnp.array([[[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]]])
    >>> r = redundancy(keys, jnp.ones((1, 4), bool), 0.5, implementation="xla")[0, 0]
    >>> bool(r[0] > r[1] > r[2])  # of three copies, the older are the more redundant
    True
    """
    _common.validate_redundancy(keys, valid, threshold)
    _common.check_matmul_dtype(matmul_dtype)
    dispatch = _common.resolve_implementation(implementation, interpret)
    return redundancy_on(dispatch, keys, valid, threshold, matmul_dtype=matmul_dtype,
                         block_sizes=block_sizes)


def redundancy_on(
    dispatch: _common.Dispatch,
    keys: Float[Array, "B K S H"],
    valid: Bool[Array, "B S"],
    threshold: float,
    *,
    matmul_dtype: str = "float32",
    block_sizes: BlockSizes | GpuBlockSizes | None = None,
) -> Float[Array, "B K S"]:
    """`redundancy` on an already resolved backend, the inputs not validated again."""
    if not dispatch.use_pallas:
        return reference.redundancy(keys, valid, float(threshold))
    kernels = pallas_gpu if dispatch.kernels == "gpu" else pallas
    _common.check_block_sizes(block_sizes, kernels.BlockSizes)
    return kernels.redundancy(keys, valid, float(threshold), block_sizes=block_sizes,
                             matmul_dtype=matmul_dtype, interpret=dispatch.interpret)
