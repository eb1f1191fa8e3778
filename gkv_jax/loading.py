"""`gkv_jax.load`: a Flax model and its tokenizer from a local Hugging Face directory or a hub id.

A local directory is always read offline. Only a source that is not an existing path and looks
like a hub id ("org/name") is handed to `huggingface_hub`, which is the one place where this
library may touch the network, and only because the caller asked for it.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jax.numpy as jnp

from gkv_jax.conversion import from_hf
from gkv_jax.models.transformer import Transformer

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
GENERIC_TOKENIZER_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


BUNDLED_VARIANTS = {"base": "reasoner", "distilled": "reasoner_distilled"}


def bundled_model_dir(variant: str = "base") -> str:
    """The directory of a bundled reasoning model (a Hugging Face checkpoint shipped as
    package data).

    Args:
      variant: "base" (trained on `gkv_jax.synthetic` by scripts/train_reasoner.py) or
        "distilled" (the base model distilled for gkv at budget 68 by
        scripts/post_train_reasoner.sh).
    """
    if variant not in BUNDLED_VARIANTS:
        raise ValueError(f"variant must be one of {sorted(BUNDLED_VARIANTS)}, got {variant!r}")
    directory = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets",
                             BUNDLED_VARIANTS[variant])
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise FileNotFoundError(
            f"the bundled model is missing from {directory!r}; reinstall the package or train "
            "it with scripts/train_reasoner.sh (base) or scripts/post_train_reasoner.sh")
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


def load(source: str | os.PathLike, dtype: Any = jnp.bfloat16) -> tuple[Transformer, Any]:
    """Loads `(model, tokenizer)` from a Hugging Face checkpoint.

    Args:
      source: a local directory with `config.json`, `*.safetensors` and tokenizer files, or a
        hub id such as "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B" (downloaded with
        `huggingface_hub` only in that case).
      dtype: parameter dtype (jnp dtype or "float32" / "bfloat16" / "float16").

    Returns:
      The NNX `Transformer` and the tokenizer (None if the directory has no tokenizer files).
    """
    directory = resolve_source(source)
    return from_hf(directory, dtype=dtype), load_tokenizer(directory)
