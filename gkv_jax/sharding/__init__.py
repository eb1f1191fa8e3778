"""Multi-device and multi-host execution on a `jax.sharding.Mesh` with axes ("data", "model").

`make_mesh` builds the mesh; `PARAM_AXES` / `CACHE_AXES` / `LOGICAL_TO_MESH` are the one
table of partition rules; `shard_params` / `shard_model` place weights on it;
`memory_plan` predicts the bytes each device holds. `gkv_jax.load(..., mesh=)`,
`gkv_jax.generate(..., mesh=)`, `gkv_jax.evaluate(..., mesh=)` and the post-training steps
take the mesh.
"""

from gkv_jax.sharding.local import constrain_cache, per_head_blocks
from gkv_jax.sharding.memory import MemoryPlan, memory_plan
from gkv_jax.sharding.mesh import AXES, DATA, MODEL, active_mesh, check_mesh, make_mesh, mesh_of
from gkv_jax.sharding.placement import shard_model, shard_params
from gkv_jax.sharding.rules import (
    CACHE_AXES,
    LOGICAL_TO_MESH,
    PARAM_AXES,
    batch_spec,
    cache_specs,
    kv_heads_split,
    param_specs,
)

__all__ = ["AXES", "CACHE_AXES", "DATA", "LOGICAL_TO_MESH", "MODEL", "MemoryPlan", "PARAM_AXES",
           "active_mesh", "batch_spec", "cache_specs", "check_mesh", "constrain_cache",
           "kv_heads_split", "make_mesh", "memory_plan", "mesh_of", "param_specs",
           "per_head_blocks",
           "shard_model", "shard_params"]
