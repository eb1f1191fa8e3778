"""Hugging Face PyTorch/safetensors checkpoints to Flax and back; Orbax save/restore."""

from gkv_jax.conversion.checkpoint import load_checkpoint, save_checkpoint
from gkv_jax.conversion.export import hf_state_dict, to_hf
from gkv_jax.conversion.hf import convert_weights, from_hf, model_from_weights
from gkv_jax.conversion.rules import ConversionError

__all__ = [
    "ConversionError",
    "convert_weights",
    "from_hf",
    "hf_state_dict",
    "load_checkpoint",
    "model_from_weights",
    "save_checkpoint",
    "to_hf",
]
