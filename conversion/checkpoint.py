"""Orbax save/restore of a `Transformer`: weights bit-exact, dtype and config preserved."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from gkv_jax.models.config import Llama3RopeScaling, ModelConfig
from gkv_jax.models.transformer import Transformer, resolve_dtype
from gkv_jax.sharding.mesh import check_mesh
from gkv_jax.sharding.placement import param_shardings


def _config_to_json(config: ModelConfig) -> dict:
    return dataclasses.asdict(config)


def _config_from_json(data: dict) -> ModelConfig:
    data = dict(data)
    if data.get("rope_scaling") is not None:
        data["rope_scaling"] = Llama3RopeScaling(**data["rope_scaling"])
    data["eos_token_ids"] = tuple(data.get("eos_token_ids") or ())
    return ModelConfig(**data)


def save_checkpoint(model: Transformer, path: str | os.PathLike) -> str:
    """Saves weights (Orbax, uncompressed) and the config + dtype (JSON) under `path` (must
    not exist)."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
        raise FileExistsError(f"path: {path!r} already exists")
    metadata = {"config": _config_to_json(model.config), "dtype": jnp.dtype(model.dtype).name}
    weights = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    # Uncompressed: weights barely compress (about 25% for bfloat16), and restoring
    # zstd-compressed arrays took twice as long.
    handler = ocp.CompositeCheckpointHandler(
        weights=ocp.PyTreeCheckpointHandler(use_compression=False),
        metadata=ocp.JsonCheckpointHandler())
    with ocp.Checkpointer(handler) as checkpointer:
        checkpointer.save(path, ocp.args.Composite(
            weights=ocp.args.PyTreeSave(weights),
            metadata=ocp.args.JsonSave(metadata)))
    return path


def load_checkpoint(path: str | os.PathLike, mesh=None) -> Transformer:
    """Restores a model written by `save_checkpoint`, in the dtype it was saved in.

    Args:
      path: the checkpoint directory.
      mesh: None (the model on the default device), or a `jax.sharding.Mesh` from
        `gkv_jax.sharding.make_mesh`: Orbax restores each weight directly onto its shards
        by the rule table (`gkv_jax.sharding.placement.param_shardings`), each device
        reading only its own slice.

    Raises:
      FileNotFoundError: no directory at `path`.
      ValueError: `path` is not such a checkpoint (a Hugging Face one says so, and how to
        load it).
      TypeError / ValueError: `mesh` is not a Mesh with the axes ("data", "model"), checked
        before anything is read.
    """
    if mesh is not None:
        check_mesh(mesh)
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"path: no checkpoint directory at {path!r}")
    _check_is_orbax_checkpoint(path)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        metadata = checkpointer.restore(
            path, ocp.args.Composite(metadata=ocp.args.JsonRestore()))["metadata"]
        config = _config_from_json(metadata["config"])
        dtype = resolve_dtype(metadata["dtype"])
        abstract = nnx.eval_shape(lambda: Transformer(config, dtype=dtype, rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(abstract)
        shapes = nnx.to_pure_dict(state)
        if mesh is None:
            target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), shapes)
        else:  # Orbax reads each array straight into this sharding
            target = jax.tree.map(
                lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                shapes, param_shardings(config, shapes, mesh))
        weights = checkpointer.restore(
            path, ocp.args.Composite(weights=ocp.args.StandardRestore(target)))["weights"]
    nnx.replace_by_pure_dict(state, weights)
    return nnx.merge(graphdef, state)


def _check_is_orbax_checkpoint(path: str) -> None:
    """Raises ValueError unless `path` has the items `save_checkpoint` writes (Orbax would
    say only that an item "was not found in the checkpoint")."""
    if all(os.path.isdir(os.path.join(path, item)) for item in ("metadata", "weights")):
        return
    if os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"path: {path!r} is a Hugging Face checkpoint (config.json and "
                         "safetensors), not an Orbax one; load it with gkv_jax.load(path) "
                         "or gkv_jax.conversion.from_hf(path)")
    raise ValueError(f"path: {path!r} is not a checkpoint written by save_checkpoint (it "
                     "has no 'metadata' and 'weights' items)")
