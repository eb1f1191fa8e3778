"""Top-k retention: pick the budget - W best slots per (sequence, KV head) in temporal order
(`keep_top`), and compact the cache rows in place (`compact`). `reference.py` is the
specification (`gkv_jax.eviction.keep_top`, XLA gathers), `pallas.py` the Mosaic TPU kernels
(threshold search + order-preserving compaction, no sort; one-hot row moves into aliased
buffers), `pallas_gpu.py` the Mosaic GPU kernels (the same threshold search, a prefix-count
compaction; TMA row gathers into aliased buffers). Both functions validate once and dispatch
on `implementation` (see `_common.resolve_implementation`).

Order (`reference.ranking_key`, shared by every implementation): scores in the IEEE total
order (so -0.0 ranks below 0.0), -inf included; then valid candidates scored NaN, below every
score, whatever the NaN's sign; then invalid candidates, kept only when fewer valid
candidates than `count` exist. Among equal keys the lowest slot index is kept first.
"""

from __future__ import annotations

from typing import Any

from jaxtyping import Array, Bool, Float, Int

from gkv_jax.pallas_kernels import _common
from gkv_jax.pallas_kernels.topk_retention import pallas, pallas_gpu, reference
from gkv_jax.pallas_kernels.topk_retention.pallas import BlockSizes
from gkv_jax.pallas_kernels.topk_retention.pallas_gpu import BlockSizes as GpuBlockSizes

__all__ = ["BlockSizes", "GpuBlockSizes", "compact", "compact_on", "keep_top", "keep_top_on"]


def keep_top(
    scores: Float[Array, "B K P"],
    carried: Float[Array, "B K P"] | None,
    candidate_valid: Bool[Array, "B P"],
    count: int,
    *,
    implementation: str | None = None,
    interpret: Any = None,
    block_sizes: GpuBlockSizes | None = None,
) -> tuple[Int[Array, "B K count"], Float[Array, "B K count"] | None]:
    """The `count` best candidates of each (sequence, KV head), in temporal order.

    Args:
      scores: [B, K, P] float (higher is better; NaN ranks below every score).
      carried: [B, K, P] float gathered at the kept candidates (the global score), or None.
      candidate_valid: [B, P] bool; invalid candidates rank last and carry NaN.
      count: how many to keep, 1 <= count <= P (static).
      implementation: "xla" (reference), "pallas", or None (auto: Pallas on a backend of
        `_common.VERIFIED_BACKENDS`, the reference elsewhere).
      interpret: the Pallas interpret mode (see `_common.resolve_implementation`).
      block_sizes: the GPU kernel's chunking (`GpuBlockSizes`; the TPU kernel takes whole
        candidate rows).

    Returns:
      kept_index [B, K, count] int32, strictly increasing; `carried` at kept_index (float32)
      or None. Ties: lowest index first.

    >>> import jax.numpy as jnp
    >>> scores = jnp.array([[[0.5, 2.0, 0.5, 0.5, 1.0]]])
    >>> kept, _ = keep_top(scores, None, jnp.ones((1, 5), bool), 3, implementation="xla")
    >>> kept.tolist()
    [[[0, 1, 4]]]
    """
    _common.validate_keep_top(scores, carried, candidate_valid, count)
    dispatch = _common.resolve_implementation(implementation, interpret)
    return keep_top_on(dispatch, scores, carried, candidate_valid, count,
                       block_sizes=block_sizes)


def keep_top_on(
    dispatch: _common.Dispatch,
    scores: Float[Array, "B K P"],
    carried: Float[Array, "B K P"] | None,
    candidate_valid: Bool[Array, "B P"],
    count: int,
    *,
    block_sizes: GpuBlockSizes | None = None,
) -> tuple[Int[Array, "B K count"], Float[Array, "B K count"] | None]:
    """`keep_top` on an already resolved backend, the inputs not validated again."""
    if not dispatch.use_pallas:
        return reference.keep_top(scores, carried, candidate_valid, count)
    if dispatch.kernels == "gpu":
        return pallas_gpu.keep_top(scores, carried, candidate_valid, count,
                                   block_sizes=block_sizes, interpret=dispatch.interpret)
    if block_sizes is not None:
        raise TypeError("the TPU selection kernel takes no block sizes (whole candidate rows)")
    return pallas.keep_top(scores, carried, candidate_valid, count,
                           interpret=dispatch.interpret)


def compact(
    keys: Float[Array, "B K S H"],
    values: Float[Array, "B K S Hv"],
    positions: Int[Array, "B K S"],
    global_score: Float[Array, "B K S"],
    kept_index: Int[Array, "B K count"],
    *,
    window: int,
    active: Bool[Array, " B"] | None = None,
    new_score: Float[Array, "B K count"] | None = None,
    replace_score: Bool[Array, " B"] | None = None,
    implementation: str | None = None,
    block_sizes: BlockSizes | GpuBlockSizes | None = None,
    interpret: Any = None,
) -> tuple[Float[Array, "B K S H"], Float[Array, "B K S Hv"], Int[Array, "B K S"],
           Float[Array, "B K S"]]:
    """Compacts one layer's cache rows after a selection; same shapes in and out.

    For every active sequence, with budget = count + window, output slot
      * i < count takes input slot kept_index[i] (keys, values, positions, global score),
      * count <= i < budget takes input slot S - window + (i - count) (the window rows),
      * i >= budget is emptied: keys and values 0, position -1, global score NaN.
    Inactive sequences (`active` False) come back unchanged, except that the TPU kernel
    rewrites their key/value rows through the same one-hot copy (non-finite entries -> 0).
    With `new_score`, rows i < count of the global score of the active sequences selected by
    `replace_score` (default: all) are new_score[i] and their window rows are NaN (no
    history); otherwise the gathered old score is kept. Every emptied or empty slot
    (position < 0) of an active sequence gets a NaN score.

    Jit with donation to compact in place (the Pallas kernels alias keys and values to their
    outputs; positions and scores are small and gathered by XLA):

        step = jax.jit(compact, static_argnames=("window", "implementation"),
                       donate_argnums=(0, 1, 2, 3))

    Contract of `kept_index`: strictly increasing slots in [0, S - window) per (sequence, KV
    head), as `keep_top` / `gkv_jax.eviction.select` return them. The Pallas path relies on
    it (each output slot's source lies in [i, i + S - budget]); other indices give undefined
    rows there. Bit-exactness: the TPU kernel copies every finite key/value bit for bit,
    except that -0.0 becomes 0.0; non-finite entries (NaN in empty slots) become 0. The GPU
    kernel copies rows bit for bit (as the reference) with TMA, which needs rows of a
    multiple of 128 bytes and at most 256 elements; other rows are gathered by XLA there.

    Args:
      keys, values: [B, K, S, H] and [B, K, S, Hv], any float dtype (kept).
      positions: [B, K, S] integer true positions (-1 empty).
      global_score: [B, K, S] float per-slot global score (NaN = no history).
      kept_index: [B, K, count] the selected slots (see above).
      window: W, the always-kept tail (static).
      active: [B] bool sequences to compact (None = all).
      new_score: [B, K, count] the new global score of the kept rows (`select`'s second
        output), or None to carry the old per-slot score.
      replace_score: [B] bool which active sequences take `new_score` (None = all).
      implementation: "xla" (reference), "pallas", or None (auto: Pallas on a backend of
        `_common.VERIFIED_BACKENDS`, the reference elsewhere).
      block_sizes: the compaction kernel's tiling (`BlockSizes` for the TPU kernel,
        `GpuBlockSizes` for the GPU one).
      interpret: the Pallas interpret mode (see `_common.resolve_implementation`).

    Returns:
      (keys, values, positions, global_score), shaped and typed as the inputs.

    >>> import jax.numpy as jnp
    >>> keys = jnp.arange(6.0).reshape(1, 1, 6, 1)
    >>> out = compact(keys, keys, jnp.arange(6).reshape(1, 1, 6), jnp.zeros((1, 1, 6)),
    ...               jnp.array([[[1, 3]]]), window=1, implementation="xla")
    >>> out[0][0, 0, :, 0].tolist(), out[2][0, 0].tolist()
    ([1.0, 3.0, 5.0, 0.0, 0.0, 0.0], [1, 3, 5, -1, -1, -1])
    """
    _common.validate_compact(keys, values, positions, global_score, kept_index, window,
                             active, new_score, replace_score)
    dispatch = _common.resolve_implementation(implementation, interpret)
    return compact_on(dispatch, keys, values, positions, global_score, kept_index,
                      window=window, active=active, new_score=new_score,
                      replace_score=replace_score, block_sizes=block_sizes)


def compact_on(dispatch: _common.Dispatch, keys, values, positions, global_score, kept_index,
               *, window: int, active=None, new_score=None, replace_score=None,
               block_sizes: BlockSizes | GpuBlockSizes | None = None):
    """`compact` on an already resolved backend, the inputs not validated again (shapes as
    in `compact`)."""
    kwargs = dict(window=window, active=active, new_score=new_score,
                  replace_score=replace_score)
    if not dispatch.use_pallas:
        return reference.compact(keys, values, positions, global_score, kept_index, **kwargs)
    kernels = pallas_gpu if dispatch.kernels == "gpu" else pallas
    _common.check_block_sizes(block_sizes, kernels.BlockSizes)
    return kernels.compact(keys, values, positions, global_score, kept_index, **kwargs,
                          block_sizes=block_sizes, interpret=dispatch.interpret)
