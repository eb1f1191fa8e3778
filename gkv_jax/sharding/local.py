"""What the decode loop asks of the mesh while it is traced under `jax.set_mesh`.

Both helpers are the identity when no mesh with our axes is set, so the single-device program
is unchanged.
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec

from gkv_jax.sharding.mesh import active_mesh
from gkv_jax.sharding.rules import CACHE_AXES, cache_specs, spec


def constrain_cache(cache):
    """The `KVCache` with every buffer pinned to its `CACHE_AXES` sharding (batch over `data`,
    KV heads over `model`), so that an empty cache made inside the program is born sharded
    instead of whole on every device."""
    mesh = active_mesh()
    if mesh is None:
        return cache
    shapes = {name: getattr(cache, name).shape for name in CACHE_AXES}
    specs = cache_specs(cache.query_window.shape[2], cache.keys.shape[2], shapes, mesh)
    return cache.replace(**{name: jax.lax.with_sharding_constraint(getattr(cache, name), s)
                            for name, s in specs.items()})


def per_head_blocks(fn, num_heads: int, num_kv_heads: int, batch_size: int):
    """`fn(query_window [B, N, W, H], keys [B, K, S, H], values [B, K, S, H], positions
    [B, K, S], global_score [B, K, S], active [B], evicting [B]) -> (keys, values, positions,
    global_score)` run by each device on its own block of sequences and KV heads.

    One layer's compression only ever reads one (sequence, KV head) and that head's query
    group, so under `jax.shard_map` with the cache's own sharding it needs no collective: no
    device sees, or waits for, another's block. The Pallas kernels inside see local blocks.
    Without a mesh, `fn` itself.
    """
    mesh = active_mesh()
    if mesh is None:
        return fn
    queries, buffers, slots, rows = _layer_specs(mesh, num_heads, num_kv_heads, batch_size)
    return jax.shard_map(fn, mesh=mesh,
                         in_specs=(queries, buffers, buffers, slots, slots, rows, rows),
                         out_specs=(buffers, buffers, slots, slots), check_vma=False)


def per_sequence(fn, num_heads: int, num_kv_heads: int, batch_size: int):
    """`fn(positions [B, K, S]) -> [B]` run by each device on its block, for a per-sequence
    value that every KV head holds alike (e.g. the number of real slots): each `model`
    shard computes it from its own heads, so no device reads another's. Without a mesh,
    `fn` itself."""
    mesh = active_mesh()
    if mesh is None:
        return fn
    _, _, slots, rows = _layer_specs(mesh, num_heads, num_kv_heads, batch_size)
    return jax.shard_map(fn, mesh=mesh, in_specs=(slots,), out_specs=rows, check_vma=False)


def _layer_specs(mesh, num_heads: int, num_kv_heads: int, batch_size: int):
    """One layer's PartitionSpecs by the cache's rules: queries [B, N, W, H], buffers
    [B, K, S, H], slots [B, K, S] and rows [B]."""
    shapes = {"query_window": (1, batch_size, num_heads, 1, 1),
              "keys": (1, batch_size, num_kv_heads, 1, 1)}
    specs = cache_specs(num_heads, num_kv_heads, shapes, mesh)
    return (PartitionSpec(*specs["query_window"][1:]), PartitionSpec(*specs["keys"][1:]),
            PartitionSpec(*specs["keys"][1:4]), spec(("batch",), (batch_size,), mesh))
