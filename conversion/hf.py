"""Strict Hugging Face <-> Flax weight conversion for the Qwen2 / Llama / Qwen3 families.

One table (`LAYER_RULES`) says how each HF tensor maps to a stacked model weight; `from_hf`
and `to_hf` both read it. Strict in both directions: every HF tensor is consumed, every model
weight is filled exactly once, every shape is checked, and errors name the HF key.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import mmap
import os
import re
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from gkv_jax.models.config import ModelConfig
from gkv_jax.models.transformer import Transformer, param_shapes, resolve_dtype
from gkv_jax.sharding.mesh import check_mesh
from gkv_jax.sharding.placement import param_shardings

# ---------------------------------------------------------------------------- the table


@dataclasses.dataclass(frozen=True)
class Rule:
    """How one HF tensor becomes one model weight.

    `to_flax(hf_array, config)` reshapes/transposes an HF tensor into the model's layout;
    `hf_shape(config)` is the HF tensor's expected shape; `to_hf` is the inverse.
    """

    hf_suffix: str
    name: str
    hf_shape: Callable[[ModelConfig], tuple[int, ...]]
    to_flax: Callable[[np.ndarray, ModelConfig], np.ndarray]
    to_hf: Callable[[np.ndarray, ModelConfig], np.ndarray]
    when: Callable[[ModelConfig], bool] = lambda c: True


def _linear_in(heads: Callable[[ModelConfig], int]):
    """HF [heads*H, D] -> ours [D, heads, H] (a projection into heads)."""
    return (lambda c: (heads(c) * c.head_dim, c.hidden_size),
            lambda w, c: w.T.reshape(c.hidden_size, heads(c), c.head_dim),
            lambda w, c: w.reshape(c.hidden_size, heads(c) * c.head_dim).T)


def _bias(heads: Callable[[ModelConfig], int]):
    return (lambda c: (heads(c) * c.head_dim,),
            lambda b, c: b.reshape(heads(c), c.head_dim),
            lambda b, c: b.reshape(-1))


def _same(shape: Callable[[ModelConfig], tuple[int, ...]]):
    return shape, lambda w, c: w, lambda w, c: w


def _transposed(shape: Callable[[ModelConfig], tuple[int, ...]]):
    return shape, lambda w, c: w.T, lambda w, c: w.T


def _q_heads(c):
    return c.num_heads


def _kv_heads(c):
    return c.num_kv_heads


def _has_bias(c):
    return c.qkv_bias


def _has_qk_norm(c):
    return c.qk_norm


LAYER_RULES: tuple[Rule, ...] = (
    Rule("input_layernorm.weight", "attn_norm", *_same(lambda c: (c.hidden_size,))),
    Rule("self_attn.q_proj.weight", "q_proj", *_linear_in(_q_heads)),
    Rule("self_attn.k_proj.weight", "k_proj", *_linear_in(_kv_heads)),
    Rule("self_attn.v_proj.weight", "v_proj", *_linear_in(_kv_heads)),
    Rule("self_attn.q_proj.bias", "q_bias", *_bias(_q_heads), when=_has_bias),
    Rule("self_attn.k_proj.bias", "k_bias", *_bias(_kv_heads), when=_has_bias),
    Rule("self_attn.v_proj.bias", "v_bias", *_bias(_kv_heads), when=_has_bias),
    Rule("self_attn.q_norm.weight", "q_norm", *_same(lambda c: (c.head_dim,)),
         when=_has_qk_norm),
    Rule("self_attn.k_norm.weight", "k_norm", *_same(lambda c: (c.head_dim,)),
         when=_has_qk_norm),
    Rule("self_attn.o_proj.weight", "o_proj",
         lambda c: (c.hidden_size, c.num_heads * c.head_dim),
         lambda w, c: w.T.reshape(c.num_heads, c.head_dim, c.hidden_size),
         lambda w, c: w.reshape(c.num_heads * c.head_dim, c.hidden_size).T),
    Rule("post_attention_layernorm.weight", "mlp_norm", *_same(lambda c: (c.hidden_size,))),
    Rule("mlp.gate_proj.weight", "gate_proj",
         *_transposed(lambda c: (c.intermediate_size, c.hidden_size))),
    Rule("mlp.up_proj.weight", "up_proj",
         *_transposed(lambda c: (c.intermediate_size, c.hidden_size))),
    Rule("mlp.down_proj.weight", "down_proj",
         *_transposed(lambda c: (c.hidden_size, c.intermediate_size))),
)

GLOBAL_RULES: tuple[Rule, ...] = (
    Rule("model.embed_tokens.weight", "embedding",
         *_same(lambda c: (c.vocab_size, c.hidden_size))),
    Rule("model.norm.weight", "final_norm", *_same(lambda c: (c.hidden_size,))),
    Rule("lm_head.weight", "lm_head", *_transposed(lambda c: (c.vocab_size, c.hidden_size)),
         when=lambda c: not c.tie_word_embeddings),
)

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
INDEX_FILE = "model.safetensors.index.json"
# The weight files `to_hf` writes: one file, or numbered shards named in the index.
_WEIGHT_FILE = re.compile(r"^model(-\d+-of-\d+)?\.safetensors$")
# Derived buffers that some older checkpoints store; recomputed from the config, so skipped.
_DERIVED_KEY = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


class ConversionError(ValueError):
    """A checkpoint does not match the model: missing, unexpected or mis-shaped tensors."""


# ---------------------------------------------------------------------------- sources
def _torch_to_numpy(tensor) -> np.ndarray:
    import torch  # only when the caller handed us torch tensors

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def _as_numpy(value) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if type(value).__module__.startswith("torch"):
        return _torch_to_numpy(value)
    return np.asarray(value)


def _read_json(path: str) -> Any:
    """A JSON file's content; ValueError naming the file and the position of a syntax error
    (a file cut short by an interrupted copy or download is the usual cause)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno} column "
                         f"{err.colno}); is the file truncated?") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def _safetensors_files(directory: str) -> list[str]:
    index = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index):
        content = _read_json(index)
        weight_map = content.get("weight_map") if isinstance(content, dict) else None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map' object (tensor name -> shard file)")
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"source: no *.safetensors files in {directory!r}")
    paths = [os.path.join(directory, f) for f in files]
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"source: shard {path!r} named in the index is missing")
    return paths


class TensorSource:
    """Lazy access to a checkpoint's tensors: names, shapes without reading, and one tensor
    at a time as numpy (in its stored dtype)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], read: Callable[[str], np.ndarray],
                 origin: Mapping[str, str] | None = None):
        self.shapes = shapes
        self.read = read
        self.origin = dict(origin or {})  # tensor name -> the file it is stored in
        # What the conversion copied out of the tensors (on a mesh, only this process's
        # blocks): the bytes it read, for a memory-mapped checkpoint.
        self.bytes_copied = 0

    def where(self, key: str) -> str:
        """The tensor's name, and its file when it has one (for error messages)."""
        return f"{key} in {self.origin[key]}" if key in self.origin else key

    def read_float(self, key: str) -> np.ndarray:
        """A tensor that must hold floating-point weights (an integer one is quantized or
        corrupt: cast to float it would load, then generate garbage)."""
        tensor = self.read(key)
        if not jnp.issubdtype(tensor.dtype, jnp.floating):
            raise ConversionError(f"{self.where(key)}: stored as {tensor.dtype}; weights must be "
                                  "floating point (float32, bfloat16 or float16)")
        return tensor

    @classmethod
    def from_mapping(cls, state: Mapping[str, Any]) -> TensorSource:
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        return cls(shapes, lambda key: _as_numpy(state[key]))

    @classmethod
    def from_safetensors(cls, paths: list[str]) -> TensorSource:
        """Every shard's header read once; a tensor is read only when asked for.

        A read maps the tensor's bytes (`np.memmap`, no copy): the conversion copies them
        once, straight into the weight's final buffer. Each read maps its file anew and
        the map goes with the returned array: the memory-mapped pages of a tensor already
        copied out would otherwise stay resident (and counted in the process's memory)
        until the end of the conversion, a second copy of the model.
        """
        from safetensors import safe_open

        owner, shapes = {}, {}
        for path in paths:
            try:
                with safe_open(path, framework="numpy") as handle:
                    for key in handle.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                        if key in owner:
                            raise ConversionError(f"{key}: tensor appears twice (in "
                                                  f"{owner[key]!r} and {path!r})")
                        owner[key] = path
                        shapes[key] = tuple(handle.get_slice(key).get_shape())
            except ConversionError:
                raise
            except Exception as err:  # safetensors' SafetensorError, not a ValueError
                raise ConversionError(f"{path}: not a readable safetensors file, truncated or "
                                      f"corrupt ({err})") from None

        layouts = {path: _safetensors_layout(path) for path in paths}

        def read(key: str) -> np.ndarray:
            path = owner[key]
            try:
                return _mapped_tensor(path, key, layouts[path])
            except ConversionError:
                raise
            except Exception as err:
                raise ConversionError(f"{key} in {path}: cannot be read, the file is "
                                      f"truncated or corrupt ({err})") from None
        return cls(shapes, read, origin=owner)


# safetensors' dtype names -> numpy dtypes (the integer ones load only to be refused by name).
_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
                       "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32,
                       "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _safetensors_layout(path: str) -> tuple[int, dict[str, Any]]:
    """(where the data starts, the header's tensor entries) of a safetensors file: an
    8-byte little-endian header size, then the JSON header (the format's specification)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return 8 + size, header


def _mapped_tensor(path: str, key: str, layout: tuple[int, dict[str, Any]]) -> np.ndarray:
    """The tensor `key` of a safetensors file as a read-only memory map of its bytes."""
    start, header = layout
    entry = header[key]
    dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
    if dtype is None:
        raise ConversionError(f"{key} in {path}: stored as {entry['dtype']}; weights must be "
                              "floating point (float32, bfloat16 or float16)")
    shape = tuple(entry["shape"])
    begin, end = entry["data_offsets"]
    if end - begin != int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize:
        raise ConversionError(f"{key} in {path}: its byte range does not match its shape "
                              f"{shape} and dtype {entry['dtype']}; the file is corrupt")
    if end == begin:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=start + begin, shape=shape)


def _read_config_json(directory: str) -> ModelConfig:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"source: no config.json in {directory!r}")
    content = _read_json(path)
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(content).__name__}")
    return _model_config(content, path)


def _model_config(hf_config: Any, where: str) -> ModelConfig:
    """`ModelConfig.from_hf_config`, its errors prefixed with where the config came from."""
    try:
        return ModelConfig.from_hf_config(hf_config)
    except KeyError as err:
        raise ValueError(f"{where}: missing required field {err.args[0]!r}") from None
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err
    except TypeError as err:
        if not isinstance(hf_config, dict):
            raise
        raise ValueError(f"{where}: a field has the wrong type ({err})") from err


def _open_source(source: Any) -> tuple[ModelConfig, TensorSource]:
    """The config and the tensors of any accepted `source`."""
    if isinstance(source, str | os.PathLike):
        directory = os.fspath(source)
        if not os.path.isdir(directory):
            raise FileNotFoundError(
                f"source: {directory!r} is not a directory (expected a local Hugging Face "
                "checkpoint with config.json and *.safetensors)")
        config = _read_config_json(directory)
        return config, TensorSource.from_safetensors(_safetensors_files(directory))
    if isinstance(source, tuple) and len(source) == 2:
        state_dict, hf_config = source
        return _model_config(hf_config, "hf_config"), TensorSource.from_mapping(state_dict)
    if hasattr(source, "state_dict") and hasattr(source, "config"):
        config = _model_config(source.config, "source.config")
        return config, TensorSource.from_mapping(source.state_dict())
    raise TypeError(
        "source must be a transformers model, a local checkpoint directory or a "
        f"(state_dict, hf_config) pair, got {type(source).__name__}")


# ---------------------------------------------------------------------------- HF -> Flax
def _check_shape(key: str, shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if tuple(shape) != tuple(expected):
        raise ConversionError(f"{key}: expected shape {tuple(expected)}, got {tuple(shape)}")


def _rules_by_key(config: ModelConfig) -> dict[str, tuple[Rule, int | None]]:
    table: dict[str, tuple[Rule, int | None]] = {
        r.hf_suffix: (r, None) for r in GLOBAL_RULES if r.when(config)}
    for i in range(config.num_layers):
        for r in LAYER_RULES:
            if r.when(config):
                table[f"model.layers.{i}.{r.hf_suffix}"] = (r, i)
    return table


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


def _as_bits(array: np.ndarray) -> np.ndarray:
    """bfloat16 as uint16, so that numpy transposes and copies run at memory speed
    (ml_dtypes' bfloat16 copies element by element)."""
    return array.view(np.uint16) if array.dtype == ml_dtypes.bfloat16 else array


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised, page-aligned array in fresh anonymous memory.

    Page-aligned, so that the CPU backend's device_put adopts the buffer instead of copying
    it. Mapped here rather than by numpy, which asks the kernel for huge pages on large
    arrays: where the kernel compacts memory to find them (transparent huge pages with
    `defrag=madvise`, a common default), the first write to the buffer stalls; on the test
    machine that made loading 2-2.5x slower.
    """
    size = int(np.prod(shape)) * dtype.itemsize
    if size == 0:
        return np.empty(shape, dtype)
    return np.frombuffer(mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE), dtype).reshape(shape)


def _copy_blocked(destination: np.ndarray, source: np.ndarray, block: int = 128) -> None:
    """`destination[...] = source`, split over the host's cores by rows (numpy releases
    the GIL while it copies; the first write to each fresh page is as costly as the copy).

    A transposed view is copied in `block` x `block` tiles over the first and last axes:
    read whole it thrashes the cache (numpy walks it element by element across rows); in
    tiles each read row stays in cache. 5-9x faster on a transposed weight matrix
    (R1-Distill-Qwen-1.5B's LM head: 4.2 s -> 0.45 s on one core).
    """
    if source.ndim > 2:  # a projection into heads: copied as the matrix it is a view of
        flat = _as_matrix(source)
        if flat is not None and destination.flags.c_contiguous:
            _copy_blocked(destination.reshape(flat.shape), flat, block)
            return
    first = source.shape[0] if source.ndim else 1
    tiled = source.ndim >= 2 and source.strides[-1] != source.itemsize
    rows = block if tiled else max(1, -(-first // _copy_workers()))
    if source.nbytes < _PARALLEL_MIN_BYTES or first <= rows:
        _copy_rows(destination, source, 0, first, tiled, block)
        return
    starts = range(0, first, rows)
    list(_copy_pool().map(
        lambda start: _copy_rows(destination, source, start, start + rows, tiled, block),
        starts))


def _as_matrix(array: np.ndarray) -> np.ndarray | None:
    """A >2-d view as a 2-d one, merging its trailing or its leading axes (a transposed
    matrix split into heads: q/k/v [D, N, H], o [N, H, D]), or None if neither merges.
    Checked on the strides: numpy's own reshape would copy silently where they do not
    allow a view (and assigning `.shape` copies before it refuses)."""
    shape, strides = array.shape, array.strides

    def mergeable(first: int, last: int) -> bool:  # axes first..last into one
        return all(strides[i] == shape[i + 1] * strides[i + 1] for i in range(first, last))

    if mergeable(1, array.ndim - 1):
        return np.lib.stride_tricks.as_strided(
            array, (shape[0], int(np.prod(shape[1:]))), (strides[0], strides[-1]))
    if mergeable(0, array.ndim - 2):
        return np.lib.stride_tricks.as_strided(
            array, (int(np.prod(shape[:-1])), shape[-1]), (strides[-2], strides[-1]))
    return None


# Copies smaller than this run on the calling thread (the pool's hand-off costs more).
_PARALLEL_MIN_BYTES = 4 * 2**20


def _copy_rows(destination: np.ndarray, source: np.ndarray, start: int, stop: int,
               tiled: bool, block: int) -> None:
    """Rows `start:stop` of `_copy_blocked`, tile by tile when `tiled`."""
    if source.ndim == 0:
        destination[...] = source
    elif not tiled:
        destination[start:stop] = source[start:stop]
    else:
        for j in range(0, source.shape[-1], block):
            destination[start:stop, ..., j:j + block] = source[start:stop, ..., j:j + block]


@functools.cache
def _copy_workers() -> int:
    return max(1, min(len(os.sched_getaffinity(0)), 16))


@functools.cache
def _copy_pool() -> ThreadPoolExecutor:
    """The threads that copy weights, made once per process."""
    return ThreadPoolExecutor(_copy_workers(), thread_name_prefix="gkv-load")


def _to_host(rule: Rule, keys: list[str], source: TensorSource, config: ModelConfig,
             stack: bool) -> np.ndarray:
    """One model weight on the host, in the model layout and its stored dtype: its HF tensors
    read one at a time (through memory maps for safetensors) and copied once into one
    aligned buffer (stacked over layers), which the CPU backend then adopts."""
    host = None
    for i, key in enumerate(keys):
        tensor = source.read_float(key)
        laid_out = rule.to_flax(_as_bits(tensor), config)
        if host is None:
            stored = tensor.dtype
            shape = (len(keys), *laid_out.shape) if stack else laid_out.shape
            host = _aligned_empty(shape, laid_out.dtype)
        elif tensor.dtype != stored:
            raise ConversionError(f"{source.where(key)}: stored as {tensor.dtype}, other "
                                  f"layers as {stored}")
        _copy_blocked(host[i] if stack else host, laid_out)
        source.bytes_copied += laid_out.nbytes
        del tensor, laid_out
    return host.view(stored)


def _laid_out(rule: Rule, key: str, source: TensorSource, config: ModelConfig
              ) -> np.ndarray:
    """One HF tensor in the model's layout, as raw bits: a view of a memory map for a
    safetensors checkpoint, so that nothing is read until a slice of it is copied out."""
    return rule.to_flax(_as_bits(source.read_float(key)), config)


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
                    block = _aligned_empty((len(layers), *view.shape) if stack else view.shape,
                                           view.dtype)
                _copy_blocked(block[row] if stack else block, view)
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
