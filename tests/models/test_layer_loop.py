"""The cached forward over per-layer weights (`unstack_layers`, the CPU decode path) equals
the layer scan over stacked weights, and the CPU decode program reads no weight slice."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gkv_jax.cache import init_cache
from gkv_jax.decode import decode_params, generate_tokens
from gkv_jax.eviction import EvictionConfig
from gkv_jax.models import ModelConfig, Transformer
from gkv_jax.models.transformer import forward_cached, unstack_layers
from gkv_jax.sampling import SamplingParams

CONFIG = ModelConfig(family="qwen2", vocab_size=64, hidden_size=32, intermediate_size=48,
                     num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True,
                     max_position_embeddings=64)


def test_per_layer_weights_give_the_scans_hidden_states_and_cache():
    params = Transformer(CONFIG, rngs=nnx.Rngs(0)).params()
    split = unstack_layers(params)
    assert len(split["layers"]) == 3 and split["embedding"] is params["embedding"]
    np.testing.assert_array_equal(split["layers"][2]["q_proj"], params["layers"]["q_proj"][2])
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 5)), jnp.int32)
    positions = jnp.asarray([[-1, 0, 1, 2, 3], [0, 1, 2, 3, 4]], jnp.int32)
    cache = init_cache(CONFIG, 2, 8, window=2)
    forward = jax.jit(forward_cached, static_argnums=0)  # eager dispatch is slower
    outputs = [forward(CONFIG, p, tokens, positions, cache) for p in (params, split)]
    (scan_hidden, scan_cache), (loop_hidden, loop_cache) = outputs
    np.testing.assert_allclose(loop_hidden, scan_hidden, rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.tree.leaves(loop_cache), jax.tree.leaves(scan_cache), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_the_cpu_decode_loop_copies_no_weight():
    """XLA:CPU copies a slice of a stacked weight before its product: the decode loop must
    read per-layer arrays (`decode_params`), so no [D, F] / [F, D] weight is copied in it."""
    assert isinstance(decode_params(Transformer(CONFIG, rngs=nnx.Rngs(0)).params())["layers"],
                      tuple)
    params = Transformer(CONFIG, rngs=nnx.Rngs(0)).params()
    tokens = jnp.zeros((1, 4), jnp.int32)
    positions = jnp.arange(4, dtype=jnp.int32)[None]
    text = jax.jit(generate_tokens, static_argnums=(0, 1, 2)).lower(
        CONFIG, EvictionConfig(policy="full"), 8, params, tokens, positions,
        SamplingParams.create(), jnp.zeros((1,), jnp.int32),
        jnp.zeros((0,), jnp.int32)).compile().as_text()
    mlp = ("f32[32,48]{", "f32[48,32]{")
    copies = [line for line in text.splitlines() if "slice" in line and "fusion(" in line
              and any(s in line for s in mlp)]
    # The prefill's layer scan (one forward per call) still slices its stacked weights: the
    # check sees such copies. The decode steps (under the cycle's `cond`) have none.
    assert any('op_name="jit(generate_tokens)/while/body/' in line for line in copies)
    assert [line for line in copies if "cond/" in line] == []
