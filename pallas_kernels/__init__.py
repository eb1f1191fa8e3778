"""Pallas kernels for the eviction step: score update, redundancy, top-k retention.

One folder per op (`reference.py` = the float32 specification, `pallas.py` = the Mosaic TPU
kernel with its `BlockSizes`, `__init__.py` = validation + dispatch on `implementation`):

  * `score_update.score_update`: window attention score A (group max of the probabilities,
    window mean), its normalisation and the global-score update, all KV heads at once.
  * `redundancy.redundancy`: the R-KV key-similarity score, tile by tile (no S x S matrix).
  * `topk_retention.keep_top`: the budget - W best slots per head in temporal order (threshold
    search + order-preserving compaction, no sort); `topk_retention.compact`: the in-place
    compaction of one layer's keys, values, positions and global scores.
  * `eviction_step.select`: `gkv_jax.eviction.select` assembled from the ops (what `select`
    runs when the implementation resolves to Pallas).

`implementation`: "xla" = the reference everywhere; "pallas" = the kernels (Mosaic on TPU,
TPU interpret mode on CPU; no GPU kernels yet, so it raises on GPU); None = Pallas on TPU,
the reference elsewhere. See `_common` for the `matmul_dtype` precision modes.
"""

from gkv_jax.pallas_kernels import eviction_step, redundancy, score_update, topk_retention
from gkv_jax.pallas_kernels._common import (
    IMPLEMENTATIONS,
    MATMUL_DTYPES,
    Dispatch,
    resolve_implementation,
)

__all__ = [
    "IMPLEMENTATIONS",
    "MATMUL_DTYPES",
    "Dispatch",
    "eviction_step",
    "redundancy",
    "resolve_implementation",
    "score_update",
    "topk_retention",
]
