"""`gkv_jax.load`: a Flax model and its tokenizer from a local Hugging Face directory or a hub id.

A local directory is always read offline. Only a source that is not an existing path and looks
like a hub id ("org/name") is handed to `huggingface_hub`, which is the one place where this
library may touch the network, and only because the caller asked for it.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import struct
from typing import Any

from gkv_jax.conversion import from_hf
from gkv_jax.models.transformer import Transformer
from gkv_jax.sharding.mesh import check_mesh

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
GENERIC_TOKENIZER_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


BUNDLED_VARIANTS = {"base": "reasoner", "distilled": "reasoner_distilled",
                    "chain": "reasoner_chain"}
# Stored dtypes that `dtype=None` keeps (float64 checkpoints load as float32), by config.json
# name and by safetensors header code.
CHECKPOINT_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16",
                     "float64": "float32"}
SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float32"}
TORCH_NOTICE = "PyTorch was not found"


class _DropTorchNotice(logging.Filter):
    """Drops transformers' import-time "PyTorch was not found. Models won't be available..."
    advice: this library only uses its tokenizers, so the notice misleads users who never
    asked for torch. Every other transformers record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(TORCH_NOTICE)


def _silence_torch_notice() -> None:
    """Installs the filter on transformers' root logger (before transformers is imported:
    the notice is logged once, at import)."""
    logger = logging.getLogger("transformers")
    if not any(isinstance(f, _DropTorchNotice) for f in logger.filters):
        logger.addFilter(_DropTorchNotice())


_silence_torch_notice()


def bundled_model_dir(variant: str = "base") -> str:
    """The directory of a bundled reasoning model (a Hugging Face checkpoint shipped as
    package data).

    Args:
      variant: "base" (trained on `gkv_jax.synthetic` by scripts/train_reasoner.py),
        "distilled" (the base model distilled for gkv at budget 68 by
        scripts/post_train_reasoner.sh) or "chain" (the second model: the base model's
        architecture trained on the chained walk, dataset "synthetic-chain", by
        scripts/train_chain_reasoner.sh; post-training recipes are validated on it, never
        chosen on it).
    """
    if variant not in BUNDLED_VARIANTS:
        raise ValueError(f"variant must be one of {sorted(BUNDLED_VARIANTS)}, got {variant!r}")
    directory = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets",
                             BUNDLED_VARIANTS[variant])
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise FileNotFoundError(
            f"the bundled model is missing from {directory!r}; reinstall the package or train "
            "it with scripts/train_reasoner.sh (base), scripts/post_train_reasoner.sh "
            "(distilled) or scripts/train_chain_reasoner.sh (chain)")
    return directory


def resolve_source(source: str | os.PathLike) -> str:
    """The local directory of `source`: the path itself, or a hub snapshot (downloads).

    Raises:
      FileNotFoundError: `source` looks like a path but does not exist, or is a file.
    """
    path = os.path.expanduser(os.fspath(source))
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise FileNotFoundError(f"source: {path!r} is a file; expected a checkpoint directory")
    looks_like_path = path.startswith((".", "/", "~")) or path.count("/") > 1
    if looks_like_path or not _HUB_ID.match(path):
        raise FileNotFoundError(
            f"source: no directory at {path!r} (and it is not a Hugging Face hub id "
            "of the form 'org/name')")
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id=path, allow_patterns=_HUB_FILES)


def load_tokenizer(directory: str) -> Any | None:
    """The `transformers` tokenizer saved in `directory`, or None if it has none."""
    if not any(os.path.exists(os.path.join(directory, f)) for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if _declared_tokenizer_class(directory) in GENERIC_TOKENIZER_CLASSES:
        # A plain `tokenizers` JSON (e.g. the bundled model's): AutoTokenizer would pick the
        # model family's own tokenizer class from config.json and ignore tokenizer.json.
        return PreTrainedTokenizerFast.from_pretrained(directory, local_files_only=True)
    return AutoTokenizer.from_pretrained(directory, local_files_only=True)


def _declared_tokenizer_class(directory: str) -> str | None:
    path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f).get("tokenizer_class")


def checkpoint_dtype(directory: str) -> str:
    """The parameter dtype a checkpoint declares: config.json's `torch_dtype` (or `dtype`),
    else the floating dtype most of its safetensors tensors are stored in; "float32" if
    neither says (float64 checkpoints load as float32)."""
    config_path = os.path.join(directory, "config.json")
    if os.path.isfile(config_path):
        try:
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        except (ValueError, UnicodeDecodeError):
            config = None  # from_hf reports the broken file, naming it
        if isinstance(config, dict):
            for key in ("torch_dtype", "dtype"):
                if isinstance(config.get(key), str) and config[key] in CHECKPOINT_DTYPES:
                    return CHECKPOINT_DTYPES[config[key]]
    counts = collections.Counter()
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            for code, size in _safetensors_header_dtypes(os.path.join(directory, name)):
                if code in SAFETENSORS_DTYPES:
                    counts[SAFETENSORS_DTYPES[code]] += size
    return counts.most_common(1)[0][0] if counts else "float32"


def _safetensors_header_dtypes(path: str) -> list[tuple[str, int]]:
    """(dtype code, element count) of each tensor in a safetensors header; [] when the file
    cannot be read as one (from_hf reports it)."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(min(length, 100 * 2**20)))
    except (OSError, ValueError, struct.error):
        return []
    entries = [v for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    sizes = []
    for entry in entries:
        count = 1
        for dim in entry.get("shape", []):
            count *= int(dim)
        sizes.append((str(entry.get("dtype")), count))
    return sizes


def load(source: str | os.PathLike, dtype: Any = None, mesh=None,
         progress: bool | None = None) -> tuple[Transformer, Any]:
    """Loads `(model, tokenizer)` from a Hugging Face checkpoint.

    Args:
      source: a local directory with `config.json`, `*.safetensors` and tokenizer files, or a
        hub id such as "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B" (downloaded with
        `huggingface_hub` only in that case).
      dtype: parameter dtype (jnp dtype or "float32" / "bfloat16" / "float16"); None keeps
        the checkpoint's own dtype (`checkpoint_dtype`).
      mesh: None (the model on the default device), or a `jax.sharding.Mesh` from
        `gkv_jax.sharding.make_mesh`: each weight is read once and placed straight onto its
        shards by the rule table (`gkv_jax.sharding.placement.param_shardings`), so no device
        ever holds the whole model and the host never holds it twice. `gkv_jax.generate`
        then runs on that mesh without a `mesh` argument.
      progress: a progress bar over the tensors read (None: only for checkpoints of about
        2 GB or more, loads of a few seconds; False: never).

    Returns:
      The NNX `Transformer` and the tokenizer (None if the directory has no tokenizer files).

    Raises:
      ValueError: an unsupported dtype, or weights stored as integers (from the conversion).
      TypeError / ValueError: `mesh` is not a Mesh with the axes ("data", "model"), checked
        before anything is read or downloaded.
    """
    if mesh is not None:
        check_mesh(mesh)
    directory = resolve_source(source)
    if dtype is None:
        dtype = checkpoint_dtype(directory)
    return (from_hf(directory, dtype=dtype, mesh=mesh, progress=progress),
            load_tokenizer(directory))
