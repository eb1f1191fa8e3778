"""The Hugging Face <-> Flax weight table for the Qwen2 / Llama / Qwen3 families, shared by
loading (`hf`) and export (`export`).

One table (`LAYER_RULES`, `GLOBAL_RULES`) says how each HF tensor maps to a stacked model
weight: its HF name, its HF shape, and the layout change each way. Also here: the checkpoint's
file and key names, and `ConversionError`, raised wherever a checkpoint does not match.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import numpy as np

from gkv_jax.models.config import ModelConfig

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


def _rules_by_key(config: ModelConfig) -> dict[str, tuple[Rule, int | None]]:
    """Every HF key of `config`'s checkpoint -> (its rule, its layer or None)."""
    table: dict[str, tuple[Rule, int | None]] = {
        r.hf_suffix: (r, None) for r in GLOBAL_RULES if r.when(config)}
    for i in range(config.num_layers):
        for r in LAYER_RULES:
            if r.when(config):
                table[f"model.layers.{i}.{r.hf_suffix}"] = (r, i)
    return table
