"""The score update as one Mosaic TPU kernel for all KV heads of a layer.

Grid (B, K, 3 phases, T tiles of `block_s` slots); every (sequence, KV head) runs three
sweeps over its slots, all in VMEM:

  phase 0: the online softmax statistics (row max m and sum l) of each of the G * W window
           queries of the head's group over all S keys (q.k / sqrt(H), causal inside the
           window, invalid keys masked);
  phase 1: per tile, the probabilities exp(x - m) / l, their maximum over the group and their
           mean over the W queries: the local score A of the tile, kept in a VMEM scratch of
           S floats, and its running maximum;
  phase 2: per tile, Â = A / max(A) and the global-score update (max / mean / sum with the
           history; NaN history = none), written out.

Keys are read twice (phases 0 and 1); when S fits one tile (T = 1) the block index never
changes and they are read once. Invalid slots (pads, empty slots, the tail of a partial tile)
are masked with `jnp.where` before any product, so NaN there never leaks. Only [G * W, tile]
logits live at a time; nothing of size S x S or B x S x ... beyond the output is allocated.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from gkv_jax.pallas_kernels import _common
from gkv_jax.pallas_kernels.score_update.reference import blend_history


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of the score-update kernel.

    Attributes:
      block_s: slots per tile (a multiple of 128; the whole S when S is not larger).
    """

    block_s: int = 1024

    def __post_init__(self):
        _common.check_block("block_s", self.block_s, _common.LANES)


def _kernel(q_ref, k_ref, vrow_ref, vcol_ref, *rest, S: int, W: int, G: int, H: int,
            block_s: int, normalise: bool, smooth: str | None, alpha: float, operand_dtype,
            precision):
    if smooth is None:
        out_ref, m_ref, l_ref, a_ref, amax_ref = rest
        hist_ref = None
    else:
        hist_ref, out_ref, m_ref, l_ref, a_ref, amax_ref = rest
    phase, t = pl.program_id(2), pl.program_id(3)
    scale = math.sqrt(H)

    def logits_and_mask(g):
        """[W, block_s] logits of query group member g on tile t, and which are visible."""
        cols = t * block_s + jax.lax.broadcasted_iota(jnp.int32, (W, block_s), 1)
        rows = S - W + jax.lax.broadcasted_iota(jnp.int32, (W, block_s), 0)
        visible = (vrow_ref[...] != 0) & (cols < S) & (cols <= rows)
        key_rows = t * block_s + jax.lax.broadcasted_iota(jnp.int32, (block_s, 1), 0)
        key_ok = (vcol_ref[...] != 0) & (key_rows < S)
        keys = jnp.where(key_ok, k_ref[...].astype(jnp.float32), 0.0).astype(operand_dtype)
        q = q_ref[g].astype(jnp.float32).astype(operand_dtype)
        logits = jax.lax.dot_general(q, keys, (((1,), (1,)), ((), ())), precision=precision,
                                     preferred_element_type=jnp.float32) / scale
        return jnp.where(visible, logits, _common.MASKED_LOGIT), visible

    @pl.when((phase == 0) & (t == 0))
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, _common.MASKED_LOGIT, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        amax_ref[...] = jnp.zeros(amax_ref.shape, jnp.float32)

    @pl.when(phase == 0)
    def _statistics():
        for g in range(G):
            x, visible = logits_and_mask(g)
            m_old = m_ref[g]
            m_new = jnp.maximum(m_old, jnp.max(x, axis=1, keepdims=True))
            p = jnp.where(visible, jnp.exp(x - m_new), 0.0)
            l_ref[g] = l_ref[g] * jnp.exp(m_old - m_new) + jnp.sum(p, axis=1, keepdims=True)
            m_ref[g] = m_new

    @pl.when(phase == 1)
    def _local_score():
        best = None
        for g in range(G):
            x, visible = logits_and_mask(g)
            denominator = l_ref[g]
            safe = jnp.where(denominator > 0, denominator, 1.0)
            probs = jnp.where(visible, jnp.exp(x - m_ref[g]) / safe, 0.0)
            best = probs if best is None else jnp.maximum(best, probs)
        local = jnp.sum(best, axis=0, keepdims=True) / W  # [1, block_s]
        cols = t * block_s + jax.lax.broadcasted_iota(jnp.int32, (1, block_s), 1)
        local = jnp.where(cols < S - W, local, 0.0)
        a_ref[t] = local
        amax_ref[...] = jnp.maximum(amax_ref[...], jnp.max(local, axis=1, keepdims=True))

    @pl.when(phase == 2)
    def _update():
        local = a_ref[t]
        if normalise:
            peak = amax_ref[...]
            local = jnp.where(peak > 0, local / jnp.where(peak > 0, peak, 1.0), 0.0)
        if hist_ref is not None:
            local = blend_history(smooth, alpha, hist_ref[...].astype(jnp.float32), local)
        out_ref[...] = local


@functools.partial(jax.jit, static_argnames=("normalise", "smooth", "alpha", "matmul_dtype",
                                             "block_sizes", "interpret"))
def score_update(queries, keys, valid, global_score=None, *, normalise: bool = True,
                 smooth: str = "max", alpha: float = 0.8, matmul_dtype: str = "float32",
                 block_sizes: BlockSizes | None = None, interpret=False):
    """The Pallas score update; same contract as `score_update.score_update`."""
    B, N, W, H = queries.shape
    K, S = keys.shape[1], keys.shape[2]
    G = N // K
    block_sizes = block_sizes or BlockSizes()
    block_s = _common.fit_block(block_sizes.block_s, S)
    T = pl.cdiv(S, block_s)

    grouped = queries.reshape(B, K, G, W, H)  # free: heads of a group are adjacent
    valid_i32 = valid.astype(jnp.int32)
    vrow = valid_i32[:, None, :]  # [B, 1, S] for the logits' columns
    vcol = valid_i32[:, :, None]  # [B, S, 1] for the key rows

    def key_tile(b, k, p, t):  # phase 2 stays on the last tile: no refetch
        return jnp.where(p == 2, T - 1, t)

    def out_tile(b, k, p, t):  # phases 0-1 park on tile 0 without writing it
        return jnp.where(p == 2, t, 0)

    in_specs = [
        pl.BlockSpec((None, None, G, W, H), lambda b, k, p, t: (b, k, 0, 0, 0)),
        pl.BlockSpec((None, None, block_s, H), lambda b, k, p, t: (b, k, key_tile(b, k, p, t),
                                                                   0)),
        pl.BlockSpec((None, 1, block_s), lambda b, k, p, t: (b, 0, key_tile(b, k, p, t))),
        pl.BlockSpec((None, block_s, 1), lambda b, k, p, t: (b, key_tile(b, k, p, t), 0)),
    ]
    args = [grouped, keys, vrow, vcol]
    smooth_arg = None
    if global_score is not None:
        pad = S - global_score.shape[-1]  # rows without history: NaN
        history = jnp.pad(global_score.astype(jnp.float32), ((0, 0), (0, 0), (0, pad)),
                          constant_values=jnp.nan)[:, :, None, :]
        in_specs.append(pl.BlockSpec((None, None, 1, block_s),
                                     lambda b, k, p, t: (b, k, 0, out_tile(b, k, p, t))))
        args.append(history)
        smooth_arg = smooth
    kernel = functools.partial(
        _kernel, S=S, W=W, G=G, H=H, block_s=block_s, normalise=normalise, smooth=smooth_arg,
        alpha=float(alpha), operand_dtype=_common.matmul_operand_dtype(matmul_dtype),
        precision=_common.matmul_precision(matmul_dtype))
    out = pl.pallas_call(
        kernel,
        grid=(B, K, 3, T),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, 1, block_s),
                               lambda b, k, p, t: (b, k, 0, out_tile(b, k, p, t))),
        out_shape=jax.ShapeDtypeStruct((B, K, 1, S), jnp.float32),
        scratch_shapes=[
            pltpu.VMEM((G, W, 1), jnp.float32),  # running max m
            pltpu.VMEM((G, W, 1), jnp.float32),  # running sum l
            pltpu.VMEM((T, 1, block_s), jnp.float32),  # the local score A of every tile
            pltpu.VMEM((1, 1), jnp.float32),  # max(A)
        ],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary", "arbitrary")),
        interpret=interpret,
    )(*args)
    return out[:, :, 0, : S - W]
