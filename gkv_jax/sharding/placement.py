"""Putting weights on a mesh by the rule table (`rules.param_specs`)."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx
from jax.sharding import NamedSharding

from gkv_jax.models.config import ModelConfig
from gkv_jax.sharding.mesh import check_mesh, mesh_of, same_mesh
from gkv_jax.sharding.rules import named, param_specs


def param_shardings(config: ModelConfig, params: dict[str, Any], mesh) -> dict[str, Any]:
    """The `NamedSharding` of every weight (same nested dict as `params`; leaves may be
    arrays or shapes)."""
    return named(mesh, param_specs(config, params, mesh))


def shard_params(config: ModelConfig, params: dict[str, Any], mesh) -> dict[str, Any]:
    """`params` (a `Transformer.params()` dict) moved onto `mesh` by the rule table."""
    check_mesh(mesh)
    return jax.device_put(params, param_shardings(config, params, mesh))


def placed_mesh(model):
    """The mesh `model`'s weights are sharded over, or None (one device, or not an NNX
    module)."""
    if not isinstance(model, nnx.Module):
        return None
    return mesh_of(nnx.state(model, nnx.Param))


def shard_model(model, mesh):
    """Moves an NNX `Transformer`'s weights onto `mesh` in place and returns the model.

    A model already on `mesh` is left as it is; one on another mesh is moved too (its
    weights are resharded by JAX, no copy through the host).
    """
    check_mesh(mesh)
    current = placed_mesh(model)
    if current is not None and same_mesh(current, mesh) and _placed_by_rules(model, mesh):
        return model
    params = shard_params(model.config, model.params(), mesh)
    _assign(model, params)
    return model


def _placed_by_rules(model, mesh) -> bool:
    shardings = param_shardings(model.config, model.params(), mesh)
    leaves = jax.tree.leaves(model.params())
    wanted = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    return all(a.sharding.is_equivalent_to(s, a.ndim) for a, s in
               zip(leaves, wanted, strict=True))


def _assign(model, params: dict[str, Any]) -> None:
    """Replaces the model's `nnx.Param` arrays by `params` (a `Transformer.params()`-shaped
    dict), shardings included (`param[...] = x` would write into the old sharding)."""
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
