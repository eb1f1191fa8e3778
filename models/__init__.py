"""Flax NNX reasoning models: Qwen2, Llama and Qwen3 on one shared transformer."""

from gkv_jax.models.config import PRESETS, Llama3RopeScaling, ModelConfig, preset
from gkv_jax.models.masked_attention import SegmentLayout
from gkv_jax.models.transformer import (
    Transformer,
    forward,
    forward_cached,
    forward_hidden,
    forward_visible,
    lm_logits,
    param_shapes,
    positions_from_mask,
    resolve_dtype,
)

__all__ = [
    "PRESETS",
    "SegmentLayout",
    "Llama3RopeScaling",
    "ModelConfig",
    "Transformer",
    "forward",
    "forward_cached",
    "forward_hidden",
    "forward_visible",
    "lm_logits",
    "param_shapes",
    "positions_from_mask",
    "preset",
    "resolve_dtype",
]
