"""The one table of partition rules: which axis of which array is split over which mesh axis.

Two steps, as in MaxText's logical axis rules. Each array axis gets a *logical* name
(`PARAM_AXES`, `CACHE_AXES`, `BATCH_AXES`); `LOGICAL_TO_MESH` maps logical names to mesh axes.
A logical axis whose size the mesh axis does not divide is replicated instead (for example
2 KV heads on a `model` axis of 8: every `model` shard holds all KV heads, the layout a
Megatron/MaxText user knows as KV-head replication). `kv_heads` follows one more rule: it
is only split when the query heads split the same way, so that the query heads a device holds
are exactly the groups of the KV heads it holds and neither attention nor the eviction ever
needs another device's heads.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

from gkv_jax.models.config import ModelConfig
from gkv_jax.sharding.mesh import DATA, MODEL, axis_size

# Logical axis -> mesh axis. Everything not named here (layers, model width, head dim,
# slots, tokens) is replicated.
LOGICAL_TO_MESH = {
    "batch": DATA,
    "heads": MODEL,
    "kv_heads": MODEL,
    "mlp": MODEL,
    "vocab": MODEL,
}

# Weights, by their name in `Transformer.params()` (layer weights carry the leading L axis).
PARAM_AXES: dict[str, tuple[str | None, ...]] = {
    "embedding": ("vocab", None),
    "lm_head": (None, "vocab"),
    "final_norm": (None,),
    "attn_norm": (None, None),
    "mlp_norm": (None, None),
    "q_proj": (None, None, "heads", None),
    "k_proj": (None, None, "kv_heads", None),
    "v_proj": (None, None, "kv_heads", None),
    "o_proj": (None, "heads", None, None),
    "q_bias": (None, "heads", None),
    "k_bias": (None, "kv_heads", None),
    "v_bias": (None, "kv_heads", None),
    "q_norm": (None, None),
    "k_norm": (None, None),
    "gate_proj": (None, None, "mlp"),
    "up_proj": (None, None, "mlp"),
    "down_proj": (None, "mlp", None),
}

# The cache (`gkv_jax.KVCache` fields). The query window is eviction state and follows the
# KV heads: the eviction of a KV head reads the queries of its own group only.
CACHE_AXES: dict[str, tuple[str | None, ...]] = {
    "keys": (None, "batch", "kv_heads", None, None),
    "values": (None, "batch", "kv_heads", None, None),
    "positions": (None, "batch", "kv_heads", None),
    "global_score": (None, "batch", "kv_heads", None),
    "query_window": (None, "batch", "kv_heads", None, None),
    "lengths": ("batch",),
}

# Per-sequence inputs and outputs of a generation ([B, ...]: the batch over `data`).
BATCH_AXES = ("batch",)


def kv_heads_split(mesh, num_heads: int, num_kv_heads: int) -> bool:
    """Whether the KV heads (and with them whole query groups: N = K * G) are split over
    `model`. When not, every `model` shard holds all KV heads (replicated) while the query
    heads, the MLP and the vocabulary may still split."""
    model = axis_size(mesh, MODEL)
    return model > 1 and num_kv_heads % model == 0 and num_heads % model == 0


def spec(logical: tuple[str | None, ...], shape: tuple[int, ...], mesh,
         split_kv_heads: bool | None = None) -> PartitionSpec:
    """The PartitionSpec of an array of `shape` whose axes have the `logical` names.

    A logical axis goes to its mesh axis when the mesh axis has more than one device and
    divides the array axis; otherwise it is replicated. `split_kv_heads` (from
    `kv_heads_split`) decides "kv_heads" and, when False, also keeps "heads" of the cache's
    query window whole; None treats "kv_heads" like any other axis.
    """
    if len(logical) != len(shape):
        raise ValueError(f"sharding rule {logical} has {len(logical)} axes, the array "
                         f"{len(shape)} ({shape})")
    out = []
    for name, size in zip(logical, shape, strict=True):
        mesh_axis = LOGICAL_TO_MESH.get(name) if name is not None else None
        if name == "kv_heads" and split_kv_heads is not None and not split_kv_heads:
            mesh_axis = None
        if mesh_axis is not None:
            devices = axis_size(mesh, mesh_axis)
            if devices == 1 or size % devices:
                mesh_axis = None
        out.append(mesh_axis)
    return PartitionSpec(*out)


def param_specs(config: ModelConfig, params: dict[str, Any], mesh) -> dict[str, Any]:
    """The PartitionSpec of every weight of `params` (a `Transformer.params()`-shaped dict of
    arrays or shapes), as the same nested dict."""
    split = kv_heads_split(mesh, config.num_heads, config.num_kv_heads)

    def one(name, leaf):
        return spec(PARAM_AXES[name], tuple(getattr(leaf, "shape", leaf)), mesh, split)

    return {name: ({k: one(k, v) for k, v in leaf.items()} if isinstance(leaf, dict)
                   else one(name, leaf)) for name, leaf in params.items()}


def cache_specs(num_heads: int, num_kv_heads: int, shapes: dict[str, tuple[int, ...]],
                mesh) -> dict[str, PartitionSpec]:
    """The PartitionSpec of each cache field, by field name (`CACHE_AXES`)."""
    split = kv_heads_split(mesh, num_heads, num_kv_heads)
    return {name: spec(CACHE_AXES[name], shape, mesh, split) for name, shape in shapes.items()}


def batch_spec(ndim: int, batch_size: int, mesh) -> PartitionSpec:
    """[B, ...] with the batch over `data` (replicated if `data` does not divide B)."""
    return spec(BATCH_AXES + (None,) * (ndim - 1), (batch_size,) + (1,) * (ndim - 1), mesh)


def named(mesh, specs):
    """`NamedSharding`s of a (nested) dict of PartitionSpecs."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))
