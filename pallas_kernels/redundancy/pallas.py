"""The redundancy score as a tiled Mosaic TPU kernel that never materialises S x S.

With unit keys u (k / (|k| + 1e-6)), Sim = u u^T is symmetric, so "the largest valid row m
with Sim[m, n] > threshold, for each column n" (the entry the specification zeroes) is "the
latest valid column m with Sim[n, m] > threshold, for each row n". One pass over the tiles
of Sim, grid (B, K, row tiles, column tiles) with the column tiles innermost, produces per row

  * the row sum over valid columns off the diagonal,
  * the latest similar column and its similarity (-1 when none),

and a small scatter-add then removes, from each row m, the similarities of the rows n whose
latest similar column is m. The softmax over the S rows finishes the score. Memory: two key
tiles and one [rows, cols] similarity tile in VMEM per step; three [B, K, S] outputs.
Invalid or out-of-range keys are zeroed with `jnp.where` before the norm and the product.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from gkv_jax.pallas_kernels import _common


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of the redundancy kernel.

    Attributes:
      block_rows: rows of a similarity tile (a multiple of 128; the whole S if not larger).
      block_cols: columns of a similarity tile (a multiple of 128; likewise).
    """

    block_rows: int = 256
    block_cols: int = 512

    def __post_init__(self):
        _common.check_block("block_rows", self.block_rows, _common.LANES)
        _common.check_block("block_cols", self.block_cols, _common.LANES)


def _unit(keys, ok, operand_dtype):
    """Masked keys [n, H] -> k / (|k| + eps) in float32, cast to the matmul operand dtype."""
    keys = jnp.where(ok, keys.astype(jnp.float32), 0.0)
    norm = jnp.sqrt(jnp.sum(keys * keys, axis=1, keepdims=True))
    return (keys / (norm + _common.KEY_NORM_EPS)).astype(operand_dtype)


def _kernel(row_keys_ref, col_keys_ref, row_valid_ref, col_key_valid_ref, col_valid_ref,
            sum_ref, latest_ref, value_ref,
            unit_rows_ref, acc_sum_ref, acc_latest_ref, acc_value_ref,
            *, S: int, block_rows: int, block_cols: int, threshold: float, operand_dtype,
            precision):
    i, j = pl.program_id(2), pl.program_id(3)
    row_index = i * block_rows + jax.lax.broadcasted_iota(jnp.int32, (block_rows, 1), 0)
    row_ok = (row_valid_ref[...] != 0) & (row_index < S)  # [rows, 1]

    @pl.when(j == 0)
    def _init():
        unit_rows_ref[...] = _unit(row_keys_ref[...], row_ok, operand_dtype)
        acc_sum_ref[...] = jnp.zeros(acc_sum_ref.shape, jnp.float32)
        acc_latest_ref[...] = jnp.full(acc_latest_ref.shape, -1.0, jnp.float32)
        acc_value_ref[...] = jnp.zeros(acc_value_ref.shape, jnp.float32)

    col_index = j * block_cols + jax.lax.broadcasted_iota(jnp.int32, (block_cols, 1), 0)
    # Column validity comes twice: [cols, 1] to mask the key rows, [1, cols] for Sim.
    col_key_ok = (col_key_valid_ref[...] != 0) & (col_index < S)
    unit_cols = _unit(col_keys_ref[...], col_key_ok, operand_dtype)
    sim = jax.lax.dot_general(unit_rows_ref[...], unit_cols, (((1,), (1,)), ((), ())),
                              precision=precision, preferred_element_type=jnp.float32)
    rows = i * block_rows + jax.lax.broadcasted_iota(jnp.int32, sim.shape, 0)
    cols = j * block_cols + jax.lax.broadcasted_iota(jnp.int32, sim.shape, 1)
    counted = (col_valid_ref[...] != 0) & (cols < S) & (rows != cols)
    sim = jnp.where(counted, sim, 0.0)
    acc_sum_ref[...] += jnp.sum(sim, axis=1, keepdims=True)
    # Latest similar column of each row within the tile (indices as exact float32).
    cols_f = cols.astype(jnp.float32)
    tile_latest = jnp.max(jnp.where(counted & (sim > threshold), cols_f, -1.0), axis=1,
                          keepdims=True)
    tile_value = jnp.sum(jnp.where(cols_f == tile_latest, sim, 0.0), axis=1, keepdims=True)
    newer = tile_latest > acc_latest_ref[...]
    acc_latest_ref[...] = jnp.where(newer, tile_latest, acc_latest_ref[...])
    acc_value_ref[...] = jnp.where(newer, tile_value, acc_value_ref[...])

    @pl.when(j == pl.num_programs(3) - 1)
    def _write():
        sum_ref[...] = acc_sum_ref[...]
        latest_ref[...] = jnp.where(row_ok, acc_latest_ref[...], -1.0)
        value_ref[...] = jnp.where(row_ok, acc_value_ref[...], 0.0)


@functools.partial(jax.jit, static_argnames=("threshold", "block_sizes", "matmul_dtype",
                                             "interpret"))
def similarity_summary(keys, valid, threshold: float, *, block_sizes: BlockSizes | None = None,
                       matmul_dtype: str = "float32", interpret=False):
    """Row sums of Sim, and per row the latest similar column and its similarity.

    Args:
      keys: [B, K, S, H]; valid: [B, S] bool; threshold: a Python float (static).

    Returns:
      row_sum [B, K, S] float32 (over valid columns n != m), latest [B, K, S] int32 (-1 when
      none, and at invalid rows), value [B, K, S] float32 (Sim at latest, 0 when none).
    """
    B, K, S, H = keys.shape
    block_sizes = block_sizes or BlockSizes()
    block_rows = _common.fit_block(block_sizes.block_rows, S)
    block_cols = _common.fit_block(block_sizes.block_cols, S)
    valid_i32 = valid.astype(jnp.int32)
    kernel = functools.partial(
        _kernel, S=S, block_rows=block_rows, block_cols=block_cols,
        threshold=float(threshold), operand_dtype=_common.matmul_operand_dtype(matmul_dtype),
        precision=_common.matmul_precision(matmul_dtype))
    row_spec = pl.BlockSpec((None, None, block_rows, 1), lambda b, k, i, j: (b, k, i, 0))
    row_sum, latest, value = pl.pallas_call(
        kernel,
        grid=(B, K, pl.cdiv(S, block_rows), pl.cdiv(S, block_cols)),
        in_specs=[
            pl.BlockSpec((None, None, block_rows, H), lambda b, k, i, j: (b, k, i, 0)),
            pl.BlockSpec((None, None, block_cols, H), lambda b, k, i, j: (b, k, j, 0)),
            pl.BlockSpec((None, block_rows, 1), lambda b, k, i, j: (b, i, 0)),
            pl.BlockSpec((None, block_cols, 1), lambda b, k, i, j: (b, j, 0)),
            pl.BlockSpec((None, 1, block_cols), lambda b, k, i, j: (b, 0, j)),
        ],
        out_specs=[row_spec, row_spec, row_spec],
        out_shape=[jax.ShapeDtypeStruct((B, K, S, 1), jnp.float32)] * 3,
        scratch_shapes=[
            pltpu.VMEM((block_rows, H), _common.matmul_operand_dtype(matmul_dtype)),
            pltpu.VMEM((block_rows, 1), jnp.float32),
            pltpu.VMEM((block_rows, 1), jnp.float32),
            pltpu.VMEM((block_rows, 1), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )(keys, keys, valid_i32[:, :, None], valid_i32[:, :, None], valid_i32[:, None, :])
    return row_sum[..., 0], latest[..., 0].astype(jnp.int32), value[..., 0]


def from_summary(row_sum, latest, value, valid):
    """R from the similarity summary (shared by the TPU and GPU kernels).

    Row n's latest similar column m loses Sim[m, n] (= Sim[n, m]) from row m's sum (a small
    scatter-add), then s = sum / N_valid and R = softmax of s over the valid rows.

    Args:
      row_sum, latest, value: [B, K, S] as `similarity_summary` returns them (latest int32,
        -1 when none).
      valid: [B, S] bool.

    Returns:
      [B, K, S] float32, 0 at invalid rows.
    """
    B, K, S = row_sum.shape
    found = latest >= 0
    b_index = jnp.arange(B)[:, None, None]
    k_index = jnp.arange(K)[None, :, None]
    removed = jnp.zeros((B, K, S), jnp.float32).at[b_index, k_index, jnp.where(
        found, latest, 0)].add(jnp.where(found, value, 0.0))
    n_valid = jnp.maximum(jnp.sum(valid, axis=-1), 1).astype(jnp.float32)[:, None, None]
    s = (row_sum - removed) / n_valid
    row_valid = valid[:, None, :]
    probs = jax.nn.softmax(jnp.where(row_valid, s, _common.MASKED_LOGIT), axis=-1)
    return jnp.where(row_valid, probs, 0.0)


@functools.partial(jax.jit, static_argnames=("threshold", "block_sizes", "matmul_dtype",
                                             "interpret"))
def redundancy(keys, valid, threshold: float, *, block_sizes: BlockSizes | None = None,
               matmul_dtype: str = "float32", interpret=False):
    """The Pallas redundancy score; same contract as `redundancy.redundancy`."""
    row_sum, latest, value = similarity_summary(keys, valid, threshold,
                                                block_sizes=block_sizes,
                                                matmul_dtype=matmul_dtype, interpret=interpret)
    return from_summary(row_sum, latest, value, valid)
