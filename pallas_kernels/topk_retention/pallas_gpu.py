"""Top-k retention as two Mosaic GPU kernels (Hopper): selection without a sort, compaction.

Selection (`keep_top`, grid (B, K), one CTA = one warpgroup per candidate row), with the
candidates in chunks of `block_p` (flat `strided` layout):

  1. The kernel ranks the int32 keys of `reference.ranking_key` (scores in the IEEE total
     order, -0.0 below 0.0; NaN scores below -inf; invalid candidates below those); padding
     gets INT32_MIN, below every key.
  2. A 32-step bitwise search finds the threshold t = the count-th largest key: the largest t
     with #{key >= t} >= count (whole-vector counts).
  3. keep = key > t, plus the first (count - #{key > t}) keys equal to t in slot order (ties to
     the lowest slot). The inclusive prefix counts of "above" and "tie" come from a
     Hillis-Steele scan in SMEM (log2(block_p) shifted re-loads; the barriers Pallas inserts
     around SMEM stores order the steps); cs = above count + min(tie count, missing) is each
     kept slot's rank + 1, written to a GMEM scratch as hit = cs (kept) or -1.
  4. Output ranks i come in blocks of 64 (`ROW`): kept_index[i] and the carried score are the
     slot and score of the unique slot with hit == i + 1, found by a [64 outputs, 64 slots]
     comparison (`where`, never a product, so NaN of invalid candidates cannot leak). Since at
     most E = P - count slots are dropped, kept_index[i] is in [i, i + E]: each block visits
     only (63 + E) // 64 + 1 slot tiles.

Compaction (`compact_rows`, grid (B, K)): output slot i of a sequence takes input slot
source[i] >= i (the kept rows in order, the W window rows, then empty = a zero row). Blocks of
`block_rows` rows are gathered row by row with TMA copies GMEM -> SMEM (one barrier counting
every row copy), then written back with one TMA copy SMEM -> GMEM. Rows are copied bit for bit
(NaN included, unlike the TPU kernel's one-hot products). Compiled, keys and values are
mutable refs (`jax.new_ref`) aliased in and out of the kernel, so under
`jax.jit(..., donate_argnums=...)` the cache is compacted in place: block r reads only slots
>= its first slot, which no earlier block wrote, and is written after its reads completed.
GPU interpret mode (JAX 0.10) cannot take refs, so there the kernel writes new outputs. Rows
that TMA cannot copy (not a multiple of 128 bytes, or more than 256 elements) are gathered by
XLA instead.

Speed (unmeasured: checked only in GPU interpret mode on CPU and by lowering to Mosaic GPU):
the selection is O(P log P) flat vector work per head plus the [64 x 64] output tiles; the
compaction issues one TMA copy per row and waits once per block: double-buffering the blocks
(two SMEM buffers and barriers) would overlap the gathers of block r + 1 with the write-back of
block r, and an inactive sequence could skip its identity copy when aliased.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from gkv_jax.pallas_kernels import _common
from gkv_jax.pallas_kernels import _gpu_common as gc
from gkv_jax.pallas_kernels.topk_retention import reference

_INT32_MIN = np.int32(np.iinfo(np.int32).min)
_OUT = gc.TILE_ROWS  # output ranks per block, slots per input tile of step 4


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of the GPU top-k kernels.

    Attributes:
      block_p: candidates per chunk of the selection (a multiple of 128; P rounded up to 128
        when smaller). One chunk is held in registers (block_p / 128 values per thread).
      block_rows: cache rows per compaction block (a multiple of 8); its SMEM buffers hold
        block_rows x (H + Hv) elements.
    """

    block_p: int = 2048
    block_rows: int = 64

    def __post_init__(self):
        _common.check_block("block_p", self.block_p, gc.WARPGROUP)
        _common.check_block("block_rows", self.block_rows, 8)


def _check_block_sizes(block_sizes) -> BlockSizes:
    _common.check_block_sizes(block_sizes, BlockSizes)
    return block_sizes or BlockSizes()


# ---------------------------------------------------------------------------------- selection
def _over_chunks(chunks: int, body, init):
    """fori_loop over the chunks (a plain call when there is one)."""
    return body(0, init) if chunks == 1 else jax.lax.fori_loop(0, chunks, body, init)


def _inclusive_scan(x, buffer_ref, C: int, emit: gc.Emit):
    """Inclusive prefix sum of a flat [C] vector (Hillis-Steele through an SMEM buffer [2C]
    whose first C entries are 0)."""
    layout = gc.strided(C)
    shift = 1
    while shift < C:
        buffer_ref[pl.ds(C, C)] = x
        x = x + emit.load(buffer_ref, pl.ds(C - shift, C), layout)
        shift *= 2
    return x


def _threshold(count_where, count: int):
    """The count-th largest key: bit by bit from the top, in the unsigned order."""
    found = jnp.int32(0)
    for bit in range(31, -1, -1):
        candidate = found | np.int32(np.uint32(1 << bit).view(np.int32))
        at_least = count_where(lambda key, c=candidate: key >= (c ^ _INT32_MIN))
        found = jnp.where(at_least >= count, candidate, found)
    return found ^ _INT32_MIN


def _select_kernel(keys_ref, *rest, P: int, C: int, chunks: int, count: int,
                   window_tiles: int, with_carried: bool, emit: gc.Emit):
    if with_carried:
        carried_ref, kept_ref, carried_out_ref, hit_ref, above_buf, tie_buf = rest
    else:
        kept_ref, hit_ref, above_buf, tie_buf = rest
        carried_ref = carried_out_ref = None
    b, k = jax.lax.axis_index("b"), jax.lax.axis_index("k")
    layout = gc.strided(C)
    slot_tiles = chunks * C // _OUT

    def load_keys(c):  # [C] int32 keys of chunk c
        keys = emit.load(keys_ref, (b, k, pl.ds(c * C, C)), layout)
        slots = c * C + emit.iota(C, layout)
        return jnp.where(slots < P, keys, _INT32_MIN)

    if chunks == 1:
        only = load_keys(0)
        keys_of = lambda c: only  # noqa: E731
    else:
        keys_of = load_keys

    def count_where(predicate):  # float32 count of the keys satisfying `predicate`
        def add(c, n):
            return n + jnp.sum(jnp.where(predicate(keys_of(c)), 1.0, 0.0))
        return _over_chunks(chunks, add, jnp.float32(0.0))

    threshold = _threshold(count_where, count)
    missing = count - count_where(lambda key: key > threshold)
    zeros = emit.full(C, 0.0, jnp.float32, layout)
    above_buf[pl.ds(0, C)] = zeros
    tie_buf[pl.ds(0, C)] = zeros

    def rank_chunk(c, before):
        above_before, ties_before = before
        key = keys_of(c)
        above = jnp.where(key > threshold, 1.0, 0.0)
        tie = jnp.where(key == threshold, 1.0, 0.0)
        ties = _inclusive_scan(tie, tie_buf, C, emit) + ties_before
        cs = (_inclusive_scan(above, above_buf, C, emit) + above_before
              + jnp.minimum(ties, missing))
        keep = (above > 0) | ((tie > 0) & (ties - tie < missing))
        hit_ref[b, k, pl.ds(c * C, C)] = jnp.where(keep, cs, -1.0)
        return above_before + jnp.sum(above), ties_before + jnp.sum(tie)

    _over_chunks(chunks, rank_chunk, (jnp.float32(0.0), jnp.float32(0.0)))

    @pl.loop(0, kept_ref.shape[-1] // _OUT)
    def _output_block(block):
        target = (block * _OUT + 1 + emit.iota(_OUT, gc.ROW)).astype(jnp.float32)  # i + 1

        def slot_tile(step, acc):
            index, value = acc
            q = block + step
            in_range = q < slot_tiles
            q = jnp.minimum(q, slot_tiles - 1)
            hits = emit.load(hit_ref, (b, k, pl.ds(q * _OUT, _OUT)), gc.COL)
            match = (gc.broadcast_rows(hits, _OUT) == gc.broadcast_cols(target, _OUT)) & (
                in_range)
            slots = (q * _OUT + emit.iota(_OUT, gc.COL)).astype(jnp.float32)
            index = index + jnp.sum(jnp.where(match, gc.broadcast_rows(slots, _OUT), 0.0),
                                    axis=1)
            if with_carried:
                carried = emit.load(carried_ref, (b, k, pl.ds(q * _OUT, _OUT)), gc.COL)
                value = value + jnp.sum(
                    jnp.where(match, gc.broadcast_rows(carried, _OUT), 0.0), axis=1)
            return index, value

        zeros_out = emit.full(_OUT, 0.0, jnp.float32, gc.ROW)
        index, value = jax.lax.fori_loop(0, window_tiles, slot_tile, (zeros_out, zeros_out))
        kept_ref[b, k, pl.ds(block * _OUT, _OUT)] = index.astype(jnp.int32)
        if with_carried:
            carried_out_ref[b, k, pl.ds(block * _OUT, _OUT)] = value


@functools.partial(jax.jit, static_argnames=("count", "block_sizes", "interpret"))
def keep_top(scores, carried, candidate_valid, count: int, *,
             block_sizes: BlockSizes | None = None, interpret=None):
    """The Mosaic GPU selection; same contract as `topk_retention.keep_top`.

    `interpret`: None (compile for the GPU) or GPU interpret mode ("gpu" or an
    `InterpretGPUParams`).
    """
    B, K, P = scores.shape
    block_sizes = _check_block_sizes(block_sizes)
    C = min(block_sizes.block_p, _common.round_up(P, gc.WARPGROUP))
    P_pad = _common.round_up(P, C)
    count_pad = _common.round_up(count, _OUT)

    def pad(x, fill):
        return jnp.pad(x, ((0, 0), (0, 0), (0, P_pad - P)), constant_values=fill)

    args = [pad(reference.ranking_key(scores, candidate_valid), _INT32_MIN)]
    out_type = [jax.ShapeDtypeStruct((B, K, count_pad), jnp.int32)]
    with_carried = carried is not None
    if with_carried:
        args.append(pad(reference.masked_carried(carried, candidate_valid), jnp.nan))
        out_type.append(jax.ShapeDtypeStruct((B, K, count_pad), jnp.float32))
    out_type.append(jax.ShapeDtypeStruct((B, K, P_pad), jnp.float32))  # hit (scratch)
    params = gc.interpret_params(interpret)
    body = functools.partial(
        _select_kernel, P=P, C=C, chunks=P_pad // C, count=count,
        window_tiles=min(P_pad // _OUT, (_OUT - 1 + P - count) // _OUT + 1),
        with_carried=with_carried, emit=gc.Emit(interpret=params is not None))
    outs = plgpu.kernel(
        body,
        out_type=out_type,
        scratch_types=[plgpu.SMEM((2 * C,), jnp.float32),  # scan buffers: C zeros, C values
                       plgpu.SMEM((2 * C,), jnp.float32)],
        grid=(B, K),
        grid_names=("b", "k"),
        interpret=params,
    )(*args)
    kept = outs[0][:, :, :count]
    return kept, (outs[1][:, :, :count] if with_carried else None)


# --------------------------------------------------------------------------------- compaction
def _copy_block(source_ref, zero_keys_ref, zero_values_ref, keys_in, values_in, keys_out,
                values_out, keys_smem, values_smem, barrier, b, k, first, rows: int):
    """Rows [first, first + rows) of the outputs from their source rows (TMA gathers)."""

    @pl.loop(0, rows)
    def _gather(i):
        source = source_ref[b, k, first + i]

        @pl.when(source >= 0)
        def _row():
            plgpu.copy_gmem_to_smem(keys_in.at[b, k, source], keys_smem.at[i], barrier)
            plgpu.copy_gmem_to_smem(values_in.at[b, k, source], values_smem.at[i], barrier)

        @pl.when(source < 0)
        def _empty():
            plgpu.copy_gmem_to_smem(zero_keys_ref.at[0], keys_smem.at[i], barrier)
            plgpu.copy_gmem_to_smem(zero_values_ref.at[0], values_smem.at[i], barrier)

    plgpu.barrier_wait(barrier)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(keys_smem.at[pl.ds(0, rows)], keys_out.at[b, k, pl.ds(first, rows)])
    plgpu.copy_smem_to_gmem(values_smem.at[pl.ds(0, rows)],
                            values_out.at[b, k, pl.ds(first, rows)])
    plgpu.wait_smem_to_gmem(0)  # before the buffers are refilled (and the kernel ends)


def _compact_kernel(source_ref, zero_keys_ref, zero_values_ref, keys_in, values_in, keys_out,
                    values_out, keys_smem, values_smem, barrier, tail_barrier, *, S: int,
                    rows: int):
    b, k = jax.lax.axis_index("b"), jax.lax.axis_index("k")
    copy = functools.partial(_copy_block, source_ref, zero_keys_ref, zero_values_ref, keys_in,
                             values_in, keys_out, values_out, keys_smem, values_smem, b=b, k=k)

    @pl.loop(0, S // rows)
    def _block(r):
        copy(barrier, first=r * rows, rows=rows)

    if S % rows:
        copy(tail_barrier, first=S - S % rows, rows=S % rows)


def tma_rows(x) -> bool:
    """Whether the rows [..., H] of x can be TMA copies: a multiple of 128 bytes (what a
    warpgroup-issued copy needs) and at most 256 elements (a TMA box dimension)."""
    return (x.shape[-1] * x.dtype.itemsize) % gc.WARPGROUP == 0 and x.shape[-1] <= 256


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def compact_rows(keys, values, source, *, block_sizes: BlockSizes | None = None,
                 interpret=None):
    """out[b, k, i] = x[b, k, source[b, k, i]] (0 where source is -1), for keys and values.

    Args:
      keys: [B, K, S, H]; values: [B, K, S, Hv], both with `tma_rows`; compiled, both are
        aliased to the outputs (in place under donation).
      source: [B, K, S] int32 with source[i] in [i, S) or -1 (what `reference.row_map`
        gives for kept indices strictly increasing).
      interpret: None (compile for the GPU) or GPU interpret mode.
    """
    B, K, S, H = keys.shape
    Hv = values.shape[3]
    if not (tma_rows(keys) and tma_rows(values)):
        raise ValueError(f"rows of {keys.shape[-1]} x {keys.dtype} / {values.shape[-1]} x "
                         f"{values.dtype} cannot be TMA copies (see tma_rows)")
    rows = min(_check_block_sizes(block_sizes).block_rows, S)
    tail = S % rows
    scratch = [plgpu.SMEM((rows, H), keys.dtype), plgpu.SMEM((rows, Hv), values.dtype),
               plgpu.Barrier(num_arrivals=2 * rows),
               plgpu.Barrier(num_arrivals=2 * max(tail, 1))]
    body = functools.partial(_compact_kernel, S=S, rows=rows)
    zero_keys = jnp.zeros((1, H), keys.dtype)
    zero_values = jnp.zeros((1, Hv), values.dtype)
    params = gc.interpret_params(interpret)
    if params is not None:  # GPU interpret mode: no refs, new outputs
        return plgpu.kernel(
            body,
            out_type=[jax.ShapeDtypeStruct(keys.shape, keys.dtype),
                      jax.ShapeDtypeStruct(values.shape, values.dtype)],
            scratch_types=scratch, grid=(B, K), grid_names=("b", "k"), interpret=params,
        )(source, zero_keys, zero_values, keys, values)

    def in_place(source_ref, zero_keys_ref, zero_values_ref, keys_ref, values_ref):
        pl.run_scoped(functools.partial(body, source_ref, zero_keys_ref, zero_values_ref,
                                        keys_ref, values_ref, keys_ref, values_ref), *scratch)

    keys_ref, values_ref = jax.new_ref(keys), jax.new_ref(values)
    pl.kernel(in_place, out_type=(), mesh=plgpu.Mesh(grid=(B, K), grid_names=("b", "k")),
              compiler_params=plgpu.CompilerParams(), name="compact_rows")(
        source, zero_keys, zero_values, keys_ref, values_ref)
    return keys_ref[...], values_ref[...]


@functools.partial(jax.jit, static_argnames=("window", "block_sizes", "interpret"))
def compact(keys, values, positions, global_score, kept_index, *, window: int, active=None,
            new_score=None, replace_score=None, block_sizes: BlockSizes | None = None,
            interpret=None):
    """The Mosaic GPU compaction; same contract as `topk_retention.compact`.

    Rows that cannot be TMA copies (`tma_rows`: H * itemsize not a multiple of 128 bytes, or
    H > 256) are gathered by XLA instead (`reference.gather_rows`, not in place).
    """
    S = keys.shape[2]
    source = reference.row_map(kept_index, S, window, active)
    if tma_rows(keys) and tma_rows(values):
        new_keys, new_values = compact_rows(keys, values, source, block_sizes=block_sizes,
                                            interpret=interpret)
    else:
        new_keys = reference.gather_rows(keys, source, 0)
        new_values = reference.gather_rows(values, source, 0)
    new_positions, score = reference.compact_scalars(positions, global_score, source, window,
                                                     active, new_score, replace_score)
    return new_keys, new_values, new_positions, score
