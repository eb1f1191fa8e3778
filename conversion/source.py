"""Reading a Hugging Face checkpoint without loading it: its config (`config.json` or an
in-memory config) and its tensors as a lazy `TensorSource` (safetensors headers read once, each
tensor memory-mapped only when asked for; or an in-memory state dict).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from gkv_jax.conversion.rules import INDEX_FILE, ConversionError
from gkv_jax.models.config import ModelConfig


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
