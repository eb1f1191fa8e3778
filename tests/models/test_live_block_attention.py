"""A growing full cache attends over its live slots only (`layers.live_block_attention`): the
same attention, logits and greedy tokens as attending over the whole static buffer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gkv_jax import decode
from gkv_jax.cache import init_cache
from gkv_jax.decode import generate_tokens, live_attention_block
from gkv_jax.eviction import EvictionConfig
from gkv_jax.models import ModelConfig, Transformer, layers
from gkv_jax.models.transformer import forward_cached
from gkv_jax.sampling import SamplingParams

CONFIG = ModelConfig(family="qwen2", vocab_size=64, hidden_size=32, intermediate_size=48,
                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True,
                     max_position_embeddings=512)


def ragged_cache_attention_inputs(seed: int, B=3, T=2, N=4, K=2, C=37, H=8):
    """Queries and a 2-layer cache whose rows hold none, some and all of the first `live`
    slots (pads and holes included), every slot from `live` on empty."""
    rng = np.random.default_rng(seed)
    queries = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)
    keys = jnp.asarray(rng.normal(size=(2, B, K, C, H)), jnp.float32)
    values = jnp.asarray(rng.normal(size=(2, B, K, C, H)), jnp.float32)
    live = C - 6
    slot_positions = np.where(np.arange(C) < live, np.arange(C), -1)
    key_positions = np.broadcast_to(slot_positions, (2, B, K, C)).copy()
    key_positions[:, 0] = -1  # an empty row
    key_positions[:, 1, :, 3:9] = -1  # pads / holes
    query_positions = np.array([[live, live + 1], [20, 21], [-1, live]])  # a pad query
    return dict(queries=queries, keys=keys, values=values,
                query_positions=jnp.asarray(query_positions, jnp.int32),
                key_positions=jnp.asarray(key_positions, jnp.int32), live=live)


def live_attention(inputs, layer, live, block, **changes):
    x = {**inputs, **changes}
    return jax.jit(layers.live_block_attention, static_argnums=7)(
        x["queries"], x["keys"], x["values"], x["query_positions"], x["key_positions"],
        layer, jnp.int32(live), block)


@pytest.mark.parametrize("block", [1, 8, 31, 64])
def test_live_blocks_equal_attention_over_every_slot(block):
    inputs = ragged_cache_attention_inputs(0)
    mask = layers.attention_mask(inputs["query_positions"], inputs["key_positions"][1])
    expected = layers.grouped_attention(inputs["queries"], inputs["keys"][1],
                                        inputs["values"][1], mask)
    got = live_attention(inputs, 1, inputs["live"], block)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[2, 0], 0.0)  # the pad query sees nothing
    np.testing.assert_array_equal(got[0], 0.0)  # nor does any query of an empty row


def test_live_blocks_skip_the_empty_tail_entirely():
    """What lies past `live_slots` is never read: garbage there changes nothing."""
    inputs = ragged_cache_attention_inputs(1)
    live = inputs["live"]
    clean = live_attention(inputs, 1, live, 8)
    dirty = live_attention(  # visible if read; live + 1 rounds up to 32 slots read
        inputs, 1, live + 1, 8, values=inputs["values"].at[1, :, :, live:].set(1e6),
        key_positions=inputs["key_positions"].at[1, :, :, live + 2:].set(0))
    np.testing.assert_array_equal(clean, dirty)


def test_the_cached_forward_with_live_blocks_equals_the_dense_one():
    params = Transformer(CONFIG, rngs=nnx.Rngs(0)).params()
    cache = init_cache(CONFIG, 2, 40)
    prompt = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 9)), jnp.int32)
    prompt_positions = jnp.asarray([[-1, -1, 0, 1, 2, 3, 4, 5, 6], list(range(9))], jnp.int32)
    forward = jax.jit(forward_cached, static_argnums=(0, 5))
    _, cache = forward(CONFIG, params, prompt, prompt_positions, cache, None)
    token = jnp.asarray([[5], [7]], jnp.int32)
    positions = jnp.asarray([[7], [9]], jnp.int32)
    dense_hidden, dense_cache = forward(CONFIG, params, token, positions, cache, None)
    for block in (4, 16):
        hidden, new_cache = forward(CONFIG, params, token, positions, cache, block)
        np.testing.assert_allclose(hidden, dense_hidden, rtol=1e-5, atol=1e-5)
        # Layer 1's keys come from layer 0's output: equal up to float rounding.
        for a, b in zip(jax.tree.leaves(new_cache), jax.tree.leaves(dense_cache), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("block", [0, -3, 2.5, True, "16"])
def test_a_bad_attention_block_is_refused_naming_it(block):
    params = Transformer(CONFIG, rngs=nnx.Rngs(0)).params()
    with pytest.raises(ValueError, match="attention_block must be None or an integer >= 1"):
        forward_cached(CONFIG, params, jnp.zeros((1, 1), jnp.int32),
                       jnp.zeros((1, 1), jnp.int32), init_cache(CONFIG, 1, 8), block)


def test_the_block_is_chosen_for_growing_full_caches_only():
    full, gkv = EvictionConfig(policy="full"), EvictionConfig(policy="gkv", budget=2048)
    assert live_attention_block(full, 1024) == 1024  # small: one pass over the buffer
    assert live_attention_block(full, 1025) == 512
    assert live_attention_block(full, 4159) == 512
    assert live_attention_block(full, 16447) == 1536  # 16447 / 16 = 1028, in 512s
    assert live_attention_block(gkv, 2176) == 2176  # an evicting buffer is always full


@pytest.mark.parametrize("policy", ["full", "gkv"])
def test_generation_is_unchanged_by_live_blocks(monkeypatch, policy):
    """Greedy tokens, log-probs and kept positions over 150 tokens with the decode steps'
    attention as before (all C slots, `grouped_attention`) and as now: `full` in live
    blocks of 16 slots (a 166-slot buffer: from 2 blocks at the start to 11 at the end),
    gkv in one pass over its 48-slot buffer."""
    params = Transformer(CONFIG, rngs=nnx.Rngs(1)).params()
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 17)), jnp.int32)
    positions = jnp.asarray([[-1] * 5 + list(range(12)), list(range(17))], jnp.int32)
    args = (params, tokens, positions, SamplingParams.create(), jnp.zeros((2,), jnp.int32),
            jnp.zeros((0,), jnp.int32))
    eviction = (EvictionConfig(policy="full", divide_length=16) if policy == "full" else
                EvictionConfig(policy="gkv", divide_length=16, budget=32, window=8))
    chosen = live_attention_block
    monkeypatch.setattr(decode, "MIN_LIVE_BLOCK", 16)
    monkeypatch.setattr(decode, "MAX_LIVE_BLOCKS", 100)
    assert chosen(eviction, 166) == (16 if policy == "full" else 166)
    results = {}
    for name, choose in {"before": lambda *_: None, "now": chosen}.items():
        monkeypatch.setattr(decode, "live_attention_block", choose)
        outputs, state = jax.jit(generate_tokens, static_argnums=(0, 1, 2))(
            CONFIG, eviction, 150, *args)
        results[name] = outputs, state.cache.positions
    (before, kept_before), (now, kept_now) = results["before"], results["now"]
    np.testing.assert_array_equal(now.tokens, before.tokens)
    np.testing.assert_allclose(now.log_probs, before.log_probs, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(kept_now, kept_before)
    assert int(now.compressions) == int(before.compressions)


def cache_buffer_copies(attention_block, capacity: int = 88) -> dict[str, int]:
    """Copies of a whole cache buffer, and of one layer of one, inside a compiled scan of gkv
    decode steps (the entry computation's copies of the arguments are not counted)."""
    params = decode.decode_params(Transformer(CONFIG, rngs=nnx.Rngs(0)).params())
    cache = init_cache(CONFIG, 2, capacity, window=8)
    state = decode.initial_state(cache.replace(lengths=jnp.full((2,), capacity - 8)),
                                 jnp.zeros((2,), jnp.int32),
                                 jnp.full((2,), capacity - 8, jnp.int32))

    def steps(params, state):
        def body(state, _):
            state, out = decode.decode_step(CONFIG, params, state, SamplingParams.create(),
                                            jnp.zeros((0,), jnp.int32), attention_block)
            return state, out.tokens
        return jax.lax.scan(body, state, None, length=4)

    text = jax.jit(steps).lower(params, state).compile().as_text()
    shapes = {"whole": (f"[2,2,2,{capacity},8]{{", f"[2,2,2,{capacity}]{{"),
              "layer": (f"[2,2,{capacity},8]{{", f"[2,2,{capacity}]{{")}
    computation, copies = None, {"whole": 0, "layer": 0}
    for line in text.splitlines():
        if line and not line.startswith(" "):
            computation = line.split()[0]
        if computation == "ENTRY" or " = " not in line:
            continue
        result, op = line.split(" = ", 1)[1].split(" ", 1)
        if op.startswith("copy(") or ("slice" in line and "fusion(" in op):
            for kind, kind_shapes in shapes.items():
                copies[kind] += any(s in result for s in kind_shapes)
    return copies


def test_the_decode_step_copies_no_whole_cache_buffer():
    """With each layer's positions written inside the layer loop, where no read of the
    previous layer waited for the write, XLA:CPU copied the whole positions buffer once per
    layer and step; every layer's positions are now written before any read. What is left:
    one layer's keys and values are copied before their product (XLA:CPU does not read a
    slice in place), 2 per layer, which also shows that the check sees copies."""
    assert cache_buffer_copies(88) == {"whole": 0, "layer": 2 * CONFIG.num_layers}
