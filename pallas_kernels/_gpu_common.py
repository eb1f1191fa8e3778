"""What the Mosaic GPU kernels (`*/pallas_gpu.py`) share: layouts, interpret-aware loads.

The kernels are written with `plgpu.kernel` (one CTA = one warpgroup of 128 threads) in the
default "Lane" lowering semantics, where every array lives in registers with an explicit
layout. They use three layouts of a WGMMA tile (64 rows x a multiple of 8 columns) and one
flat layout:

  * `TILE`: a [rows, cols] tile (rows % 64 == 0, cols % 8 == 0), e.g. keys [T, H];
  * `ROW`: a [rows] vector indexed by the tile row (what `jnp.sum(tile, axis=1)` gives), e.g.
    one value per key slot; broadcast back along the columns with `lax.broadcast_in_dim`;
  * `COL`: a [cols] vector indexed by the tile column (`jnp.sum(tile, axis=0)`), e.g. one
    query or one key [H]; broadcast along the rows;
  * `strided(n)`: a flat [n] vector (n % 128 == 0), one element per thread and step, for
    element-wise work, whole-vector reductions and loads at unaligned offsets.

GPU interpret mode (`InterpretGPUParams`, JAX 0.10) runs the kernel jaxpr on CPU, simulating
GMEM/SMEM, barriers and TMA copies, but it has no rule for `plgpu.layout_cast` nor for
`plgpu.load`; `Emit` therefore casts and loads with layouts when compiling and plainly when
interpreting (layouts do not change values).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu

try:  # a public name in later JAX releases, if any
    InterpretGPUParams = plgpu.InterpretParams  # type: ignore[attr-defined]
except AttributeError:  # JAX 0.10 / 0.11: only the private module has it
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

# Rows of a WGMMA tile: block sizes along key slots are multiples of it.
TILE_ROWS = 64
# Columns of a WGMMA tile: head dimensions are padded to a multiple of it.
TILE_COLS = 8
# Threads of a warpgroup (one CTA here): flat vectors are multiples of it.
WARPGROUP = 128

TILE = plgpu.Layout.WGMMA
ROW = plgpu.Layout.WGMMA.reduce(1)
COL = plgpu.Layout.WGMMA.reduce(0)


def strided(n: int):
    """A flat [n] layout with one element per thread and step (no alignment needed)."""
    return plgpu.Layout.WG_STRIDED((n,), 1)


def is_gpu_interpret(interpret: Any) -> bool:
    """True for the GPU interpret-mode requests: "gpu" or an `InterpretGPUParams`."""
    return (isinstance(interpret, str) and interpret == "gpu") or isinstance(
        interpret, InterpretGPUParams)


@dataclasses.dataclass(frozen=True)
class Emit:
    """Layout-aware array creation and loads inside a kernel body.

    Attributes:
      interpret: the kernel runs in GPU interpret mode (casts and loads without layouts).
    """

    interpret: bool

    def cast(self, x, layout):
        """`x` with `layout` (a hint that the lowering needs for iotas and constants)."""
        return x if self.interpret else plgpu.layout_cast(x, layout)

    def load(self, ref, index, layout):
        """ref[index] in `layout`; GMEM or SMEM (GMEM loads are plain, not TMA, loads)."""
        if self.interpret:
            return ref[index]
        return plgpu.load(ref, index, layout=layout, optimized=False)

    def iota(self, n: int, layout):
        """int32 [n] = 0, 1, ..., n - 1 in `layout`."""
        return self.cast(jax.lax.broadcasted_iota(jnp.int32, (n,), 0), layout)

    def full(self, n: int, value, dtype, layout):
        """[n] filled with `value` in `layout` (a loop-carry initial value)."""
        return self.cast(jnp.full((n,), value, dtype), layout)


def interpret_params(interpret: Any):
    """The `interpret` argument of `plgpu.kernel`: None (compile) or an `InterpretGPUParams`."""
    if interpret is None or interpret is False:
        return None
    if isinstance(interpret, InterpretGPUParams):
        return interpret
    if is_gpu_interpret(interpret):
        return InterpretGPUParams()
    raise ValueError(f"the Mosaic GPU kernels run compiled (interpret=None/False) or in GPU "
                     f"interpret mode ('gpu' or an InterpretGPUParams), got {interpret!r}")


def broadcast_rows(x, rows: int):
    """[cols] (`COL`) -> [rows, cols] (`TILE`): x repeated on every row."""
    return jax.lax.broadcast_in_dim(x, (rows, x.shape[0]), (1,))


def broadcast_cols(x, cols: int):
    """[rows] (`ROW`) -> [rows, cols] (`TILE`): x repeated on every column."""
    return jax.lax.broadcast_in_dim(x, (x.shape[0], cols), (0,))


def round_operand(x, operand_dtype):
    """float32 x rounded to the matmul operand dtype and back (bfloat16 products of float32
    accumulate exactly in float32, so this reproduces bf16 operands + f32 accumulation)."""
    if operand_dtype == jnp.float32:
        return x
    return x.astype(operand_dtype).astype(jnp.float32)


def fit_tile(block: int, size: int) -> int:
    """`block` slots, or `size` rounded up to whole tiles when that is smaller."""
    return min(block, -(-size // TILE_ROWS) * TILE_ROWS)


def check_gpu_block(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < TILE_ROWS or (
            value % TILE_ROWS):
        raise ValueError(f"{name} must be a positive multiple of {TILE_ROWS}, got {value!r}")
