"""`memory_plan`: the bytes each device of a ("data", "model") mesh holds for one generation,
predicted from shapes alone (no device, no weights) by the rule table that places them.

The weights and the cache are exact: their per-device shard shapes come from
`rules.param_specs` / `rules.cache_specs`, the functions `shard_model` and the decode loop
use, evaluated on an abstract mesh of the given sizes. The eviction temporaries are an
estimate (see `eviction_temporary_bytes`). Activations, logits and XLA's own buffers are not
counted: leave headroom for them (`MemoryPlan.fits`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from typing import TYPE_CHECKING

from jax.sharding import AbstractMesh, Mesh, PartitionSpec

from gkv_jax.models.config import ModelConfig
from gkv_jax.models.transformer import param_shapes, resolve_dtype
from gkv_jax.sharding.mesh import AXES, DATA, MODEL, axis_size
from gkv_jax.sharding.rules import cache_specs, kv_heads_split, param_specs
from gkv_jax.token_ids import is_int as _is_int

if TYPE_CHECKING:
    from gkv_jax.eviction.config import EvictionConfig

__all__ = ["MemoryPlan", "abstract_mesh", "cache_shapes", "eviction_temporary_bytes",
           "memory_plan", "shard_shape", "tpu_layout_copy_bytes"]

_INT32 = _FLOAT32 = 4  # bytes: positions, lengths, indices; global score, scores


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes held by ONE device of the mesh (every device holds the same amount).

    Attributes:
      weights: its shard of every weight of `param_shapes(config)`.
      cache: its shard of every `KVCache` buffer (keys, values [L, B, K, C, H]; positions,
        global_score [L, B, K, C]; query_window [L, B, N, W, H]; lengths [B]) with
        B = `padded_batch` and C = `capacity`: what `generate`'s
        `stats["cache_bytes_per_device"]` reports.
      prefill_cache: its shard of the prompt-sized cache (C = `prompt_length`) that the
        prefill fills and then compresses into `cache`, alive together with it; 0 when the
        prompt fits the budget (or for "full", whose cache is built at full size at once).
      eviction_temporaries: the estimated scoring and compaction temporaries of one layer's
        compression (`eviction_temporary_bytes`); 0 for "full".
      layout_copies: for `platform="tpu"`, what XLA:TPU holds twice (found by compiling the
        programs for TPUs, `gkv_jax.targets`; `tpu_layout_copy_bytes`); 0 otherwise.
      prefill_activations: the estimated largest activations of the prefill, which runs the
        whole batch's prompts at once (`prefill_activation_bytes`); alive at another time
        than the compression's temporaries, so the larger of the two counts.
      total: weights + cache + prefill_cache + max(eviction_temporaries,
        prefill_activations) + layout_copies.
      data, model: the mesh's axis sizes.
      padded_batch: the batch rounded up to a multiple of `data` (generate pads with copies).
      batch_per_device: padded_batch / data.
      kv_heads_split: whether the KV heads (and the query window) are split over `model`;
        when False every `model` shard holds all K heads of its sequences.
      kv_heads_per_device: K, or K / model when split.
      capacity: C, the cache slots per (layer, sequence, KV head).
      window: W, the query-window rows per (layer, sequence, query head).
      dtype: the weights' and cached keys' / values' dtype name.
      platform: what the plan was made for (None: no platform's own copies counted).
    """

    weights: int
    cache: int
    prefill_cache: int
    eviction_temporaries: int
    total: int
    data: int
    model: int
    padded_batch: int
    batch_per_device: int
    kv_heads_split: bool
    kv_heads_per_device: int
    capacity: int
    window: int
    dtype: str
    layout_copies: int = 0
    platform: str | None = None
    prefill_activations: int = 0

    def usable_bytes(self, device_bytes: int | float, headroom: float = 0.1) -> float:
        """The bytes of a device with `device_bytes` of memory left for this plan once a
        `headroom` share is kept for activations, logits and XLA's buffers."""
        if (isinstance(device_bytes, bool) or not isinstance(device_bytes, numbers.Real)
                or not device_bytes > 0):
            raise ValueError(f"device_bytes must be a number > 0, got {device_bytes!r}")
        if (isinstance(headroom, bool) or not isinstance(headroom, numbers.Real)
                or not 0 <= headroom < 1):
            raise ValueError(f"headroom must be a number in [0, 1), got {headroom!r}")
        return float(device_bytes) * (1.0 - float(headroom))

    def fits(self, device_bytes: int | float, headroom: float = 0.1) -> bool:
        """`total` fits a device of `device_bytes` with a `headroom` share kept free."""
        return self.total <= self.usable_bytes(device_bytes, headroom)


def abstract_mesh(mesh_shape) -> AbstractMesh:
    """A device-free ("data", "model") mesh from a `(data, model)` pair, a
    `{"data": ..., "model": ...}` dict, or a `jax.sharding.Mesh` / `AbstractMesh` with our
    axes.

    Raises:
      ValueError / TypeError: naming `mesh_shape` and what it may be.
    """
    if isinstance(mesh_shape, Mesh | AbstractMesh):
        if tuple(mesh_shape.axis_names) != AXES:
            raise ValueError(f"mesh_shape: a mesh must have the axes {AXES}, got "
                             f"{tuple(mesh_shape.axis_names)}")
        sizes = tuple(mesh_shape.axis_sizes)
    elif isinstance(mesh_shape, Mapping):
        if set(mesh_shape) != set(AXES):
            raise ValueError(f"mesh_shape: a dict must have exactly the keys {AXES}, got "
                             f"{sorted(map(str, mesh_shape))}")
        sizes = (mesh_shape[DATA], mesh_shape[MODEL])
    elif isinstance(mesh_shape, tuple | list):
        sizes = tuple(mesh_shape)
    else:
        raise TypeError(f"mesh_shape must be a (data, model) pair, a dict "
                        f"{{'data': ..., 'model': ...}} or a jax.sharding.Mesh, got "
                        f"{type(mesh_shape).__name__}")
    if len(sizes) != 2 or not all(_is_int(s) and s >= 1 for s in sizes):
        raise ValueError(f"mesh_shape must hold 2 positive integers (data, model), got "
                         f"{mesh_shape!r}")
    return AbstractMesh(tuple(int(s) for s in sizes), AXES)


def shard_shape(shape: tuple[int, ...], spec: PartitionSpec, mesh) -> tuple[int, ...]:
    """The shape of one device's shard of an array of `shape` placed with `spec` on `mesh`
    (each axis divided by the sizes of the mesh axes `spec` names for it)."""
    entries = tuple(spec) + (None,) * (len(shape) - len(spec))
    out = []
    for size, entry in zip(shape, entries, strict=True):
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        devices = math.prod(axis_size(mesh, name) for name in names)
        if size % devices:
            raise ValueError(f"axis of size {size} cannot be split over {devices} devices "
                             f"({spec} on a mesh of sizes {tuple(mesh.axis_sizes)})")
        out.append(size // devices)
    return tuple(out)


def cache_shapes(config: ModelConfig, batch: int, capacity: int, window: int,
                 itemsize: int) -> dict[str, tuple[tuple[int, ...], int]]:
    """Every `KVCache` buffer as (global shape, bytes per element), by field name, for B =
    `batch`, C = `capacity`, W = `window` and keys / values / queries of `itemsize` bytes
    (as `gkv_jax.cache.init_cache` builds them)."""
    L, K, N, H = config.num_layers, config.num_kv_heads, config.num_heads, config.head_dim
    return {
        "keys": ((L, batch, K, capacity, H), itemsize),
        "values": ((L, batch, K, capacity, H), itemsize),
        "positions": ((L, batch, K, capacity), _INT32),
        "global_score": ((L, batch, K, capacity), _FLOAT32),
        "query_window": ((L, batch, N, window, H), itemsize),
        "lengths": ((batch,), _INT32),
    }


def _shard_bytes(shape, spec, mesh, itemsize: int) -> int:
    return math.prod(shard_shape(shape, spec, mesh)) * itemsize


def _cache_bytes(config, batch, capacity, window, itemsize, mesh) -> int:
    """One device's bytes of a cache, sharded by `cache_specs` (the decode loop's rule)."""
    buffers = cache_shapes(config, batch, capacity, window, itemsize)
    specs = cache_specs(config.num_heads, config.num_kv_heads,
                        {name: shape for name, (shape, _) in buffers.items()}, mesh)
    return sum(_shard_bytes(shape, specs[name], mesh, size)
               for name, (shape, size) in buffers.items())


def _weight_bytes(config: ModelConfig, itemsize: int, mesh) -> int:
    """One device's bytes of every weight, sharded by `param_specs` (`shard_model`'s rule)."""
    shapes = param_shapes(config)
    specs = param_specs(config, shapes, mesh)
    total = 0
    for name, shape in shapes.items():
        if isinstance(shape, dict):
            total += sum(_shard_bytes(s, specs[name][k], mesh, itemsize)
                         for k, s in shape.items())
        else:
            total += _shard_bytes(shape, specs[name], mesh, itemsize)
    return total


def prefill_activation_bytes(config: ModelConfig, rows: int, prompt_length: int,
                             query_heads: int, model: int) -> int:
    """An estimate of the prefill's largest activations on one device. The prefill runs all
    `rows` prompts of T = `prompt_length` tokens through a layer at once, in float32, and
    the larger of two phases is alive: the attention's scores and probabilities,
    2 x [rows, n, T, T] with n = `query_heads` per device, or the MLP's up projection beside
    the residual stream, [rows, T, I / model + D] (I = `intermediate_size`, split over
    `model` when it divides; D = `hidden_size`). Fitted on XLA:GPU's temporaries for
    R1-Distill-Qwen-1.5B and -7B at 128-256 rows and T = 256-1,024 (within 20%); a few KB
    per token at the few rows per device of most plans, the largest temporaries at
    hundreds."""
    intermediate = (config.intermediate_size // model if config.intermediate_size % model == 0
                    else config.intermediate_size)
    per_token = max(intermediate + config.hidden_size, 2 * query_heads * prompt_length)
    return rows * prompt_length * per_token * 4


def eviction_temporary_bytes(eviction: EvictionConfig | None, batch: int, query_heads: int,
                             kv_heads: int, slots: int, head_dim: int, itemsize: int) -> int:
    """An estimate of the largest temporaries of ONE layer's compression on one device.

    `evict` compresses the layers one at a time (a `fori_loop` updating the cache in place),
    so only one layer's scoring memory is alive. With b = `batch`, n = `query_heads`,
    k = `kv_heads` (all per device), S = `slots`, H = `head_dim`, W = the query window, it
    counts, in float32 unless said:

      * the keys cast to float32 with empty slots zeroed: [b, k, S, H];
      * the window attention logits and their softmax: 2 x [b, n, W, S] (policies that
        score with queries; with `implementation="pallas"` the kernels keep them in
        on-chip tiles: 0);
      * the key redundancy of policies that read `similarity_threshold` (gkv, rkv): the
        unit keys [b, k, S, H] and the cosine similarity with its masked copy
        2 x [b, k, S, S] (the reference materialises S x S; with `implementation="pallas"`
        the kernels work tile by tile: 0);
      * the per-row scores (local, normalised, global, combined): 4 x [b, k, S];
      * top-k and compaction: the kept index and the row map, int32 2 x [b, k, S], the
        gathered keys and values 2 x [b, k, S, H] in the cache dtype (`itemsize` bytes),
        the gathered positions and global score 2 x [b, k, S].

    XLA may fuse some of these away, so this is an upper estimate of the reference path
    (`implementation` None or "xla"; None picks the reference on every backend until the
    kernels are verified on one). 0 for a policy that never evicts (None = "full").
    """
    if eviction is None or not eviction.evicts:
        return 0
    b, n, k, S, H = batch, query_heads, kv_heads, slots, head_dim
    W = eviction.query_window_size
    kernels = eviction.implementation == "pallas"
    total = b * k * S * H * _FLOAT32
    if not kernels:
        total += 2 * b * n * W * S * _FLOAT32
    if "similarity_threshold" in eviction.policy_object.knobs:
        total += b * k * S * H * _FLOAT32
        if not kernels:
            total += 2 * b * k * S * S * _FLOAT32
    total += 4 * b * k * S * _FLOAT32
    total += 2 * b * k * S * _INT32 + 2 * b * k * S * H * itemsize + 2 * b * k * S * _FLOAT32
    return total


LANES = 128  # a TPU tile's minor dimension


def tpu_layout_copy_bytes(config: ModelConfig, mesh, itemsize: int, second_cache_layout: bool,
                          keys_and_values: int) -> int:
    """What XLA:TPU holds twice while `generate` runs on one device, as compiling the
    programs for TPU slices shows (`scripts/memory_table.py --compile`):

      * for an evicting policy with more than one KV head per device, the cache's keys and
        values (`keys_and_values` bytes) once more: the compression reads them in another
        tiling than the decode step's attention (which moves the KV-head axis), and XLA
        keeps both (with one KV head per device the two coincide);
      * the weights the decode loop copies once per call (each a whole stacked weight):
        every weight split over `model` whose per-device last axis is not a multiple of
        128 lanes (e.g. an MLP of 8,960 over 8 devices: 1,120), and the query projection
        when `model` does not divide the query heads.
    """
    model = axis_size(mesh, MODEL)
    total = keys_and_values if second_cache_layout else 0
    if model == 1:
        return total
    shapes = param_shapes(config)
    specs = param_specs(config, shapes, mesh)
    weights = [(name, shape, specs[name]) for name, shape in shapes.items()
               if not isinstance(shape, dict)]
    weights += [(name, shape, specs["layers"][name])
                for name, shape in shapes["layers"].items()]
    for name, shape, spec in weights:
        split = any(entry is not None for entry in spec)
        shard = shard_shape(shape, spec, mesh)
        unaligned = split and shard[-1] % LANES != 0
        replicated_query = name == "q_proj" and config.num_heads % model != 0
        if unaligned or replicated_query:
            total += math.prod(shard) * itemsize
    return total


def memory_plan(config: ModelConfig, mesh_shape, batch: int,
                eviction: EvictionConfig | None, max_new_tokens: int,
                dtype="bfloat16", prompt_length: int = 0, platform: str | None = None
                ) -> MemoryPlan:
    """The bytes each device holds to `generate` `batch` sequences on a mesh.

    Capacity follows `gkv_jax.decode.cache_capacity` (re-derived here: `gkv_jax.decode`
    imports this package): an evicting policy keeps C = `eviction.capacity` = budget +
    divide_length slots whatever the length; "full" keeps C = prompt_length +
    max_new_tokens - 1 (at least 1). The query window holds W =
    `eviction.query_window_size` rows (0 for "full" and "streaming").

    Args:
      config: the model's architecture.
      mesh_shape: `(data, model)`, `{"data": ..., "model": ...}`, or a `jax.sharding.Mesh`
        (only its axis sizes are read; no device is needed).
      batch: the number of prompts (>= 1); generate pads it to a multiple of `data`, so
        each device holds ceil(batch / data) sequences.
      eviction: an `EvictionConfig`, or None for "full".
      max_new_tokens: generated tokens per prompt (>= 1).
      dtype: the weights' dtype and with it the cached keys' and values': "bfloat16",
        "float32", "float16" or a jnp dtype.
      prompt_length: the padded prompt length T (generate rounds the longest prompt up to
        a bucket, by default a power of two >= 16); it sizes the "full" cache and, when it
        exceeds an evicting policy's budget, the prompt-sized cache of the prefill.
      platform: "tpu" also counts what XLA:TPU holds twice (`tpu_layout_copy_bytes`);
        None, "gpu" or "cpu" count the arrays alone.

    Returns:
      A `MemoryPlan` (bytes per device).

    Raises:
      ValueError / TypeError: naming the parameter: a config that is not a `ModelConfig`,
        a mesh_shape that is not 2 positive integers, batch < 1, max_new_tokens < 1,
        prompt_length < 0, prompt_length (at least 1) + max_new_tokens beyond the model's
        context (`generate` refuses such a call), an unknown dtype, an eviction that is not
        an `EvictionConfig`.
    """
    if not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a gkv_jax ModelConfig, got {type(config).__name__}")
    mesh = abstract_mesh(mesh_shape)
    if not _is_int(batch) or batch < 1:
        raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
    if eviction is not None and not all(hasattr(eviction, a) for a in
                                        ("evicts", "capacity", "query_window_size")):
        raise TypeError(f"eviction must be an EvictionConfig or None, got "
                        f"{type(eviction).__name__}")
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not _is_int(prompt_length) or prompt_length < 0:
        raise ValueError(f"prompt_length must be an integer >= 0, got {prompt_length!r}")
    longest = max(int(prompt_length), 1)  # generate needs a prompt of at least one token
    if longest + max_new_tokens > config.max_position_embeddings:
        raise ValueError(
            f"max_new_tokens: prompt_length {longest} + max_new_tokens {max_new_tokens} = "
            f"{longest + max_new_tokens} exceeds the model's context "
            f"(max_position_embeddings={config.max_position_embeddings}); generate refuses "
            f"such a call")
    if platform not in (None, "tpu", "gpu", "cpu"):
        raise ValueError(f"platform must be None, 'tpu', 'gpu' or 'cpu', got {platform!r}")
    dtype = resolve_dtype(dtype)  # ValueError naming dtype and the allowed names
    itemsize = dtype.itemsize

    data, model = axis_size(mesh, DATA), axis_size(mesh, MODEL)
    padded = -(-int(batch) // data) * data
    evicts = eviction is not None and eviction.evicts
    if evicts:
        capacity = eviction.capacity
        window = eviction.query_window_size
    else:
        capacity, window = max(1, prompt_length + max_new_tokens - 1), 0
    split = kv_heads_split(mesh, config.num_heads, config.num_kv_heads)
    kv_heads = config.num_kv_heads // model if split else config.num_kv_heads
    query_heads = config.num_heads // model if split else config.num_heads

    weights = _weight_bytes(config, itemsize, mesh)
    cache = _cache_bytes(config, padded, capacity, window, itemsize, mesh)
    prefill_compresses = evicts and prompt_length > eviction.budget
    prefill_cache = (_cache_bytes(config, padded, prompt_length, window, itemsize, mesh)
                     if prefill_compresses else 0)
    slots = max(capacity, prompt_length) if prefill_compresses else capacity
    temporaries = eviction_temporary_bytes(eviction if evicts else None, padded // data,
                                           query_heads, kv_heads, slots, config.head_dim,
                                           itemsize)
    activations = prefill_activation_bytes(config, padded // data, max(prompt_length, 1),
                                           query_heads, model)
    copies = 0
    if platform == "tpu":
        keys = cache_shapes(config, padded, capacity, window, itemsize)["keys"][0]
        keys_spec = cache_specs(config.num_heads, config.num_kv_heads, {"keys": keys},
                                mesh)["keys"]
        keys_and_values = 2 * _shard_bytes(keys, keys_spec, mesh, itemsize)
        copies = tpu_layout_copy_bytes(config, mesh, itemsize, evicts and kv_heads > 1,
                                       keys_and_values)
    return MemoryPlan(
        weights=weights, cache=cache, prefill_cache=prefill_cache,
        eviction_temporaries=temporaries, layout_copies=copies, platform=platform,
        prefill_activations=activations,
        total=weights + cache + prefill_cache + max(temporaries, activations) + copies,
        data=data, model=model, padded_batch=padded, batch_per_device=padded // data,
        kv_heads_split=split, kv_heads_per_device=kv_heads, capacity=capacity,
        window=window, dtype=dtype.name)
