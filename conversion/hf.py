"""Strict Hugging Face -> Flax loading: `from_hf` and `convert_weights`.

The checkpoint's keys and shapes are checked against the table (`rules`) before anything is
read: every HF tensor is consumed, every model weight is filled exactly once, and errors name
the HF key. Each weight is then copied once, in parallel and cache-friendly tiles
(`fast_copy`), into its final host buffer, or block by block straight onto its shards on a
mesh.
"""

from __future__ import annotations

import gc
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

# Used through the module, so that `fast_copy._copy_blocked` is looked up at each call (the
# benchmark `loading_breakdown.py` times every copy by replacing it there).
from gkv_jax.conversion import fast_copy
from gkv_jax.conversion.rules import (
    _DERIVED_KEY,
    GLOBAL_RULES,
    LAYER_RULES,
    ConversionError,
    Rule,
    _rules_by_key,
)
from gkv_jax.conversion.source import TensorSource, _open_source
from gkv_jax.models.config import ModelConfig
from gkv_jax.models.transformer import Transformer, param_shapes, resolve_dtype
from gkv_jax.sharding.mesh import check_mesh
from gkv_jax.sharding.placement import param_shardings


# ---------------------------------------------------------------------------- HF -> Flax
def _check_shape(key: str, shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if tuple(shape) != tuple(expected):
        raise ConversionError(f"{key}: expected shape {tuple(expected)}, got {tuple(shape)}")


def _check_keys(config: ModelConfig, source: TensorSource,
                table: dict[str, tuple[Rule, int | None]]) -> None:
    """Every tensor maps to a weight, every weight has a tensor, every shape fits."""
    for key, shape in source.shapes.items():
        if _DERIVED_KEY.search(key):
            continue
        if key == "lm_head.weight" and config.tie_word_embeddings:
            _check_shape(key, shape, (config.vocab_size, config.hidden_size))
            continue
        if key not in table:
            raise ConversionError(f"{key}: unexpected tensor (no weight of a "
                                  f"{config.family} model maps to it)")
        _check_shape(key, shape, table[key][0].hf_shape(config))
    missing = [k for k in table if k not in source.shapes]
    if missing:
        rule, _ = table[missing[0]]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConversionError(f"{missing[0]}: missing tensor, expected shape "
                              f"{rule.hf_shape(config)}{more}")


def _to_host(rule: Rule, keys: list[str], source: TensorSource, config: ModelConfig,
             stack: bool) -> np.ndarray:
    """One model weight on the host, in the model layout and its stored dtype: its HF tensors
    read one at a time (through memory maps for safetensors) and copied once into one
    aligned buffer (stacked over layers), which the CPU backend then adopts."""
    host = None
    for i, key in enumerate(keys):
        tensor = source.read_float(key)
        laid_out = rule.to_flax(fast_copy._as_bits(tensor), config)
        if host is None:
            stored = tensor.dtype
            shape = (len(keys), *laid_out.shape) if stack else laid_out.shape
            host = fast_copy._aligned_empty(shape, laid_out.dtype)
        elif tensor.dtype != stored:
            raise ConversionError(f"{source.where(key)}: stored as {tensor.dtype}, other "
                                  f"layers as {stored}")
        fast_copy._copy_blocked(host[i] if stack else host, laid_out)
        source.bytes_copied += laid_out.nbytes
        del tensor, laid_out
    return host.view(stored)


def _laid_out(rule: Rule, key: str, source: TensorSource, config: ModelConfig
              ) -> np.ndarray:
    """One HF tensor in the model's layout, as raw bits: a view of a memory map for a
    safetensors checkpoint, so that nothing is read until a slice of it is copied out."""
    return rule.to_flax(fast_copy._as_bits(source.read_float(key)), config)


def _stored_dtype(keys: list[str], source: TensorSource) -> np.dtype:
    """The dtype every tensor of one weight is stored in (mapping them reads no data)."""
    stored = None
    for key in keys:
        dtype = source.read_float(key).dtype
        if stored is not None and dtype != stored:
            raise ConversionError(f"{source.where(key)}: stored as {dtype}, other layers as "
                                  f"{stored}")
        stored = dtype
    return stored


def _sharded(rule: Rule, keys: list[str], source: TensorSource, config: ModelConfig,
             stack: bool, sharding: NamedSharding) -> jax.Array:
    """One weight as a global array with `sharding`, in its stored dtype, each device's
    block copied straight from the checkpoint: only the bytes of this process's shards are
    read (on a multi-process run, each process reads about its share), and neither the host
    nor a device ever holds the whole weight. Each layer's tensor is mapped anew for each
    block and dropped after, so that its pages do not stay resident."""
    stored = _stored_dtype(keys, source)
    layer_shape = _laid_out(rule, keys[0], source, config).shape
    shape = (len(keys), *layer_shape) if stack else layer_shape
    blocks: dict[tuple, np.ndarray] = {}  # replicas share their block

    def block_for(index: tuple[slice, ...]) -> np.ndarray:
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in blocks:
            layers = range(*index[0].indices(len(keys))) if stack else [0]
            within = index[1:] if stack else index
            block = None
            for row, layer in enumerate(layers):
                view = _laid_out(rule, keys[layer], source, config)[within]
                if block is None:
                    block = fast_copy._aligned_empty(
                        (len(layers), *view.shape) if stack else view.shape, view.dtype)
                fast_copy._copy_blocked(block[row] if stack else block, view)
                source.bytes_copied += view.nbytes
                del view
            blocks[key] = block.view(stored)
        return blocks[key]

    return jax.make_array_from_callback(shape, sharding, block_for)


def _to_device(rule: Rule, keys: list[str], source: TensorSource, config: ModelConfig,
               dtype, stack: bool, sharding: NamedSharding | None = None) -> jax.Array:
    """One model weight on the device(s), in `dtype`.

    Without `sharding`: the host buffer moved to the default device once, then cast once.
    With it: each device receives only its own block, copied from the checkpoint
    (`_sharded`; on a multi-process run each process fills, and reads, only the shards of
    its own devices), the cast runs shard by shard, and the result has exactly `sharding`.
    The weight is never whole on one device, nor on the host.
    """
    if sharding is None:
        host = _to_host(rule, keys, source, config, stack)
        device = jax.device_put(host)
        del host
        return device if device.dtype == dtype else device.astype(dtype)
    placed = _sharded(rule, keys, source, config, stack, sharding)
    if placed.dtype != dtype:
        placed = placed.astype(dtype)  # elementwise: runs on each shard where it lies
    # A no-op when the cast kept the layout; it never gathers the weight on one device.
    return jax.device_put(placed, sharding)


def weight_shardings(config: ModelConfig, mesh) -> dict[str, Any]:
    """The `NamedSharding` of every model weight on `mesh` by the rule table, as the nested
    dict `convert_weights` returns (no weight is read)."""
    return param_shardings(config, param_shapes(config), check_mesh(mesh))


# A progress bar by default for checkpoints of at least this many elements (about 2 GB in
# bfloat16): loads of a few seconds and more.
PROGRESS_MIN_ELEMENTS = 2**30


def _with_progress(source: TensorSource, progress: bool | None) -> tuple[TensorSource, Any]:
    """`source` whose reads advance a tqdm bar over its tensors (None: one for checkpoints
    of `PROGRESS_MIN_ELEMENTS` or more), and the bar (None when not shown)."""
    elements = sum(int(np.prod(shape, dtype=np.int64)) for shape in source.shapes.values())
    show = elements >= PROGRESS_MIN_ELEMENTS if progress is None else bool(progress)
    if not show:
        return source, None
    from tqdm.auto import tqdm

    read_once = [key for key in source.shapes if not _DERIVED_KEY.search(key)]
    bar = tqdm(total=len(read_once), desc="loading tensors", unit="tensor")

    def read(key: str) -> np.ndarray:
        tensor = source.read(key)
        bar.update()
        return tensor
    return TensorSource(source.shapes, read, source.origin), bar


def convert_weights(config: ModelConfig, source: TensorSource, dtype: Any = jnp.float32,
                    mesh=None, progress: bool | None = None) -> dict[str, Any]:
    """The model's nested weight dict (jax arrays in `dtype`) from a checkpoint's tensors.

    The keys and shapes are checked first (nothing is read before); then each model weight
    is assembled on the host from its HF tensors (transposed into the model layout, stacked
    over layers), moved to the device(s) once and cast once, and its host copy dropped: the
    host never holds more than one stacked weight beyond what the devices hold.

    Args:
      config: the model's config.
      source: the checkpoint's tensors.
      dtype: the weights' dtype.
      mesh: None (every weight on the default device), or a `jax.sharding.Mesh` from
        `gkv_jax.sharding.make_mesh`: each weight goes straight onto its shards by the
        rule table (`gkv_jax.sharding.placement.param_shardings`).
      progress: a tqdm bar over the tensors read (None: only for checkpoints of
        `PROGRESS_MIN_ELEMENTS` elements or more, loads of a few seconds).

    Raises:
      ConversionError: naming the first unexpected, duplicated, mis-shaped or missing key.
      TypeError / ValueError: `mesh` is not a Mesh with the axes ("data", "model").
    """
    shardings = None if mesh is None else weight_shardings(config, mesh)
    dtype = resolve_dtype(dtype)
    table = _rules_by_key(config)
    _check_keys(config, source, table)
    reading, bar = _with_progress(source, progress)
    try:
        return _convert_checked(config, reading, dtype, shardings)
    finally:
        if reading is not source:
            source.bytes_copied += reading.bytes_copied
        if bar is not None:
            bar.close()


def _convert_checked(config: ModelConfig, source: TensorSource, dtype,
                     shardings: dict[str, Any] | None) -> dict[str, Any]:
    """`convert_weights` once the keys and shapes are checked."""

    def placed(rule: Rule, keys: list[str], stack: bool, name: str | None = None,
               layer: bool = False) -> jax.Array:
        name = name or rule.name
        sharding = None if shardings is None else (
            shardings["layers"][name] if layer else shardings[name])
        return _to_device(rule, keys, source, config, dtype, stack, sharding)

    out: dict[str, Any] = {}
    for rule in GLOBAL_RULES:
        if rule.when(config):
            out[rule.name] = placed(rule, [rule.hf_suffix], stack=False)
    out["layers"] = {
        rule.name: placed(rule, [f"model.layers.{i}.{rule.hf_suffix}"
                                 for i in range(config.num_layers)], stack=True, layer=True)
        for rule in LAYER_RULES if rule.when(config)}
    if config.tie_word_embeddings and "lm_head.weight" in source.shapes:
        # Laid out and placed like the embedding, so that the comparison runs shard by shard.
        embedding_rule = next(r for r in GLOBAL_RULES if r.name == "embedding")
        head = placed(embedding_rule, ["lm_head.weight"], stack=False, name="embedding")
        if not bool(jnp.array_equal(head, out["embedding"])):
            raise ConversionError("lm_head.weight: differs from model.embed_tokens.weight "
                                  "although tie_word_embeddings=True")
        del head
    gc.collect()  # jax may hold the transferred host buffers until the next collection
    return out


def model_from_weights(config: ModelConfig, weights: dict[str, Any],
                       dtype: Any = jnp.float32) -> Transformer:
    """An NNX `Transformer` holding `weights` (no random initialisation is run).

    The arrays are taken as they are: weights already in `dtype` are neither copied nor
    moved, so a model converted onto a mesh keeps each weight's sharding.
    """
    dtype = resolve_dtype(dtype)
    abstract = nnx.eval_shape(lambda: Transformer(config, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda a: jnp.asarray(a, dtype), weights))
    return nnx.merge(graphdef, state)


def from_hf(source: Any, dtype: Any = jnp.float32, mesh=None,
            progress: bool | None = None) -> Transformer:
    """A Flax model from a Hugging Face checkpoint.

    Args:
      source: an in-memory `transformers` model, a local directory with `config.json` and one
        or more `*.safetensors` files (sharded with `model.safetensors.index.json` or not), or
        a `(state_dict, hf_config)` pair.
      dtype: parameter dtype, a jnp dtype or its name ("float32", "bfloat16", "float16").
      mesh: None (the model on the default device), or a `jax.sharding.Mesh` from
        `gkv_jax.sharding.make_mesh`: each weight is placed straight onto its shards by the
        rule table (never whole on one device, never twice in host memory), and
        `gkv_jax.generate` then runs on that mesh without a `mesh` argument.
      progress: a progress bar over the tensors read (None: only for checkpoints of about
        2 GB or more, loads of a few seconds; False: never).

    Raises:
      ConversionError: a tensor is missing, unexpected, mis-shaped or stored as integers,
        or a safetensors file is truncated or corrupt (the message names tensor and file).
      ValueError: the config uses a feature this library does not implement, lacks a
        required field or is not valid JSON (naming config.json), or bad dtype.
      TypeError / ValueError: `mesh` is not a Mesh with the axes ("data", "model") (checked
        before anything is read).
      FileNotFoundError: the directory, its config.json or a shard does not exist.
    """
    if mesh is not None:
        check_mesh(mesh)
    dtype = resolve_dtype(dtype)
    config, tensors = _open_source(source)
    return model_from_weights(config, convert_weights(config, tensors, dtype, mesh, progress),
                              dtype)
