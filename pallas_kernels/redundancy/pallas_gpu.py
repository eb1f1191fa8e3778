"""The redundancy score as a tiled Mosaic GPU kernel (Hopper) that never materialises S x S.

Same decomposition as the TPU kernel (`pallas.py`): with unit keys u = k / (|k| + 1e-6), Sim
is symmetric, so the entry the specification zeroes in column n ("the largest valid row m
with Sim[m, n] > threshold") is, per row n, the latest valid column m with Sim[n, m] >
threshold. The kernel produces per row

  * the row sum over valid columns off the diagonal,
  * the latest similar column and its similarity (-1 / 0 when none),

and `pallas.from_summary` (XLA: a small scatter-add and the softmax) finishes R.

Grid (B, K, row blocks of `block_rows`), written with `plgpu.kernel`; one CTA (one warpgroup)
per block of rows. The CTA sweeps the column tiles in increasing order ([block_cols, H] unit
keys in registers, `TILE` layout); for each of its rows it loads the key row [H] (`COL`),
normalises it, and forms the [block_cols] similarities as a float32 multiply + row sum on the
CUDA cores. Because tiles come in increasing column order, a similar column found in a later
tile is always the latest, so the per-row state ([block_rows] sums, latest column, its
similarity; `ROW` layout) stays in registers and is written once. Invalid keys (pads, empty
slots holding NaN) are zeroed with `jnp.where` before the norm and the product.

Speed (unmeasured: checked only in GPU interpret mode on CPU and by lowering to Mosaic GPU):
the [rows, cols] similarity tile is a matrix product; an H100 kernel would stage both key
tiles in SMEM with TMA and use `plgpu.wgmma` (bf16 operands, or a 3-pass bf16 split for
"float32"), then reduce the tile by rows.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from gkv_jax.pallas_kernels import _common
from gkv_jax.pallas_kernels import _gpu_common as gc
from gkv_jax.pallas_kernels.redundancy.pallas import from_summary


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of the GPU redundancy kernel.

    Attributes:
      block_rows: rows per CTA (a multiple of 64; S rounded up to 64 when smaller).
      block_cols: columns per similarity tile (a multiple of 64; likewise).
    """

    block_rows: int = 64
    block_cols: int = 64

    def __post_init__(self):
        gc.check_gpu_block("block_rows", self.block_rows)
        gc.check_gpu_block("block_cols", self.block_cols)


def _sqrt(x):
    """sqrt of x >= 0 as x * rsqrt(x) (Mosaic GPU lowers rsqrt, not sqrt; within 2 ulp)."""
    positive = x > 0
    return jnp.where(positive, x * jax.lax.rsqrt(jnp.where(positive, x, 1.0)), 0.0)


def _unit_tile(keys, ok, operand_dtype):
    """Keys [T, H] (`TILE`), validity [T] (`ROW`) -> unit keys, rounded to the operand dtype."""
    keys = jnp.where(gc.broadcast_cols(ok, keys.shape[1]), keys.astype(jnp.float32), 0.0)
    norm = _sqrt(jnp.sum(keys * keys, axis=1))
    unit = keys / gc.broadcast_cols(norm + _common.KEY_NORM_EPS, keys.shape[1])
    return gc.round_operand(unit, operand_dtype)


def _unit_row(key, ok, operand_dtype):
    """One key [H] (`COL`), its validity (scalar) -> unit key, rounded to the operand dtype."""
    key = jnp.where(ok, key.astype(jnp.float32), 0.0)
    norm = _sqrt(jnp.sum(key * key))
    return gc.round_operand(key / (norm + _common.KEY_NORM_EPS), operand_dtype)


def _kernel(keys_ref, valid_ref, sum_ref, latest_ref, value_ref, *, col_tiles: int,
            block_rows: int, block_cols: int, threshold: float, operand_dtype, emit: gc.Emit):
    b, k, i = (jax.lax.axis_index(name) for name in ("b", "k", "i"))
    R, T = block_rows, block_cols
    first_row = i * R
    rows = first_row + emit.iota(R, gc.ROW)

    def column_tile(t, state):
        cols = t * T + emit.iota(T, gc.ROW)
        col_ok = emit.load(valid_ref, (b, pl.ds(t * T, T)), gc.ROW) != 0
        unit_cols = _unit_tile(emit.load(keys_ref, (b, k, pl.ds(t * T, T), slice(None)),
                                         gc.TILE), col_ok, operand_dtype)
        cols_f = cols.astype(jnp.float32)  # slot numbers are exact in float32

        def row(m, state):
            sums, latest, value = state
            n = first_row + m
            key = emit.load(keys_ref, (b, k, n, slice(None)), gc.COL)
            unit_row = _unit_row(key, valid_ref[b, n] != 0, operand_dtype)
            sim = jnp.sum(unit_cols * gc.broadcast_rows(unit_row, T), axis=1)  # [T]
            counted = col_ok & (cols != n)
            sim = jnp.where(counted, sim, 0.0)
            tile_latest = jnp.max(jnp.where(counted & (sim > threshold), cols_f, -1.0))
            tile_value = jnp.sum(jnp.where(cols_f == tile_latest, sim, 0.0))
            here = rows == n
            found = here & (tile_latest >= 0)  # later tiles hold later columns
            return (sums + jnp.where(here, jnp.sum(sim), 0.0),
                    jnp.where(found, tile_latest, latest),
                    jnp.where(found, tile_value, value))

        return jax.lax.fori_loop(0, R, row, state)

    init = (emit.full(R, 0.0, jnp.float32, gc.ROW), emit.full(R, -1.0, jnp.float32, gc.ROW),
            emit.full(R, 0.0, jnp.float32, gc.ROW))
    sums, latest, value = jax.lax.fori_loop(0, col_tiles, column_tile, init)
    row_ok = emit.load(valid_ref, (b, pl.ds(first_row, R)), gc.ROW) != 0
    sum_ref[b, k, pl.ds(first_row, R)] = sums
    latest_ref[b, k, pl.ds(first_row, R)] = jnp.where(row_ok, latest, -1.0)
    value_ref[b, k, pl.ds(first_row, R)] = jnp.where(row_ok, value, 0.0)


@functools.partial(jax.jit, static_argnames=("threshold", "block_sizes", "matmul_dtype",
                                             "interpret"))
def similarity_summary(keys, valid, threshold: float, *, block_sizes: BlockSizes | None = None,
                       matmul_dtype: str = "float32", interpret=None):
    """Row sums of Sim, and per row the latest similar column and its similarity.

    Args:
      keys: [B, K, S, H]; valid: [B, S] bool; threshold: a Python float (static).
      interpret: None (compile for the GPU) or GPU interpret mode ("gpu" or an
        `InterpretGPUParams`).

    Returns:
      row_sum [B, K, S] float32 (over valid columns n != m), latest [B, K, S] int32 (-1 when
      none, and at invalid rows), value [B, K, S] float32 (Sim at latest, 0 when none).
    """
    B, K, S, H = keys.shape
    _common.check_block_sizes(block_sizes, BlockSizes)
    block_sizes = block_sizes or BlockSizes()
    R = gc.fit_tile(block_sizes.block_rows, S)
    T = gc.fit_tile(block_sizes.block_cols, S)
    S_pad = _common.round_up(S, math.lcm(R, T))
    H_pad = _common.round_up(H, gc.TILE_COLS)
    if S_pad != S or H_pad != H:  # zero keys, invalid: they never count
        keys = jnp.pad(keys, ((0, 0), (0, 0), (0, S_pad - S), (0, H_pad - H)))
    valid_i32 = jnp.pad(valid.astype(jnp.int32), ((0, 0), (0, S_pad - S)))
    params = gc.interpret_params(interpret)
    body = functools.partial(
        _kernel, col_tiles=S_pad // T, block_rows=R, block_cols=T, threshold=float(threshold),
        operand_dtype=_common.matmul_operand_dtype(matmul_dtype),
        emit=gc.Emit(interpret=params is not None))
    row_sum, latest, value = plgpu.kernel(
        body,
        out_type=[jax.ShapeDtypeStruct((B, K, S_pad), jnp.float32)] * 3,
        grid=(B, K, S_pad // R),
        grid_names=("b", "k", "i"),
        interpret=params,
    )(keys, valid_i32)
    return row_sum[..., :S], latest[..., :S].astype(jnp.int32), value[..., :S]


@functools.partial(jax.jit, static_argnames=("threshold", "block_sizes", "matmul_dtype",
                                             "interpret"))
def redundancy(keys, valid, threshold: float, *, block_sizes: BlockSizes | None = None,
               matmul_dtype: str = "float32", interpret=None):
    """The Mosaic GPU redundancy score; same contract as `redundancy.redundancy`."""
    row_sum, latest, value = similarity_summary(keys, valid, threshold,
                                                block_sizes=block_sizes,
                                                matmul_dtype=matmul_dtype, interpret=interpret)
    return from_summary(row_sum, latest, value, valid)
