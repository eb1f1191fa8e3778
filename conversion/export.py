"""Flax -> Hugging Face: `to_hf` writes a model as safetensors that `transformers` loads with
the same logits, tensor by tensor into size-capped shards with an index, so that the host
holds at most one shard beyond the model (never a second copy of the whole model).

The names, shapes and layouts come from the same table as loading (`rules.LAYER_RULES`,
`rules.GLOBAL_RULES`); a shard's plan needs only the shapes.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterable

import jax.numpy as jnp
import numpy as np

from gkv_jax.conversion.rules import _WEIGHT_FILE, INDEX_FILE, _rules_by_key
from gkv_jax.models.transformer import Transformer

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3  # Hugging Face's default shard size (5 GiB)


@dataclasses.dataclass(frozen=True)
class HfTensor:
    """One tensor of the export: its HF name, shape, dtype, and how to read it from the
    model (one layer's slice, moved to the host and laid out as HF stores it)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    read: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def hf_tensors(model: Transformer) -> list[HfTensor]:
    """Every HF tensor of `model`, in checkpoint order (globals, then layer by layer); none
    is read until its `read()` is called."""
    config = model.config
    params = model.params()
    dtype = np.dtype(jnp.dtype(model.dtype))

    def reader(rule, layer):
        def read() -> np.ndarray:
            weight = params[rule.name] if layer is None else params["layers"][rule.name][layer]
            return np.ascontiguousarray(rule.to_hf(np.asarray(weight), config))
        return read

    return [HfTensor(key, tuple(rule.hf_shape(config)), dtype, reader(rule, layer))
            for key, (rule, layer) in _rules_by_key(config).items()]


def hf_state_dict(model: Transformer) -> dict[str, np.ndarray]:
    """The model's weights under HF names and layouts, all at once (numpy, the model's
    dtype): for small models and tests; `to_hf` streams them instead."""
    return {tensor.name: tensor.read() for tensor in hf_tensors(model)}


def plan_shards(tensors: Iterable[HfTensor], max_shard_bytes: int) -> list[list[HfTensor]]:
    """Consecutive tensors grouped into shards of at most `max_shard_bytes` each (a tensor
    larger than that is a shard of its own)."""
    shards: list[list[HfTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def remove_weight_files(directory: str) -> list[str]:
    """Deletes the weight files `to_hf` writes (`model.safetensors`, its shards
    `model-XXXXX-of-YYYYY.safetensors` and `model.safetensors.index.json`) from `directory`,
    and nothing else. Returns the deleted names."""
    names = sorted(n for n in os.listdir(directory)
                   if (n == INDEX_FILE or _WEIGHT_FILE.match(n))
                   and os.path.isfile(os.path.join(directory, n)))
    for name in names:
        os.remove(os.path.join(directory, name))
    return names


def _check_max_shard_bytes(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"max_shard_bytes must be an integer >= 1 (bytes per shard), got "
                         f"{value!r}")
    return int(value)


def to_hf(model: Transformer, out_dir: str | os.PathLike,
          max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool | None = None) -> str:
    """Writes `config.json` and safetensors that `transformers` loads with the same logits.

    Tensors are read from the model one at a time and written shard by shard: the host
    holds one shard's tensors (and safetensors' serialised copy of them) at a time, never
    the whole model twice. Checkpoints above `max_shard_bytes` are split into shards
    `model-XXXXX-of-YYYYY.safetensors` with a `model.safetensors.index.json`, as Hugging
    Face does. Weight files of an earlier export into `out_dir` (`model.safetensors`,
    `model-*-of-*.safetensors` and the index) are deleted first, so that a loader cannot
    pick up stale shards; other files are kept.

    Args:
      model: the model to export.
      out_dir: the directory (created if missing).
      max_shard_bytes: the most bytes of tensors in one shard (default 5 GiB).
      progress: a progress bar over the shards (None: only when there are several).

    Returns:
      The directory.
    """
    from safetensors.numpy import save_file
    from tqdm.auto import tqdm

    max_shard_bytes = _check_max_shard_bytes(max_shard_bytes)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    tensors = hf_tensors(model)
    shards = plan_shards(tensors, max_shard_bytes)
    remove_weight_files(out_dir)
    hf_config = model.config.to_hf_dict()
    hf_config["torch_dtype"] = jnp.dtype(model.dtype).name
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    show = len(shards) > 1 if progress is None else bool(progress)
    for name, shard in tqdm(list(zip(names, shards, strict=True)), desc="to_hf shards",
                            unit="shard", disable=not show):
        save_file({tensor.name: tensor.read() for tensor in shard},
                  os.path.join(out_dir, name), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)},
                 "weight_map": {t.name: name for name, shard in zip(names, shards, strict=True)
                                for t in shard}}
        with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
            json.dump(index, f, indent=2)
    return out_dir
