"""`gkv_jax.load`: the checkpoint's own dtype by default, integer weights refused, and no
transformers notice about a PyTorch the user never asked for."""

from __future__ import annotations

import json
import logging
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import gkv_jax
from gkv_jax.loading import TORCH_NOTICE, bundled_model_dir, checkpoint_dtype


def _checkpoint(tmp_path, config: dict | None, tensors: dict[str, np.ndarray] | None):
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config))
    if tensors is not None:
        save_file(tensors, str(tmp_path / "model.safetensors"))
    return str(tmp_path)


@pytest.mark.parametrize("config, tensors, expected", [
    ({"torch_dtype": "bfloat16"}, None, "bfloat16"),
    ({"dtype": "float16"}, None, "float16"),       # transformers >= 4.56 writes "dtype"
    ({"torch_dtype": "float64"}, None, "float32"),
    ({}, {"a": np.zeros((4, 4), np.float16), "b": np.zeros(2, np.float32)}, "float16"),
    ({"torch_dtype": {"odd": 1}}, {"a": np.zeros(3, np.float32)}, "float32"),
    (None, None, "float32"),
])
def test_checkpoint_dtype_reads_config_then_safetensors(tmp_path, config, tensors, expected):
    assert checkpoint_dtype(_checkpoint(tmp_path, config, tensors)) == expected


def test_load_keeps_the_checkpoint_dtype_unless_told(tmp_path):
    directory = tmp_path / "bf16"
    shutil.copytree(bundled_model_dir(), directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(config | {"torch_dtype": "bfloat16"}))
    model, tokenizer = gkv_jax.load(directory)
    assert model.dtype == jnp.bfloat16 and tokenizer is not None
    model, _ = gkv_jax.load(bundled_model_dir())  # stored as float32
    assert model.dtype == jnp.float32


def test_integer_weights_are_refused_naming_the_tensor(tmp_path):
    directory = tmp_path / "int_weights"
    shutil.copytree(bundled_model_dir(), directory)
    tensors = load_file(str(directory / "model.safetensors"))
    tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(np.int32)
    save_file(tensors, str(directory / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*int32.*floating"):
        gkv_jax.load(directory)


def test_transformers_torch_notice_is_filtered_and_nothing_else():
    import transformers  # noqa: F401  (its import is when the notice is logged)

    logger = logging.getLogger("transformers")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        logger.warning(TORCH_NOTICE + ". Models won't be available and only tokenizers, ...")
        logger.warning("tokenizer.json looks truncated")
    finally:
        logger.removeHandler(handler)
    assert seen == ["tokenizer.json looks truncated"]
