"""The shared decoder-only transformer of the Qwen2 / Llama / Qwen3 families, in Flax NNX.

Layer weights are stacked along a leading L axis and the layers run under `lax.scan`, so
compile time does not grow with depth. The math lives in pure functions over a plain dict of
arrays (`forward`, `forward_cached`); `Transformer` is the NNX module that owns the weights and
calls them. Weight layouts keep heads as their own axis (`q_proj: [L, D, N, H]`), which is what
a `model`-axis sharding splits.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from gkv_jax.cache import KVCache
from gkv_jax.models import layers, masked_attention
from gkv_jax.models.config import ModelConfig
from gkv_jax.models.masked_attention import SegmentLayout

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(dtype: Any) -> jnp.dtype:
    """A supported parameter dtype from a jnp dtype or its name."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        return jnp.dtype(DTYPES[dtype])
    try:
        resolved = jnp.dtype(dtype)
    except TypeError as err:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}") from err
    if resolved.name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {resolved.name!r}")
    return resolved


def layer_param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the stacked per-layer weights (leading axis L), by name."""
    L, D, F = config.num_layers, config.hidden_size, config.intermediate_size
    N, K, H = config.num_heads, config.num_kv_heads, config.head_dim
    shapes = {
        "attn_norm": (L, D),
        "q_proj": (L, D, N, H),
        "k_proj": (L, D, K, H),
        "v_proj": (L, D, K, H),
        "o_proj": (L, N, H, D),
        "mlp_norm": (L, D),
        "gate_proj": (L, D, F),
        "up_proj": (L, D, F),
        "down_proj": (L, F, D),
    }
    if config.qkv_bias:
        shapes.update(q_bias=(L, N, H), k_bias=(L, K, H), v_bias=(L, K, H))
    if config.qk_norm:
        shapes.update(q_norm=(L, H), k_norm=(L, H))
    return shapes


def param_shapes(config: ModelConfig) -> dict[str, Any]:
    """Shapes of every weight: {"embedding", "final_norm", ["lm_head"], "layers": {...}}."""
    shapes: dict[str, Any] = {
        "embedding": (config.vocab_size, config.hidden_size),
        "final_norm": (config.hidden_size,),
        "layers": layer_param_shapes(config),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head"] = (config.hidden_size, config.vocab_size)
    return shapes


_NORM_NAMES = ("attn_norm", "mlp_norm", "q_norm", "k_norm", "final_norm")
_BIAS_NAMES = ("q_bias", "k_bias", "v_bias")


def _init_weight(name: str, shape: tuple[int, ...], dtype, key) -> Array:
    if name in _NORM_NAMES:
        return jnp.ones(shape, dtype)
    if name in _BIAS_NAMES:
        return jnp.zeros(shape, dtype)
    return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


class LayerStack(nnx.Module):
    """All decoder layers' weights, stacked along a leading L axis (see `layer_param_shapes`)."""

    def __init__(self, config: ModelConfig, dtype, rngs: nnx.Rngs):
        for name, shape in layer_param_shapes(config).items():
            setattr(self, name, nnx.Param(_init_weight(name, shape, dtype, rngs.params())))


class Transformer(nnx.Module):
    """A Qwen2 / Llama / Qwen3 causal LM.

    `model(input_ids)` is the full causal forward, float32 logits [B, T, V].
    `model(tokens, positions, cache)` is the cached forward and returns `(logits, cache)`.
    `model(tokens, positions, visible_until=...)` is the full forward under per-key expiry
    (`forward_visible`), float32 logits [B, T, V].

    Args:
      config: the architecture.
      dtype: parameter (and activation) dtype, e.g. jnp.bfloat16 or "float32".
      rngs: initialisation randomness (weights ~ N(0, 0.02), norms 1, biases 0).
    """

    def __init__(self, config: ModelConfig, *, dtype: Any = jnp.float32,
                 rngs: nnx.Rngs | None = None):
        dtype = resolve_dtype(dtype)
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = config
        self.dtype = dtype
        shapes = param_shapes(config)
        self.embedding = nnx.Param(
            _init_weight("embedding", shapes["embedding"], dtype, rngs.params()))
        self.final_norm = nnx.Param(
            _init_weight("final_norm", shapes["final_norm"], dtype, rngs.params()))
        if "lm_head" in shapes:
            self.lm_head = nnx.Param(
                _init_weight("lm_head", shapes["lm_head"], dtype, rngs.params()))
        self.layers = LayerStack(config, dtype, rngs)

    def params(self) -> dict[str, Any]:
        """The weights as a plain nested dict of arrays (the input of the pure functions)."""
        out = {"embedding": self.embedding[...], "final_norm": self.final_norm[...],
               "layers": {name: getattr(self.layers, name)[...]
                          for name in layer_param_shapes(self.config)}}
        if not self.config.tie_word_embeddings:
            out["lm_head"] = self.lm_head[...]
        return out

    def __call__(self, tokens: Int[Array, "B T"], positions: Int[Array, "B T"] | None = None,
                 cache: KVCache | None = None, *, attention_mask: Array | None = None,
                 kv_mask: Array | None = None, visible_until: Array | None = None,
                 attention_impl: str = "dense", segments: SegmentLayout | None = None):
        params = self.params()
        if cache is None and visible_until is not None:
            if positions is None:
                raise ValueError("positions are required with visible_until (true token "
                                 "positions, -1 for pads)")
            hidden, _ = forward_visible(self.config, params, jnp.asarray(tokens, jnp.int32),
                                        jnp.asarray(positions, jnp.int32),
                                        jnp.asarray(visible_until, jnp.int32),
                                        attention_impl=attention_impl, segments=segments)
            return lm_logits(self.config, params, hidden)
        if cache is None:
            return forward(self.config, params, tokens, positions, attention_mask=attention_mask,
                           kv_mask=kv_mask)
        if positions is None:
            raise ValueError("positions are required with a cache (true token positions, "
                             "-1 for pads)")
        if attention_mask is not None:
            positions = jnp.where(attention_mask.astype(bool), positions, -1)
        hidden, cache = forward_cached(self.config, params, tokens, positions, cache)
        return lm_logits(self.config, params, hidden), cache


# ------------------------------------------------------------------------ pure functions
def embed(params: dict[str, Any], tokens: Int[Array, "B T"]) -> Array:
    return jnp.take(params["embedding"], tokens, axis=0)


def lm_logits(config: ModelConfig, params: dict[str, Any],
              hidden: Float[Array, "B T D"]) -> Float[Array, "B T V"]:
    """Final RMSNorm and the LM head (the embedding matrix if tied), float32 logits."""
    normed = layers.rms_norm(hidden, params["final_norm"], config.rms_norm_eps)
    if config.tie_word_embeddings:
        return jnp.einsum("btd,vd->btv", normed, params["embedding"],
                          preferred_element_type=jnp.float32)
    return jnp.einsum("btd,dv->btv", normed, params["lm_head"],
                      preferred_element_type=jnp.float32)


def positions_from_mask(attention_mask: Array) -> Int[Array, "B T"]:
    """True positions of a (left-)padded batch: 0.. over real tokens, -1 on pads."""
    mask = attention_mask.astype(jnp.int32)
    return jnp.where(mask > 0, jnp.cumsum(mask, axis=-1) - 1, -1)


def _project_qkv(config: ModelConfig, p: dict[str, Array], x: Array, positions: Array):
    """Queries [B, T, N, H] and keys/values [B, T, K, H] of one layer, post-RoPE."""
    q = jnp.einsum("btd,dnh->btnh", x, p["q_proj"])
    k = jnp.einsum("btd,dkh->btkh", x, p["k_proj"])
    v = jnp.einsum("btd,dkh->btkh", x, p["v_proj"])
    if config.qkv_bias:
        q, k, v = q + p["q_bias"], k + p["k_bias"], v + p["v_bias"]
    if config.qk_norm:
        q = layers.rms_norm(q, p["q_norm"], config.rms_norm_eps)
        k = layers.rms_norm(k, p["k_norm"], config.rms_norm_eps)
    inv_freq = layers.rope_inverse_frequencies(config)
    return layers.apply_rope(q, positions, inv_freq), layers.apply_rope(k, positions, inv_freq), v


def _residual_mlp(config: ModelConfig, p: dict[str, Array], x: Array) -> Array:
    h = layers.rms_norm(x, p["mlp_norm"], config.rms_norm_eps)
    return x + layers.swiglu(h, p["gate_proj"], p["up_proj"], p["down_proj"])


def _attention_output(p: dict[str, Array], attended: Array) -> Array:
    return jnp.einsum("btnh,nhd->btd", attended, p["o_proj"])


def _decoder_layers(config: ModelConfig, params: dict[str, Any], tokens: Int[Array, "B T"],
                    positions: Int[Array, "B T"], attend, per_layer=None):
    """The layer scan shared by the uncached forwards.

    `attend(queries [B, T, N, H], keys [B, K, T, H], values [B, K, T, H], per_layer_slice)`
    returns the attended values [B, T, N, H] and a per-layer output, stacked over layers.
    """

    def layer(x, xs):
        p, extra = xs
        h = layers.rms_norm(x, p["attn_norm"], config.rms_norm_eps)
        q, k, v = _project_qkv(config, p, h, positions)
        attended, out = attend(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), extra)
        x = x + _attention_output(p, attended)
        return _residual_mlp(config, p, x), out

    return jax.lax.scan(layer, embed(params, tokens), (params["layers"], per_layer))


def forward_hidden(config: ModelConfig, params: dict[str, Any], tokens: Int[Array, "B T"],
                   positions: Int[Array, "B T"], kv_mask: Bool[Array, "L B K T T"] | None = None
                   ) -> Float[Array, "B T D"]:
    """Full causal forward without a cache; returns the last hidden states (pre final norm).

    `kv_mask`, if given, further restricts which keys each query sees, per layer and KV head
    (True = visible). For masks of a generation under eviction prefer `forward_visible`,
    which takes one integer per key instead of a [T, T] mask.
    """
    key_positions = jnp.broadcast_to(positions[:, None, :],
                                     (tokens.shape[0], config.num_kv_heads, tokens.shape[1]))
    causal = layers.attention_mask(positions, key_positions)

    def attend(q, keys, values, layer_mask):
        mask = causal if layer_mask is None else causal & layer_mask
        return layers.grouped_attention(q, keys, values, mask), None

    hidden, _ = _decoder_layers(config, params, tokens, positions, attend, kv_mask)
    return hidden


ATTENTION_IMPLS = ("dense", "segments")


def forward_visible(config: ModelConfig, params: dict[str, Any], tokens: Int[Array, "B T"],
                    positions: Int[Array, "B T"],
                    visible_until: Int[Array, "L B K T"] | None = None, *,
                    visibility_fn=None, attention_impl: str = "dense",
                    segments: SegmentLayout | None = None
                    ) -> tuple[Float[Array, "B T D"], Int[Array, "L B K T"]]:
    """Full forward where each key expires: query q sees key j iff
    `pos_j >= 0 and pos_j <= pos_q < visible_until[l, b, k, j]` (true positions).

    The mask of layer l is built inside the layer scan from `visible_until[l]`; no
    [L, B, K, T, T] array exists. Give either `visible_until` or `visibility_fn(queries
    [B, T, N, H], keys [B, K, T, H], values [B, K, T, H]) -> [B, K, T] int32`, called per
    layer on that layer's post-RoPE projections (under `stop_gradient`) after the layers
    below ran under theirs: how a schedule is replayed from the pass's own queries and keys.

    Args:
      tokens: [B, T] int32; positions: [B, T] int32 true positions, -1 on pads.
      attention_impl: "dense" ([B, K, T, T] mask per layer; the reference) or "segments"
        (linear in T; needs `segments`, see `masked_attention.segment_attention`).

    Returns:
      hidden [B, T, D] (pre final norm) and the visible_until [L, B, K, T] used per layer.
    """
    if (visible_until is None) == (visibility_fn is None):
        raise ValueError("forward_visible: give exactly one of visible_until and visibility_fn")
    if attention_impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got "
                         f"{attention_impl!r}")
    if attention_impl == "segments" and segments is None:
        raise ValueError('attention_impl="segments" needs segments=SegmentLayout(...)')
    B, T = tokens.shape
    if visible_until is not None:
        expected = (config.num_layers, B, config.num_kv_heads, T)
        if tuple(visible_until.shape) != expected:
            raise ValueError(f"visible_until must have shape [L, B, K, T] = {list(expected)}, "
                             f"got {list(visible_until.shape)}")

    def attend(q, keys, values, until):
        if until is None:
            until = jax.lax.stop_gradient(visibility_fn(q, keys, values))
        until = until.astype(jnp.int32)
        if attention_impl == "segments":
            out = masked_attention.segment_attention(q, keys, values, positions, until,
                                                     segments)
        else:
            out = masked_attention.dense_visible_attention(q, keys, values, positions, until)
        return out, until

    return _decoder_layers(config, params, tokens, positions, attend, visible_until)


def forward(config: ModelConfig, params: dict[str, Any], tokens: Int[Array, "B T"],
            positions: Int[Array, "B T"] | None = None, *,
            attention_mask: Array | None = None,
            kv_mask: Bool[Array, "L B K T T"] | None = None) -> Float[Array, "B T V"]:
    """Full causal forward: float32 logits [B, T, V].

    Args:
      tokens: [B, T] int32 ids.
      positions: [B, T] int32 true positions (-1 = pad); default 0..T-1, or derived from
        `attention_mask` (1 = real token, 0 = pad; left padding).
      kv_mask: optional [L, B, K, T, T] bool, per layer and KV head, which keys (last axis)
        each query may see on top of causality (e.g. the tokens it attended to during a
        generation with eviction).
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    if positions is None:
        if attention_mask is not None:
            positions = positions_from_mask(jnp.asarray(attention_mask))
        else:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32),
                                         tokens.shape)
    elif attention_mask is not None:
        positions = jnp.where(jnp.asarray(attention_mask).astype(bool), positions, -1)
    hidden = forward_hidden(config, params, tokens, jnp.asarray(positions, jnp.int32),
                            kv_mask)
    return lm_logits(config, params, hidden)


def unstack_layers(params: dict[str, Any]) -> dict[str, Any]:
    """`params` with the stacked layer weights ([L, ...] each) split into a tuple of L
    per-layer dicts, which `forward_cached` runs as an unrolled layer loop.

    Why: XLA:CPU copies every slice of a stacked weight before its matrix product (a dynamic
    slice inside the layer scan, or a static one), so a decode step read each weight about
    three times; from separate per-layer arrays it reads each once (measured in
    docs/results/decode-speed.md, "First part: the stacked weights"). Inside a jitted
    program the split copies the weights once per call, not once per step.
    """
    stacked = params["layers"]
    num_layers = next(iter(stacked.values())).shape[0]
    layers = tuple({name: weight[i] for name, weight in stacked.items()}
                   for i in range(num_layers))
    return {**params, "layers": layers}


def write_slots(buffer: Array, layer: Array, slots: Int[Array, "B T"],
                new: Array) -> Array:
    """Writes `new` [B, T, K, ...] into `buffer` [L, B, K, C, ...] at (layer, b, :, slots[b, t])."""
    batch = jnp.arange(slots.shape[0])[:, None]
    return buffer.at[layer, batch, :, slots].set(new.astype(buffer.dtype), mode="drop")


def write_all_layers(buffer: Array, slots: Int[Array, "B T"], new: Array) -> Array:
    """Writes `new` [L, B, T, K, ...] into `buffer` [L, B, K, C, ...] at slots[b, t]."""
    # Indexing every layer, the advanced (batch, slots) axes come first: [B, T, L, K, ...].
    return write_slots(buffer, slice(None), slots, jnp.moveaxis(new, 0, 2))


def forward_cached(config: ModelConfig, params: dict[str, Any], tokens: Int[Array, "B T"],
                   positions: Int[Array, "B T"], cache: KVCache,
                   attention_block: int | None = None
                   ) -> tuple[Float[Array, "B T D"], KVCache]:
    """Cached forward: appends T tokens per sequence at slot `cache.lengths[b]` and attends
    over every filled slot whose position is not in the future.

    Positions are the tokens' true positions; a token with position -1 (a pad, or a finished
    sequence) is written as an empty slot that nothing attends to. `lengths` advances by T
    for every sequence; the caller must leave room (`lengths + T <= capacity`). The query
    window ring takes the newest W queries of every layer.

    `params["layers"]` may also be a tuple of per-layer dicts (`unstack_layers`): the layers
    then run as an unrolled Python loop instead of a scan.

    `attention_block` (static): None attends over all C slots at once; an integer reads
    only the slots in use (below `max(lengths) + T`) in blocks of that many
    (`layers.live_block_attention`), so a growing full cache costs what it holds.

    Returns:
      hidden: [B, T, D] last hidden states (apply `lm_logits`).
      cache: the updated cache (`global_score` untouched).
    """
    if attention_block is not None and (isinstance(attention_block, bool)
                                        or not isinstance(attention_block, int)
                                        or attention_block < 1):
        raise ValueError(f"attention_block must be None or an integer >= 1, got "
                         f"{attention_block!r}")
    tokens = jnp.asarray(tokens, jnp.int32)
    positions = jnp.asarray(positions, jnp.int32)
    T = tokens.shape[1]
    W = cache.window
    slots = cache.lengths[:, None] + jnp.arange(T, dtype=jnp.int32)  # [B, T]
    slot_positions = jnp.broadcast_to(positions[:, :, None],
                                      (*positions.shape, config.num_kv_heads))
    live_slots = jnp.max(cache.lengths) + T  # slots at and past it are empty in every row
    # Every layer's positions at once, before any read: a per-layer write that no read
    # depends on made XLA copy the whole buffer to order it after the previous reads.
    cache_positions = write_all_layers(cache.positions, slots, jnp.broadcast_to(
        slot_positions, (config.num_layers, *slot_positions.shape)))

    def layer(carry, xs):
        x, keys, values, cache_positions, query_window = carry
        p, index = xs
        h = layers.rms_norm(x, p["attn_norm"], config.rms_norm_eps)
        q, k, v = _project_qkv(config, p, h, positions)
        keys = write_slots(keys, index, slots, k)
        values = write_slots(values, index, slots, v)
        if attention_block is None:
            mask = layers.attention_mask(positions, cache_positions[index])
            attended = layers.grouped_attention(q, keys[index], values[index], mask)
        else:
            attended = layers.live_block_attention(q, keys, values, positions,
                                                   cache_positions, index, live_slots,
                                                   attention_block)
        x = x + _attention_output(p, attended)
        if W:
            recent = jnp.concatenate(
                [query_window[index], q.transpose(0, 2, 1, 3).astype(query_window.dtype)],
                axis=2)[:, :, -W:]
            query_window = query_window.at[index].set(recent)
        return (_residual_mlp(config, p, x), keys, values, cache_positions, query_window), None

    carry = (embed(params, tokens), cache.keys, cache.values, cache_positions,
             cache.query_window)
    if isinstance(params["layers"], list | tuple):  # one weight dict per layer
        for index, p in enumerate(params["layers"]):
            carry, _ = layer(carry, (p, index))
        hidden, keys, values, cache_positions, query_window = carry
    else:
        xs = (params["layers"], jnp.arange(config.num_layers))
        (hidden, keys, values, cache_positions, query_window), _ = jax.lax.scan(
            layer, carry, xs)
    new_cache = cache.replace(keys=keys, values=values, positions=cache_positions,
                              query_window=query_window, lengths=cache.lengths + T)
    return hidden, new_cache
