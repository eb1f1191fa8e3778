"""The score update as one Mosaic GPU kernel (Hopper), written with `plgpu.kernel`.

One CTA (one warpgroup) per (sequence, KV head), grid (B, K). Keys are read tile by tile
([T, H] slots x head dim, `TILE` layout, T = `block_s`), queries one row [H] at a time; the
G * W window queries of the head's group are rows r = g * W + w of a [B, K, G * W, H] view.
Three sweeps over the tiles, as the TPU kernel:

  phase 0: the online softmax statistics (row max m, sum l) of every query row over all S
           keys, kept as scalars in SMEM ([G * W] each);
  phase 1: per tile, the probabilities exp(x - m) / l, their maximum over the group and their
           mean over the W queries: the local score A of the tile, written to the output (in
           GMEM) together with its running maximum;
  phase 2: per tile, A is read back, normalised (A / max A) and merged with the history
           (max / mean / sum; NaN history = none), and written again.

Logits are q.k / sqrt(H), causal inside the window, invalid keys masked; invalid key rows are
zeroed with `jnp.where` before any product, so NaN in empty slots never leaks. Products are
float32 multiply + row sums on the CUDA cores (`matmul_dtype="bfloat16"` rounds both operands
to bfloat16 first, which with float32 accumulation is exactly the bf16-operand product).

The output, S rounded up to whole tiles, is written in phase 1 and re-read in phase 2 with the
same layout, so every element is read back by the thread that wrote it.

Speed (unmeasured: checked only in GPU interpret mode on CPU and by lowering to Mosaic GPU):
a faster H100 kernel would stage the key tiles in SMEM with TMA (double-buffered,
`plgpu.emit_pipeline`), compute the [G * W, T] logits with `plgpu.wgmma` (bf16 operands; a
3-pass bf16 split for "float32"), keep m and l in registers, and give the group max over the
query rows of a wgmma tile a small SMEM exchange.
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
from gkv_jax.pallas_kernels.score_update.reference import blend_history


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of the GPU score-update kernel.

    Attributes:
      block_s: key slots per tile (a multiple of 64; S rounded up to 64 when smaller). The
        tile [block_s, H] lives in registers: 64 keeps H = 128 float32 tiles at 64 registers
        per thread.
    """

    block_s: int = 64

    def __post_init__(self):
        gc.check_gpu_block("block_s", self.block_s)


@dataclasses.dataclass(frozen=True)
class _Shape:
    S: int  # real slots
    T: int  # slots per tile
    tiles: int
    W: int
    G: int
    H: int  # padded head dim
    scale: float


def _tile(keys_ref, valid_ref, b, k, t, shape: _Shape, operand_dtype, emit: gc.Emit):
    """Tile t: keys [T, H] float32 (invalid rows 0, rounded to the operand dtype), key
    validity [T] bool and slot numbers [T] int32 (`ROW`)."""
    T = shape.T
    slots = t * T + emit.iota(T, gc.ROW)
    ok = emit.load(valid_ref, (b, pl.ds(t * T, T)), gc.ROW) != 0
    keys = emit.load(keys_ref, (b, k, pl.ds(t * T, T), slice(None)), gc.TILE)
    keys = jnp.where(gc.broadcast_cols(ok, shape.H), keys.astype(jnp.float32), 0.0)
    return gc.round_operand(keys, operand_dtype), ok, slots


def _logits(q_ref, keys, b, k, r, shape: _Shape, operand_dtype, emit: gc.Emit):
    """[T] logits q_r . k / sqrt(H) of query row r against a key tile (`ROW`)."""
    q = emit.load(q_ref, (b, k, r, slice(None)), gc.COL).astype(jnp.float32)
    q = gc.round_operand(q, operand_dtype)
    return jnp.sum(keys * gc.broadcast_rows(q, shape.T), axis=1) / shape.scale


def _kernel(q_ref, keys_ref, valid_ref, *rest, shape: _Shape, normalise: bool,
            smooth: str | None, alpha: float, operand_dtype, emit: gc.Emit):
    if smooth is None:
        out_ref, m_smem, l_smem = rest
        hist_ref = None
    else:
        hist_ref, out_ref, m_smem, l_smem = rest
    b, k = jax.lax.axis_index("b"), jax.lax.axis_index("k")
    S, T, W, G = shape.S, shape.T, shape.W, shape.G
    tile = functools.partial(_tile, keys_ref, valid_ref, b, k, shape=shape,
                             operand_dtype=operand_dtype, emit=emit)
    logits = functools.partial(_logits, q_ref, b=b, k=k, shape=shape,
                               operand_dtype=operand_dtype, emit=emit)

    def visible(ok, slots, w):  # key visible from window query w (causal inside the window)
        return ok & (slots <= S - W + w)

    @pl.loop(0, G * W)
    def _init(r):
        m_smem[r] = jnp.float32(_common.MASKED_LOGIT)
        l_smem[r] = jnp.float32(0.0)

    @pl.loop(0, shape.tiles)
    def _statistics(t):
        keys, ok, slots = tile(t)

        @pl.loop(0, W)
        def _window_row(w):
            seen = visible(ok, slots, w)

            @pl.loop(0, G)
            def _member(g):
                r = g * W + w
                x = jnp.where(seen, logits(keys, r=r), _common.MASKED_LOGIT)
                m_old, l_old = m_smem[r], l_smem[r]
                m_new = jnp.maximum(m_old, jnp.max(x))
                p = jnp.where(seen, jnp.exp(x - m_new), 0.0)
                l_smem[r] = l_old * jnp.exp(m_old - m_new) + jnp.sum(p)
                m_smem[r] = m_new

    def local_score(t, peak):
        keys, ok, slots = tile(t)

        def window_row(w, total):
            seen = visible(ok, slots, w)

            def member(g, best):
                r = g * W + w
                denominator = l_smem[r]
                safe = jnp.where(denominator > 0, denominator, 1.0)
                x = jnp.where(seen, logits(keys, r=r), _common.MASKED_LOGIT)
                return jnp.maximum(best, jnp.where(seen, jnp.exp(x - m_smem[r]) / safe, 0.0))

            zeros = emit.full(T, 0.0, jnp.float32, gc.ROW)
            return total + jax.lax.fori_loop(0, G, member, zeros)

        total = jax.lax.fori_loop(0, W, window_row, emit.full(T, 0.0, jnp.float32, gc.ROW))
        local = jnp.where(slots < S - W, total / W, 0.0)
        out_ref[b, k, pl.ds(t * T, T)] = local
        return jnp.maximum(peak, jnp.max(local))

    peak = jax.lax.fori_loop(0, shape.tiles, local_score, jnp.float32(0.0))
    if not normalise and hist_ref is None:
        return

    @pl.loop(0, shape.tiles)
    def _update(t):
        local = emit.load(out_ref, (b, k, pl.ds(t * T, T)), gc.ROW)
        if normalise:
            local = jnp.where(peak > 0, local / jnp.where(peak > 0, peak, 1.0), 0.0)
        if hist_ref is not None:
            previous = emit.load(hist_ref, (b, k, pl.ds(t * T, T)), gc.ROW)
            local = blend_history(smooth, alpha, previous, local)
        out_ref[b, k, pl.ds(t * T, T)] = local


@functools.partial(jax.jit, static_argnames=("normalise", "smooth", "alpha", "matmul_dtype",
                                             "block_sizes", "interpret"))
def score_update(queries, keys, valid, global_score=None, *, normalise: bool = True,
                 smooth: str = "max", alpha: float = 0.8, matmul_dtype: str = "float32",
                 block_sizes: BlockSizes | None = None, interpret=None):
    """The Mosaic GPU score update; same contract as `score_update.score_update`.

    `interpret`: None (compile for the GPU) or GPU interpret mode ("gpu" or an
    `InterpretGPUParams`).
    """
    B, N, W, H = queries.shape
    K, S = keys.shape[1], keys.shape[2]
    G = N // K
    _common.check_block_sizes(block_sizes, BlockSizes)
    block_sizes = block_sizes or BlockSizes()
    T = gc.fit_tile(block_sizes.block_s, S)
    S_pad = _common.round_up(S, T)
    H_pad = _common.round_up(H, gc.TILE_COLS)
    shape = _Shape(S=S, T=T, tiles=S_pad // T, W=W, G=G, H=H_pad, scale=math.sqrt(H))

    # [B, K, G * W, H]: heads of a group are adjacent, so this is a free reshape. Slots are
    # padded to whole tiles and the head dim to whole tile columns only when needed.
    grouped = queries.reshape(B, K, G * W, H)
    if H_pad != H:
        grouped = jnp.pad(grouped, ((0, 0), (0, 0), (0, 0), (0, H_pad - H)))
    if S_pad != S or H_pad != H:
        keys = jnp.pad(keys, ((0, 0), (0, 0), (0, S_pad - S), (0, H_pad - H)))
    valid_i32 = jnp.pad(valid.astype(jnp.int32), ((0, 0), (0, S_pad - S)))
    args = [grouped, keys, valid_i32]
    smooth_arg = None
    if global_score is not None:
        pad = S_pad - global_score.shape[-1]  # rows without history: NaN
        args.append(jnp.pad(global_score.astype(jnp.float32), ((0, 0), (0, 0), (0, pad)),
                            constant_values=jnp.nan))
        smooth_arg = smooth
    params = gc.interpret_params(interpret)
    body = functools.partial(
        _kernel, shape=shape, normalise=normalise, smooth=smooth_arg, alpha=float(alpha),
        operand_dtype=_common.matmul_operand_dtype(matmul_dtype),
        emit=gc.Emit(interpret=params is not None))
    out = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((B, K, S_pad), jnp.float32),
        scratch_types=[plgpu.SMEM((G * W,), jnp.float32),  # running max m of each row
                       plgpu.SMEM((G * W,), jnp.float32)],  # running sum l
        grid=(B, K),
        grid_names=("b", "k"),
        interpret=params,
    )(*args)
    return out[:, :, : S - W]
