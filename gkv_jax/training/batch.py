"""`TeacherForcedBatch`: prompts and completions in generation's layout, with eviction masks.

Row b is its prompt left-padded to the width `Wp` (generation's prompt bucket), then
completion tokens 0 .. M_b - 2 as inputs; the targets are completion tokens 0 .. M_b - 1 (the
first one is predicted by the last prompt row). With a common width, compression event e
starts at slot `Wp + e * divide_length` in every row, so the schedule is batch-uniform.

`visible_until` is in the slot layout: `visible_until[l, b, h, s]` is the first query
position (a true position, like the record's values) that no longer sees the key at slot s;
slots without a token (pads, the right padding of short rows) hold 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import NamedSharding
from jaxtyping import Array, Bool, Float, Int

from gkv_jax.eviction import EvictionConfig
from gkv_jax.generation_inputs import bucket_length
from gkv_jax.generation_outputs import GenerateOutput, to_host
from gkv_jax.models.masked_attention import SegmentLayout
from gkv_jax.sharding.mesh import DATA, axis_size, check_mesh
from gkv_jax.sharding.rules import spec

PAD_ID = 0  # the id generation left-pads with; pads are never visible whatever their id


@struct.dataclass
class TeacherForcedBatch:
    """A batch for teacher-forced log-probs, losses and the replay (a pytree; `width` and
    `eviction` are static).

    Attributes:
      tokens: [B, T] int32 inputs, T = width + M - 1: left-padded prompts, then completions.
      positions: [B, T] int32 true positions (prompt 0..P-1, completion token i at P + i);
        -1 on pads and on the right padding of shorter rows.
      targets: [B, M] int32 completion tokens (target i is predicted by slot width - 1 + i).
      loss_mask: [B, M] bool, True for i < lengths[b].
      lengths: [B] int32 completion lengths M_b (EOS included).
      width: Wp, the left-padded prompt width.
      visible_until: [L, B, K, T] int32 eviction masks in the slot layout, or None (full
        attention: no eviction recorded or replayed yet).
      reference_log_probs: [B, M] float32 the log-probs `generate` reported for the targets
        (0 past each row's end), or None; what the GRPO log-prob guard compares against.
      eviction: the `EvictionConfig` the masks come from (None without masks).
      padding_rows: trailing rows `shard_batch` added so that the mesh's `data` axis divides
        B (copies of the last row with `loss_mask` all False); `distill_step` and
        `grpo_step` average over the B - padding_rows real rows only.
    """

    tokens: Int[Array, "B T"]
    positions: Int[Array, "B T"]
    targets: Int[Array, "B M"]
    loss_mask: Bool[Array, "B M"]
    lengths: Int[Array, " B"]
    width: int = struct.field(pytree_node=False)
    visible_until: Int[Array, "L B K T"] | None = None
    reference_log_probs: Float[Array, "B M"] | None = None
    eviction: EvictionConfig | None = struct.field(pytree_node=False, default=None)
    padding_rows: int = struct.field(pytree_node=False, default=0)

    @property
    def real_rows(self) -> int:
        """B without the rows `shard_batch` padded with."""
        return self.tokens.shape[0] - self.padding_rows

    @property
    def segment_layout(self) -> SegmentLayout | None:
        """The segment geometry of the masks' schedule (None without an evicting policy)."""
        if self.eviction is None or not self.eviction.evicts:
            return None
        return SegmentLayout(prompt_width=self.width,
                             segment_length=self.eviction.divide_length,
                             max_visible=self.eviction.budget)

    def with_visible_until(self, visible_until: Array, eviction: EvictionConfig
                           ) -> TeacherForcedBatch:
        """The same batch under other masks (e.g. `replay_evictions`' result)."""
        B, T = self.tokens.shape
        shape = tuple(np.shape(visible_until))
        if len(shape) != 4 or shape[1] != B or shape[3] != T:
            raise ValueError(f"visible_until must be [L, B={B}, K, T={T}], got {list(shape)}")
        if not isinstance(eviction, EvictionConfig):
            raise TypeError(f"eviction must be an EvictionConfig, got {type(eviction)}")
        return self.replace(visible_until=jnp.asarray(visible_until, jnp.int32),
                            eviction=eviction)


def _check_ids(name: str, ids: Sequence[Sequence[int]], min_length: int) -> list[list[int]]:
    if isinstance(ids, str | bytes) or not isinstance(ids, Sequence | np.ndarray) \
            or len(ids) == 0:
        raise ValueError(f"{name} must be a non-empty list of token-id lists")
    out = []
    for i, row in enumerate(ids):
        if isinstance(row, str | bytes) or not isinstance(row, Sequence | np.ndarray):
            raise ValueError(f"{name}[{i}] must be a list of token ids, got {type(row)}")
        values = np.asarray(row)
        if values.size and not np.issubdtype(values.dtype, np.integer):
            raise ValueError(f"{name}[{i}] must hold integer token ids, got {values.dtype}")
        if values.size < min_length:
            raise ValueError(f"{name}[{i}] needs at least {min_length} token(s), got "
                             f"{values.size}")
        if values.size and values.min() < 0:
            raise ValueError(f"{name}[{i}] has a negative token id")
        out.append([int(t) for t in values])
    return out


def _layout(prompt_ids: list[list[int]], completion_ids: list[list[int]], width: int,
            num_targets: int | None = None):
    """Numpy tokens, positions, targets, loss mask and lengths of the layout."""
    B = len(prompt_ids)
    M = max(len(c) for c in completion_ids)
    if num_targets is not None:
        if isinstance(num_targets, bool) or not isinstance(num_targets, int | np.integer) \
                or num_targets < M:
            raise ValueError(f"num_targets must be an integer >= the longest completion "
                             f"({M}), got {num_targets!r}")
        M = int(num_targets)
    T = width + M - 1
    tokens = np.full((B, T), PAD_ID, np.int32)
    positions = np.full((B, T), -1, np.int32)
    targets = np.zeros((B, M), np.int32)
    loss_mask = np.zeros((B, M), bool)
    for b, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
        P, Mb = len(prompt), len(completion)
        row = prompt + completion[:-1]
        tokens[b, width - P: width - P + len(row)] = row
        positions[b, width - P: width - P + len(row)] = np.arange(len(row))
        targets[b, :Mb] = completion
        loss_mask[b, :Mb] = True
    lengths = np.asarray([len(c) for c in completion_ids], np.int32)
    return tokens, positions, targets, loss_mask, lengths


def batch_from_completions(prompt_ids: Sequence[Sequence[int]],
                           completion_ids: Sequence[Sequence[int]], *,
                           width: int | None = None,
                           prompt_buckets: Sequence[int] | None = None,
                           num_targets: int | None = None) -> TeacherForcedBatch:
    """A batch of traces that were not generated here (dataset or teacher traces), with no
    masks yet: full attention until `replay_evictions` gives it the masks of a policy.

    Args:
      prompt_ids: per row, the prompt token ids (>= 1 each).
      completion_ids: per row, the completion token ids (>= 1 each; EOS included if any).
      width: the left-padded prompt width Wp (>= the longest prompt); default the bucket
        `generate` would use (`prompt_buckets`, else powers of two >= 16), so the replay
        follows the schedule generation would have had.
      num_targets: M, the target columns (>= the longest completion; default that): fixed
        shapes across batches compile one training step.

    >>> batch = batch_from_completions([[5, 6, 7]], [[8, 9]])
    >>> batch.tokens.shape, batch.targets.tolist(), int(batch.positions[0, -1])
    ((1, 17), [[8, 9]], 3)
    """
    prompts = _check_ids("prompt_ids", prompt_ids, 1)
    completions = _check_ids("completion_ids", completion_ids, 1)
    if len(prompts) != len(completions):
        raise ValueError(f"prompt_ids and completion_ids must have the same number of rows, "
                         f"got {len(prompts)} and {len(completions)}")
    longest = max(len(p) for p in prompts)
    if width is None:
        width = bucket_length(longest, prompt_buckets)
    elif isinstance(width, bool) or not isinstance(width, int | np.integer) or width < longest:
        raise ValueError(f"width must be an integer >= the longest prompt ({longest}), "
                         f"got {width!r}")
    tokens, positions, targets, loss_mask, lengths = _layout(prompts, completions, int(width),
                                                             num_targets)
    return TeacherForcedBatch(
        tokens=jnp.asarray(tokens), positions=jnp.asarray(positions),
        targets=jnp.asarray(targets), loss_mask=jnp.asarray(loss_mask),
        lengths=jnp.asarray(lengths), visible_until=None, width=int(width), eviction=None)


def slot_visible_until(by_position: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """[L, B, K, P] by true position -> [L, B, K, T] by slot (0 where positions is -1)."""
    index = np.maximum(positions, 0)[None, :, None, :]
    index = np.broadcast_to(index, (*by_position.shape[:3], positions.shape[1]))
    gathered = np.take_along_axis(by_position, index, axis=3)
    return np.where(positions[None, :, None, :] >= 0, gathered, 0).astype(np.int32)


def batch_from_generation(out: GenerateOutput, prompts: Sequence[Sequence[int]] | None = None,
                          *, num_targets: int | None = None) -> TeacherForcedBatch:
    """The teacher-forced batch of a generation, under the exact masks it recorded.

    Args:
      out: `generate(..., return_eviction_record=True)`'s output.
      prompts: the prompt token ids given to `generate` (default `out.prompt_ids`, the ids it
        fed, which string prompts need); checked against the record.
      num_targets: M (default the longest generation; `max_new_tokens` gives every batch of
        one setting the same shapes).

    `token_log_probs(model, batch_from_generation(out))` reproduces `out.logprobs`.
    """
    record = getattr(out, "eviction_record", None)
    if record is None:
        raise ValueError("out has no eviction record: call generate(..., "
                         "return_eviction_record=True)")
    if prompts is None:
        if out.prompt_ids is None:
            raise ValueError("prompts: out does not carry its prompt ids; pass them")
        prompts = out.prompt_ids
    prompts = _check_ids("prompts", prompts, 1)
    if len(prompts) != len(out.tokens):
        raise ValueError(f"prompts has {len(prompts)} rows, the generation {len(out.tokens)}")
    for b, prompt in enumerate(prompts):
        if len(prompt) != int(record.prompt_lengths[b]) or (
                out.prompt_ids is not None and prompt != list(out.prompt_ids[b])):
            raise ValueError(f"prompts[{b}] is not the prompt this generation fed "
                             f"({int(record.prompt_lengths[b])} tokens)")
    width = int(out.stats["prompt_bucket"])
    tokens, positions, targets, loss_mask, lengths = _layout(prompts, out.tokens, width,
                                                             num_targets)
    visible_until = slot_visible_until(record.visible_until, positions)
    reference = None
    if out.logprobs is not None:
        reference = np.zeros(targets.shape, np.float32)
        for b, row in enumerate(out.logprobs):
            reference[b, :len(row)] = row
        reference = jnp.asarray(reference)
    return TeacherForcedBatch(
        tokens=jnp.asarray(tokens), positions=jnp.asarray(positions),
        targets=jnp.asarray(targets), loss_mask=jnp.asarray(loss_mask),
        lengths=jnp.asarray(lengths), visible_until=jnp.asarray(visible_until),
        reference_log_probs=reference, width=width, eviction=record.eviction)


# The batch axis of each [B, ...] field (`visible_until` is [L, B, K, T]).
_BATCH_AXIS = {"tokens": 0, "positions": 0, "targets": 0, "loss_mask": 0, "lengths": 0,
               "visible_until": 1, "reference_log_probs": 0}


def shard_batch(batch: TeacherForcedBatch, mesh) -> TeacherForcedBatch:
    """`batch` placed on `mesh` for `distill_step` / `grpo_step` traced under
    `jax.set_mesh(mesh)`: every [B, ...] array with its batch axis over `data`.

    A B that `data` does not divide is padded up to the next multiple with copies of the last
    row whose `loss_mask` is all False (`padding_rows` counts them): they add nothing to a
    loss, and the steps divide by the real rows, so the loss, the gradients and the update
    are those of the unpadded batch. `grpo_step` takes the [B - padding_rows] advantages of
    the real rows. With several processes every process passes the same whole batch.

    Raises:
      TypeError / ValueError: `batch` is not a `TeacherForcedBatch`, or `mesh` is not a
        ("data", "model") mesh.
    """
    if not isinstance(batch, TeacherForcedBatch):
        raise TypeError(f"batch must be a TeacherForcedBatch, got {type(batch)}")
    check_mesh(mesh)
    B = batch.tokens.shape[0]
    pad = -B % axis_size(mesh, DATA)
    fields = {}
    for name, axis in _BATCH_AXIS.items():
        if getattr(batch, name) is None:
            continue
        array = to_host(getattr(batch, name))  # every process holds the whole batch
        if pad:
            last = np.take(array, [B - 1] * pad, axis=axis)
            array = np.concatenate([array, np.zeros_like(last) if name == "loss_mask"
                                    else last], axis=axis)
        logical = tuple("batch" if i == axis else None for i in range(array.ndim))
        fields[name] = jax.device_put(array, NamedSharding(mesh, spec(logical, array.shape,
                                                                      mesh)))
    return batch.replace(**fields, padding_rows=batch.padding_rows + pad)
