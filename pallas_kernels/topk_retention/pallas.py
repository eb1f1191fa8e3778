"""Top-k retention as two Mosaic TPU kernels: selection without a sort, in-place compaction.

Selection (`keep_top`, grid (B, K), one candidate row per step, laid out [P / 128, 128]):

  1. The kernel ranks the int32 keys of `reference.ranking_key` (scores in the IEEE total
     order, -0.0 below 0.0; NaN scores below -inf; invalid candidates below those); padding
     gets INT32_MIN, below every key.
  2. A 32-step bitwise search finds the threshold t = the count-th largest key: the largest t
     with #{key >= t} >= count.
  3. keep = key > t, plus the first (count - #{key > t}) keys equal to t in slot order: ties
     go to the lowest slot index.
  4. The inclusive prefix sum cs of keep (exact small-integer matmuls with triangular ones
     matrices) gives each kept slot its rank; kept_index[i] = #{j : cs[j] <= i}, so the
     indices come out sorted. Since at most E = P - count slots are dropped, kept_index[i] is
     in [i, i + E]: each block of 128 outputs only looks at (127 + E) // 128 + 1 rows of cs.
     The carried score is gathered by the same comparison (a `where`, never a product).

Compaction (`compact_rows`, grid (B, K, output blocks, input steps)): output slot i of a
sequence takes input slot source[i] >= i (the kept rows in order, the W window rows, then
empty), as one-hot matrix products [out, in] x [in, H] accumulated in float32 (exact: one
non-zero term per row). Each output block visits only the input blocks between its first and
last source (scalar-prefetched), so the work is linear in S even when most slots are dropped
(a long prompt). Non-finite entries of the input tile are zeroed first, so NaN in empty slots
cannot leak through 0 * NaN. Keys and values are aliased to the outputs
(`input_output_aliases`): under `jax.jit(..., donate_argnums=...)` the cache is compacted in
place. In place is safe because output block r only reads input slots >= its first slot and
is written back after it is computed.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from gkv_jax.pallas_kernels import _common
from gkv_jax.pallas_kernels.topk_retention import reference

_LANES = _common.LANES
_INT32_MIN = np.int32(np.iinfo(np.int32).min)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of the compaction kernel (selection works on whole candidate rows).

    Attributes:
      block_out: output slots per step (a multiple of `block_in`).
      block_in: input slots per one-hot product (a multiple of 128).
    """

    block_out: int = 256
    block_in: int = 128

    def __post_init__(self):
        _common.check_block("block_in", self.block_in, _LANES)
        _common.check_block("block_out", self.block_out, self.block_in)


# ---------------------------------------------------------------------------------- selection
def _inclusive_prefix(x):
    """Row-major inclusive prefix sum of a [R, 128] float32 array of small integers, exact."""
    R = x.shape[0]
    upper = (jax.lax.broadcasted_iota(jnp.int32, (_LANES, _LANES), 0)
             <= jax.lax.broadcasted_iota(jnp.int32, (_LANES, _LANES), 1)).astype(jnp.float32)
    within = jnp.dot(x, upper, precision=jax.lax.Precision.HIGHEST,
                     preferred_element_type=jnp.float32)
    totals = jnp.broadcast_to(jnp.sum(x, axis=1, keepdims=True), (R, _LANES))
    strictly_lower = (jax.lax.broadcasted_iota(jnp.int32, (R, R), 1)
                      < jax.lax.broadcasted_iota(jnp.int32, (R, R), 0)).astype(jnp.float32)
    return within + jnp.dot(strictly_lower, totals, precision=jax.lax.Precision.HIGHEST,
                            preferred_element_type=jnp.float32)


def _total(x):
    """Sum of a [R, 128] array as [1, 1]."""
    return jnp.sum(jnp.sum(x, axis=1, keepdims=True), axis=0, keepdims=True)


def _select_kernel(keys_ref, *rest, P: int, count: int, out_blocks: int, window_rows: int,
                   with_carried: bool):
    if with_carried:
        carried_ref, kept_ref, carried_out_ref, cs_ref, keep_ref = rest
    else:
        kept_ref, cs_ref, keep_ref = rest
        carried_ref = carried_out_ref = None
    R = keys_ref.shape[0]
    slot = (jax.lax.broadcasted_iota(jnp.int32, (R, _LANES), 0) * _LANES
            + jax.lax.broadcasted_iota(jnp.int32, (R, _LANES), 1))
    key = jnp.where(slot < P, keys_ref[...], _INT32_MIN)

    # Threshold: bit by bit from the top, in the unsigned order (key ^ INT32_MIN).
    found = jnp.zeros((1, 1), jnp.int32)
    for bit in range(31, -1, -1):
        candidate = found | np.int32(np.uint32(1 << bit).view(np.int32))
        at_least = _total(jnp.where(key >= (candidate ^ _INT32_MIN), 1.0, 0.0))
        found = jnp.where(at_least >= count, candidate, found)
    threshold = found ^ _INT32_MIN

    above = key > threshold
    tie = key == threshold
    missing = count - _total(jnp.where(above, 1.0, 0.0))
    tie_f = jnp.where(tie, 1.0, 0.0)
    tie_rank = _inclusive_prefix(tie_f) - tie_f  # exclusive: earlier ties
    keep = jnp.where(above | (tie & (tie_rank < missing)), 1.0, 0.0)
    cs_ref[...] = _inclusive_prefix(keep)
    keep_ref[...] = keep

    def output_block(ob, carry):
        first = pl.multiple_of(ob * _LANES, _LANES)
        target = (first + jax.lax.broadcasted_iota(jnp.int32, (_LANES, 1), 0)).astype(
            jnp.float32)  # [128, 1]: output ranks i along sublanes

        def input_row(step, acc):
            rank, value = acc
            q = ob + step
            in_range = q < R
            row = jnp.minimum(q, R - 1)
            cs = cs_ref[pl.ds(row, 1), :]  # [1, 128]
            rank = rank + jnp.sum(jnp.where(in_range & (cs <= target), 1.0, 0.0), axis=1,
                                  keepdims=True)
            if with_carried:
                hit = in_range & (keep_ref[pl.ds(row, 1), :] > 0) & (cs == target + 1.0)
                value = value + jnp.sum(jnp.where(hit, carried_ref[pl.ds(row, 1), :], 0.0),
                                        axis=1, keepdims=True)
            return rank, value

        # Slots before `first` all have cs <= first: their count is `first`.
        zeros = jnp.zeros((_LANES, 1), jnp.float32)
        rank, value = jax.lax.fori_loop(0, window_rows, input_row, (zeros + first, zeros))
        kept_ref[pl.ds(first, _LANES), :] = rank.astype(jnp.int32)
        if with_carried:
            carried_out_ref[pl.ds(first, _LANES), :] = value
        return carry

    jax.lax.fori_loop(0, out_blocks, output_block, 0)


@functools.partial(jax.jit, static_argnames=("count", "interpret"))
def keep_top(scores, carried, candidate_valid, count: int, *, interpret=False):
    """The Pallas selection; same contract as `topk_retention.keep_top`."""
    B, K, P = scores.shape
    # Whole [128, 128] tiles: the prefix-sum products stay MXU-aligned.
    rows = _common.round_up(pl.cdiv(P, _LANES), _LANES)
    out_blocks = pl.cdiv(count, _LANES)
    def layout(x, fill):  # [B, K, P] -> [B, K, rows, 128]
        x = jnp.pad(x, ((0, 0), (0, 0), (0, rows * _LANES - P)), constant_values=fill)
        return x.reshape(B, K, rows, _LANES)

    row_spec = pl.BlockSpec((None, None, rows, _LANES), lambda b, k: (b, k, 0, 0))
    col_spec = pl.BlockSpec((None, None, out_blocks * _LANES, 1), lambda b, k: (b, k, 0, 0))
    col_shape = (B, K, out_blocks * _LANES, 1)
    keys = reference.ranking_key(scores, candidate_valid)
    args, in_specs = [layout(keys, _INT32_MIN)], [row_spec]
    out_specs, out_shape = [col_spec], [jax.ShapeDtypeStruct(col_shape, jnp.int32)]
    with_carried = carried is not None
    if with_carried:
        args.append(layout(reference.masked_carried(carried, candidate_valid), jnp.nan))
        in_specs.append(row_spec)
        out_specs.append(col_spec)
        out_shape.append(jax.ShapeDtypeStruct(col_shape, jnp.float32))
    dropped = P - count
    kernel = functools.partial(
        _select_kernel, P=P, count=count, out_blocks=out_blocks,
        window_rows=min(rows, (_LANES - 1 + dropped) // _LANES + 1), with_carried=with_carried)
    outs = pl.pallas_call(
        kernel,
        grid=(B, K),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((rows, _LANES), jnp.float32),
                        pltpu.VMEM((rows, _LANES), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=interpret,
    )(*args)
    kept = outs[0][:, :, :count, 0]
    return kept, (outs[1][:, :, :count, 0] if with_carried else None)


# --------------------------------------------------------------------------------- compaction
def _block_index(b, k, r, K: int, R: int):
    """The flat index of output block r of (sequence b, KV head k) in the scalar-prefetched
    first / last arrays, which are 1-D: SMEM pads the last dimension of an array to 128
    words, so [B, K, R] arrays would take B x K x 128 words each and overflow SMEM's 1 MB at
    batch 128 with 8 KV heads (found by compiling for TPU, benchmarks/kernel_matrix.py)."""
    return (b * K + k) * R + r


def _compact_kernel(first_ref, last_ref, source_ref, keys_ref, values_ref, keys_out_ref,
                    values_out_ref, keys_acc_ref, values_acc_ref, *, block_in: int, K: int,
                    R: int):
    b, k, r, t = (pl.program_id(i) for i in range(4))
    block = _block_index(b, k, r, K, R)
    q = first_ref[block] + t  # the input block this step reads

    @pl.when(t == 0)
    def _init():
        keys_acc_ref[...] = jnp.zeros(keys_acc_ref.shape, jnp.float32)
        values_acc_ref[...] = jnp.zeros(values_acc_ref.shape, jnp.float32)

    @pl.when((first_ref[block] >= 0) & (q <= last_ref[block]))
    def _accumulate():
        slots = q * block_in + jax.lax.broadcasted_iota(
            jnp.int32, (source_ref.shape[0], block_in), 1)
        one_hot = jnp.where(source_ref[...] == slots, 1.0, 0.0)  # [out, in] float32
        for x_ref, acc_ref in ((keys_ref, keys_acc_ref), (values_ref, values_acc_ref)):
            dtype = x_ref.dtype
            x = x_ref[...].astype(jnp.float32)
            x = jnp.where(jnp.abs(x) < jnp.inf, x, 0.0).astype(dtype)  # exact round trip
            precision = (jax.lax.Precision.HIGHEST if dtype == jnp.float32
                         else jax.lax.Precision.DEFAULT)
            acc_ref[...] += jnp.dot(one_hot.astype(dtype), x, precision=precision,
                                    preferred_element_type=jnp.float32)

    @pl.when(t == pl.num_programs(3) - 1)
    def _write():
        keys_out_ref[...] = keys_acc_ref[...].astype(keys_out_ref.dtype)
        values_out_ref[...] = values_acc_ref[...].astype(values_out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("max_shift", "block_sizes", "interpret"))
def compact_rows(keys, values, source, *, max_shift: int, block_sizes: BlockSizes | None = None,
                 interpret=False):
    """out[b, k, i] = x[b, k, source[b, k, i]] (0 where source is -1), for keys and values.

    Each output block reads only the input blocks between its first and last source (scalar
    prefetch); the grid's static step count covers the widest possible range.

    Args:
      keys: [B, K, S, H]; values: [B, K, S, H'] (aliased to the outputs).
      source: [B, K, S] int32, non-decreasing over the valid entries, with source[i] in
        [i, i + max_shift] or -1.
      max_shift: static bound of source[i] - i.
    """
    B, K, S, H = keys.shape
    Hv = values.shape[3]
    block_sizes = block_sizes or BlockSizes()
    block_out = _common.fit_block(block_sizes.block_out, S)
    block_in = _common.fit_block(block_sizes.block_in, S)
    in_blocks = pl.cdiv(S, block_in)
    out_blocks = pl.cdiv(S, block_out)
    in_per_out = block_out // block_in  # exact, or one output block covering all of S
    steps = min(in_blocks, (block_out - 1 + max_shift) // block_in + 2)

    # First and last input block of each output block's sources; -1 when it has none.
    padded = jnp.pad(source, ((0, 0), (0, 0), (0, out_blocks * block_out - S)),
                     constant_values=-1).reshape(B, K, out_blocks, block_out)
    has = padded >= 0
    first = jnp.min(jnp.where(has, padded, S), axis=-1) // block_in
    last = jnp.max(padded, axis=-1) // block_in
    none = ~jnp.any(has, axis=-1)
    first = jnp.where(none, -1, first).astype(jnp.int32)
    last = jnp.where(none, -1, last).astype(jnp.int32)

    def in_block(b, k, r, t, first_ref, last_ref):
        # Past the last source the index stays put (no new DMA); an output block without
        # sources reads its own, not yet written, slots (never slots written before).
        block = _block_index(b, k, r, K, out_blocks)
        q = jnp.minimum(first_ref[block] + t, last_ref[block])
        q = jnp.where(first_ref[block] < 0, jnp.minimum(r * in_per_out, in_blocks - 1), q)
        return (b, k, q, 0)

    def out_block(b, k, r, t, first_ref, last_ref):
        return (b, k, r, 0)

    # Both Pallas interpreters pad every operand to whole blocks and then fail on an aliased
    # pair padded differently (JAX 0.10); Mosaic has no such padding. So interpret mode
    # aliases only when the blocks tile S exactly (the tests cover that case).
    aliases = {3: 0, 4: 1}
    if interpret is not False and (S % block_out or S % block_in):
        aliases = {}
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(B, K, out_blocks, steps),
        in_specs=[
            pl.BlockSpec((None, None, block_out, 1), out_block),
            pl.BlockSpec((None, None, block_in, H), in_block),
            pl.BlockSpec((None, None, block_in, Hv), in_block),
        ],
        out_specs=[pl.BlockSpec((None, None, block_out, H), out_block),
                   pl.BlockSpec((None, None, block_out, Hv), out_block)],
        scratch_shapes=[pltpu.VMEM((block_out, H), jnp.float32),
                        pltpu.VMEM((block_out, Hv), jnp.float32)],
    )
    return pl.pallas_call(
        functools.partial(_compact_kernel, block_in=block_in, K=K, R=out_blocks),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct(keys.shape, keys.dtype),
                   jax.ShapeDtypeStruct(values.shape, values.dtype)],
        input_output_aliases=aliases,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary", "arbitrary")),
        interpret=interpret,
    )(first.reshape(-1), last.reshape(-1), source[..., None], keys, values)


@functools.partial(jax.jit, static_argnames=("window", "block_sizes", "interpret"))
def compact(keys, values, positions, global_score, kept_index, *, window: int, active=None,
            new_score=None, replace_score=None, block_sizes: BlockSizes | None = None,
            interpret=False):
    """The Pallas compaction; same contract as `topk_retention.compact`."""
    S = keys.shape[2]
    budget = kept_index.shape[2] + window
    source = reference.row_map(kept_index, S, window, active)
    new_keys, new_values = compact_rows(keys, values, source, max_shift=S - budget,
                                        block_sizes=block_sizes, interpret=interpret)
    new_positions, score = reference.compact_scalars(positions, global_score, source, window,
                                                     active, new_score, replace_score)
    return new_keys, new_values, new_positions, score
