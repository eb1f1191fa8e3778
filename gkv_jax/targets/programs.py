"""The programs `compile_for` compiles, as (function, abstract arguments) built from shapes
alone: `ShapeDtypeStruct`s placed on a mesh of compile-only devices by the rule table of
`gkv_jax.sharding`. No weight is ever created.

* "generate": `decode.generate_tokens`, the whole of `generate` (prefill, cycles, evictions).
* "prefill": `decode.prefill` of `batch` prompts of `prompt_length` tokens.
* "decode_cycle": the engine's `run_cycle` over `batch` slots (divide_length steps + evict).
* "distill_step" / "grpo_step": one update of `gkv_jax.training.steps` on a batch of `batch`
  sequences of `prompt_length` + `max_new_tokens` tokens under recorded masks.
* "decode_step" and "evict": one decode step with its layers unrolled, and one compression;
  the per-cycle cost comes from them (XLA's cost analysis counts a loop's body once).
* "compress_layer": one layer's compression of a full buffer, the eviction kernels alone
  (the kernel matrix).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from gkv_jax import decode
from gkv_jax.engine import core
from gkv_jax.eviction import EvictionConfig
from gkv_jax.generation_inputs import bucket_length
from gkv_jax.models import ModelConfig, Transformer
from gkv_jax.pallas_kernels import traced_platform
from gkv_jax.sampling import SamplingParams
from gkv_jax.sharding.rules import CACHE_AXES, batch_spec, kv_heads_split, param_specs, spec

PROGRAMS = ("generate", "decode_cycle", "prefill", "distill_step", "grpo_step")
PARTS = ("compress_layer", "decode_step", "evict")  # pieces: the kernel matrix, the cost


def abstract_params(config: ModelConfig, dtype, mesh) -> dict:
    """The model's parameters as ShapeDtypeStructs sharded by the rule table."""
    shapes = jax.eval_shape(lambda: Transformer(config, dtype=dtype, rngs=nnx.Rngs(0)).params())
    specs = param_specs(config, shapes, mesh)
    return jax.tree.map(lambda s, p: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                          sharding=NamedSharding(mesh, p)),
                        shapes, specs)


def layer_weight_slices(config: ModelConfig, dtype, mesh, min_bytes: int = 2**20
                        ) -> list[tuple[str, tuple[int, ...]]]:
    """(dtype name, shape) of one layer's slice of every stacked weight on one device of
    `mesh` holding at least `min_bytes` (norms and biases are too small for a copy to
    matter): what a copy of a layer's weights would hold."""
    layers = abstract_params(config, dtype, mesh)["layers"]
    slices = {(x.dtype.name, tuple(x.sharding.shard_shape(x.shape))[1:])
              for x in layers.values()}
    return sorted((kind, shape) for kind, shape in slices
                  if math.prod(shape) * jnp.dtype(kind).itemsize >= min_bytes)


def _placed(tree, mesh, spec_of):
    """ShapeDtypeStructs of `tree` (shapes) with `spec_of(path, leaf)`'s sharding."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(
            mesh, spec_of(path, x))), tree)


def _row_spec(shape: tuple[int, ...], axis: int, mesh) -> PartitionSpec:
    """Batch axis `axis` of an array of `shape` over `data` (nothing for a scalar)."""
    if not shape:
        return PartitionSpec()
    row = batch_spec(1, shape[axis], mesh)[0]
    return PartitionSpec(*([None] * axis), row, *([None] * (len(shape) - axis - 1)))


def _per_layer(params: dict, mesh) -> dict:
    """Abstract per-layer weights (a tuple of L dicts, as `unstack_layers` gives), each layer
    sharded as its slice of the stacked weight: a step traced on them runs its layers
    unrolled and reads each weight where it lies (no slicing inside the program)."""
    def layer_leaf(x):
        return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=NamedSharding(
            mesh, PartitionSpec(*x.sharding.spec[1:])))

    layer = {name: layer_leaf(x) for name, x in params["layers"].items()}
    num_layers = next(iter(params["layers"].values())).shape[0]
    return {**params, "layers": (layer,) * num_layers}


def _abstract_sampling(sharding) -> SamplingParams:
    """Scalar sampler knobs as ShapeDtypeStructs (traced values, as `generate` passes them)."""
    return SamplingParams(**{name: jax.ShapeDtypeStruct((), dtype, sharding=sharding)
                             for name, dtype in (("temperature", jnp.float32),
                                                 ("top_p", jnp.float32),
                                                 ("top_k", jnp.int32))})


def _slots_spec(config: ModelConfig, mesh):
    """The sharding of an engine `Slots` leaf: cache buffers by the rule table, the rest
    (per-slot rows, the record) with the slots over `data`."""
    split = kv_heads_split(mesh, config.num_heads, config.num_kv_heads)

    def spec_of(path, x):
        names = [str(getattr(k, "name", getattr(k, "key", k))) for k in path]
        name = names[-1]
        if "cache" in names and name in CACHE_AXES:
            return spec(CACHE_AXES[name], x.shape, mesh, split)
        return _row_spec(x.shape, 1 if name == "visible_until" else 0, mesh)
    return spec_of


def build(program: str, config: ModelConfig, eviction: EvictionConfig, batch: int,
          prompt_length: int, max_new_tokens: int, dtype, mesh):
    """(jit-able function of the arguments, abstract arguments) of `program`. Call under
    `jax.set_mesh(mesh)` and `target_platform(...)`."""
    params = abstract_params(config, dtype, mesh)
    width = bucket_length(prompt_length, None)
    rows = jax.ShapeDtypeStruct((batch, width), jnp.int32,
                                sharding=NamedSharding(mesh, batch_spec(2, batch, mesh)))
    replicated = NamedSharding(mesh, PartitionSpec())
    capacity = decode.cache_capacity(eviction, width, max_new_tokens)
    if program == "generate":
        sampling = _abstract_sampling(replicated)
        seeds = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=replicated)
        eos = jax.ShapeDtypeStruct((1,), jnp.int32, sharding=replicated)
        fn = functools.partial(decode.generate_tokens, config, eviction, max_new_tokens)
        return fn, (params, rows, rows, sampling, seeds, eos)
    if program == "prefill":
        return (lambda p, t, q: decode.prefill(config, eviction, p, t, q, capacity,
                                               jnp.dtype(dtype))), (params, rows, rows)
    if program == "compress_layer":
        return _compress_layer(config, eviction, batch, jnp.dtype(dtype), mesh)
    if program in ("decode_cycle", "decode_step", "evict"):
        slots = jax.eval_shape(lambda: core.init_slots(config, eviction, batch, capacity, 1,
                                                       None, jnp.dtype(dtype)))
        slots = _placed(slots, mesh, _slots_spec(config, mesh))
        if program == "decode_cycle":
            # `decode.decode_params` at the placed shapes (eval_shape would drop shardings).
            cycle_params = _per_layer(params, mesh) if traced_platform() == "cpu" else params
            return functools.partial(core.run_cycle, config, eviction), (cycle_params, slots)
        if program == "evict":
            return (lambda cache: decode.evict(eviction, cache, jnp.ones((batch,), bool))
                    ), (slots.state.cache,)
        return (lambda p, s: decode.decode_step(config, p, s.state, s.sampling, s.eos_ids)
                ), (_per_layer(params, mesh), slots)
    return _training_program(program, config, eviction, batch, width, max_new_tokens, params,
                             mesh)


def _compress_layer(config: ModelConfig, eviction: EvictionConfig, batch: int, dtype, mesh):
    """One layer's compression of a full buffer (`decode.compress_layer`: the eviction
    kernels, select then compact) at the model's head layout: what the kernel matrix
    compiles."""
    K, H = config.num_kv_heads, config.head_dim
    S, W = eviction.capacity, eviction.query_window_size
    args = (((batch, config.num_heads, W, H), dtype, ("batch", "heads", None, None)),
            ((batch, K, S, H), dtype, ("batch", "kv_heads", None, None)),
            ((batch, K, S, H), dtype, ("batch", "kv_heads", None, None)),
            ((batch, K, S), jnp.int32, ("batch", "kv_heads", None)),
            ((batch, K, S), jnp.float32, ("batch", "kv_heads", None)),
            ((batch,), jnp.bool_, ("batch",)), ((batch,), jnp.bool_, ("batch",)))
    split = kv_heads_split(mesh, config.num_heads, K)
    placed = tuple(jax.ShapeDtypeStruct(shape, kind, sharding=NamedSharding(
        mesh, spec(axes, shape, mesh, split))) for shape, kind, axes in args)
    return functools.partial(decode.compress_layer, eviction), placed


def _training_program(program, config, eviction, batch, width, max_new_tokens, params, mesh):
    from gkv_jax.training import steps
    from gkv_jax.training.batch import TeacherForcedBatch
    from gkv_jax.training.configs import OptimizerConfig, make_optimizer

    if program not in ("distill_step", "grpo_step"):
        raise ValueError(f"program must be one of {PROGRAMS}, got {program!r}")
    optimizer = make_optimizer(OptimizerConfig(), 100)
    opt_state = jax.eval_shape(optimizer.init, params)
    specs = param_specs(config, params, mesh)
    structure = jax.tree.structure(params)
    opt_state = jax.tree.map(
        lambda x: (jax.tree.map(lambda s, p: jax.ShapeDtypeStruct(
            s.shape, s.dtype, sharding=NamedSharding(mesh, p)), x, specs)
            if jax.tree.structure(x) == structure
            else jax.tree.map(lambda s: jax.ShapeDtypeStruct(
                s.shape, s.dtype, sharding=NamedSharding(mesh, PartitionSpec())), x)),
        opt_state, is_leaf=lambda x: jax.tree.structure(x) == structure)
    T = width + max_new_tokens - 1

    def rows(shape, dtype, axis=0):
        return jax.ShapeDtypeStruct(shape, dtype,
                                    sharding=NamedSharding(mesh, _row_spec(shape, axis, mesh)))

    grpo = program == "grpo_step"
    batch_ = TeacherForcedBatch(
        tokens=rows((batch, T), jnp.int32), positions=rows((batch, T), jnp.int32),
        targets=rows((batch, max_new_tokens), jnp.int32),
        loss_mask=rows((batch, max_new_tokens), jnp.bool_), lengths=rows((batch,), jnp.int32),
        width=width, visible_until=rows((config.num_layers, batch, config.num_kv_heads, T),
                                        jnp.int32, axis=1),
        reference_log_probs=rows((batch, max_new_tokens), jnp.float32) if grpo else None,
        eviction=eviction)
    if grpo:
        sampling = _abstract_sampling(NamedSharding(mesh, PartitionSpec()))
        return (lambda p, o, b, a, s: steps.grpo_step(config, optimizer, p, o, b, a, s)
                ), (params, opt_state, batch_, rows((batch,), jnp.float32), sampling)
    return (lambda p, o, t, b: steps.distill_step(config, config, optimizer, eviction, p, o, t,
                                                  b)), (params, opt_state, params, batch_)


__all__ = ["PARTS", "PROGRAMS", "abstract_params", "build", "layer_weight_slices"]
