"""Pallas kernels for the eviction step: score update, redundancy, top-k retention.

One folder per op (`reference.py` = the float32 specification, `pallas.py` = the Mosaic TPU
kernel with its `BlockSizes`, `pallas_gpu.py` = the Mosaic GPU kernel for Hopper, written with
`plgpu.kernel`, with its own `BlockSizes` (exported as `GpuBlockSizes`), `__init__.py` =
validation + dispatch on `implementation`):

  * `score_update.score_update`: window attention score A (group max of the probabilities,
    window mean), its normalisation and the global-score update, all KV heads at once.
  * `redundancy.redundancy`: the R-KV key-similarity score, tile by tile (no S x S matrix).
  * `topk_retention.keep_top`: the budget - W best slots per head in temporal order (threshold
    search + order-preserving compaction, no sort); `topk_retention.compact`: the in-place
    compaction of one layer's keys, values, positions and global scores.
  * `ops.Ops`: the ops on one backend, resolved once (`Ops.resolve`); the eviction policies
    (`gkv_jax.policies`) write their scores on top of it, so one score runs on both backends.

This package imports nothing from the rest of `gkv_jax`: the policies build on it.

`implementation`: "xla" = the reference everywhere; "pallas" = the kernels (Mosaic TPU on a
TPU, Mosaic GPU on a GPU of compute capability >= 9.0, the TPU kernels in TPU interpret mode
on CPU); None = the kernels on a backend of `_common.VERIFIED_BACKENDS` (those on which
they have passed `benchmarks/device_check.sh`; none yet), the reference elsewhere.
`interpret="gpu"` (or an `InterpretGPUParams`) runs the GPU kernels in GPU interpret mode on
any backend, which is how they are tested on CPU. See `_common` for the dispatch rules and the
`matmul_dtype` precision modes.

The platform a program is traced for is `traced_platform()`: the default backend, or the one
`target_platform("tpu" | "gpu" | "cpu")` names while a program is compiled for a chip that
is not attached (`gkv_jax.targets`). Every platform-dependent choice of the library reads it.
"""

from gkv_jax.pallas_kernels import redundancy, score_update, topk_retention
from gkv_jax.pallas_kernels._common import (
    IMPLEMENTATIONS,
    MATMUL_DTYPES,
    PLATFORMS,
    Dispatch,
    resolve_implementation,
    target_platform,
    traced_platform,
)
from gkv_jax.pallas_kernels._gpu_common import InterpretGPUParams
from gkv_jax.pallas_kernels.ops import Ops

__all__ = [
    "IMPLEMENTATIONS",
    "MATMUL_DTYPES",
    "PLATFORMS",
    "Dispatch",
    "InterpretGPUParams",
    "Ops",
    "redundancy",
    "resolve_implementation",
    "score_update",
    "target_platform",
    "topk_retention",
    "traced_platform",
]
