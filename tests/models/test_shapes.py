"""Real checkpoints' shapes without weights: `jax.eval_shape` of presets (no memory used)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gkv_jax.models import PRESETS, Transformer, forward, param_shapes, preset

# Parameter counts published on the checkpoints' Hugging Face pages, in billions, rounded to
# the two decimals shown there.
PUBLISHED = {
    "deepseek-r1-distill-qwen-1.5b": 1.78,
    "deepseek-r1-distill-qwen-7b": 7.62,
    "deepseek-r1-distill-llama-8b": 8.03,
    "qwen3-8b": 8.19,
}


def _abstract_params(name: str, dtype=jnp.bfloat16):
    config = preset(name)
    model = nnx.eval_shape(lambda: Transformer(config, dtype=dtype, rngs=nnx.Rngs(0)))
    return config, model, jax.tree.leaves(nnx.state(model, nnx.Param))


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_count_matches_published(name):
    config, _, leaves = _abstract_params(name)
    counted = sum(int(np.prod(x.shape)) for x in leaves)
    assert counted == config.num_parameters()
    assert round(counted / 1e9, 2) == PUBLISHED[name]
    if name == "deepseek-r1-distill-qwen-7b":
        assert abs(counted - 7.62e9) / 7.62e9 < 1e-3


def test_7b_preset_shapes_and_forward_shape():
    config, model, leaves = _abstract_params("deepseek-r1-distill-qwen-7b")
    assert all(x.dtype == jnp.bfloat16 for x in leaves)
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.bfloat16), param_shapes(config),
                          is_leaf=lambda x: isinstance(x, tuple))
    assert params["layers"]["q_proj"].shape == (28, 3584, 28, 128)
    assert params["layers"]["k_proj"].shape == (28, 3584, 4, 128)
    assert params["layers"]["o_proj"].shape == (28, 28, 128, 3584)
    assert params["layers"]["down_proj"].shape == (28, 18944, 3584)
    assert params["lm_head"].shape == (3584, 152064)
    tokens = jax.ShapeDtypeStruct((2, 16), jnp.int32)
    logits = jax.eval_shape(functools.partial(forward, config), params, tokens)
    assert logits.shape == (2, 16, 152064) and logits.dtype == jnp.float32


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match="known presets"):
        preset("gpt-5")
    assert set(PRESETS) == set(PUBLISHED)
