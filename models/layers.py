"""Pure building blocks shared by every family: RMSNorm, RoPE, grouped-query attention, SwiGLU.

All functions are jit-able and take explicit arrays; norms, RoPE angles and the attention
softmax run in float32 whatever the parameter dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from gkv_jax.models.config import ModelConfig

# A finite stand-in for -inf in masked attention logits: exp() of it is exactly 0 and
# it never produces NaN in (masked - max) arithmetic.
MASKED_LOGIT = -1e30


def rms_norm(x: Float[Array, "... D"], weight: Float[Array, " D"], eps: float) -> Array:
    """RMSNorm as Hugging Face computes it: normalise in float32, cast, then scale."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


def rope_inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """[H/2] float32 inverse frequencies, with llama3 rescaling when configured.

    Computed on the host in float32 exactly as `transformers` does, so angles match bit for bit
    in the common cases.
    """
    dim = config.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / (np.float32(config.rope_theta) ** exponents)).astype(np.float32)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    old_context = scaling.original_max_position_embeddings
    low_freq_wavelen = old_context / scaling.low_freq_factor
    high_freq_wavelen = old_context / scaling.high_freq_factor
    wavelen = (2 * math.pi / inv_freq).astype(np.float32)
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_context / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def apply_rope(
    x: Float[Array, "B T heads H"], positions: Int[Array, "B T"], inv_freq: np.ndarray
) -> Array:
    """Rotates queries or keys by their true positions (half-split layout, as in HF)."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


def attention_mask(
    query_positions: Int[Array, "B T"], key_positions: Int[Array, "B K S"]
) -> Bool[Array, "B K T S"]:
    """Causal mask by true positions: a key is visible if it is filled and not in the future.

    Empty slots and pad tokens carry position -1 and are never visible; a pad query
    (position -1) sees nothing.
    """
    q = query_positions[:, None, :, None]
    k = key_positions[:, :, None, :]
    return (k >= 0) & (k <= q) & (q >= 0)


def grouped_attention(
    queries: Float[Array, "B T N H"],
    keys: Float[Array, "B K S H"],
    values: Float[Array, "B K S H"],
    mask: Bool[Array, "B K T S"],
) -> Float[Array, "B T N H"]:
    """Softmax attention where each KV head serves G = N / K consecutive query heads.

    Logits and softmax in float32; rows with no visible key (pad queries) output zeros.
    """
    B, T, N, H = queries.shape
    K = keys.shape[1]
    grouped = queries.reshape(B, T, K, N // K, H)
    logits = jnp.einsum("btkgh,bksh->bkgts", grouped, keys,
                        preferred_element_type=jnp.float32) / math.sqrt(H)
    visible = mask[:, :, None, :, :]
    logits = jnp.where(visible, logits, MASKED_LOGIT)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.where(visible, probs, 0.0)
    # Accumulates in float32 and rounds once to the activation dtype (which is what the
    # output is cast to anyway); XLA:CPU has no bf16 x bf16 -> f32 batched dot.
    out = jnp.einsum("bkgts,bksh->btkgh", probs.astype(values.dtype), values,
                     preferred_element_type=values.dtype)
    return out.reshape(B, T, N, H).astype(queries.dtype)


def _online_softmax_step(carry, grouped: Array, keys: Array, values: Array,
                         visible: Array, scale: float):
    """Folds one block of keys into the running (max, sum, weighted values) of a softmax.

    grouped [B, T, K, G, H]; keys, values [B, K, S, H]; visible [B, K, 1, T, S]; the carry
    is [B, K, G, T], [B, K, G, T], [B, K, G, T, H] in float32.
    """
    running_max, running_sum, weighted = carry
    logits = jnp.einsum("btkgh,bksh->bkgts", grouped, keys,
                        preferred_element_type=jnp.float32) * scale
    logits = jnp.where(visible, logits, MASKED_LOGIT)
    new_max = jnp.maximum(running_max, jnp.max(logits, axis=-1))
    decay = jnp.exp(running_max - new_max)
    probs = jnp.where(visible, jnp.exp(logits - new_max[..., None]), 0.0)
    running_sum = running_sum * decay + jnp.sum(probs, axis=-1)
    weighted = weighted * decay[..., None] + jnp.einsum(
        "bkgts,bksh->bkgth", probs.astype(values.dtype), values,
        preferred_element_type=jnp.float32)
    return new_max, running_sum, weighted


def live_block_attention(
    queries: Float[Array, "B T N H"],
    keys: Float[Array, "L B K C H"],
    values: Float[Array, "L B K C H"],
    query_positions: Int[Array, "B T"],
    key_positions: Int[Array, "L B K C"],
    layer: int | Int[Array, ""],
    live_slots: Int[Array, ""],
    block: int,
) -> Float[Array, "B T N H"]:
    """`grouped_attention` under the causal mask over the first `live_slots` slots of layer
    `layer` of the stacked cache buffers.

    Equal (up to float rounding) to attending over all C slots when the slots at and past
    `live_slots` are empty (position -1; e.g. the unfilled tail of a growing full cache):
    skipping them changes nothing but the cost, which follows the tokens actually cached
    instead of the buffer's capacity C. The live slots are read in blocks of `block`,
    folded into one online softmax (running max, sum and weighted values, in float32) by a
    loop of ceil(live_slots / block) trips. The last block is shifted back to end at C when
    C is not a multiple of `block`, its already-counted slots masked out. Blocks are sliced
    straight from the [L, ...] buffers: XLA:CPU copies a slice before reading it. With
    `block >= C` it is one pass over the whole buffer, without a loop.
    """
    B, T, N, H = queries.shape
    K, C = keys.shape[2], keys.shape[3]
    G = N // K
    block = min(block, C)
    grouped = queries.reshape(B, T, K, G, H)
    scale = 1.0 / math.sqrt(H)

    def one_block(index, carry):
        first = index * block
        start = jnp.minimum(first, C - block)
        corner = (layer, 0, 0, start)
        block_keys = jax.lax.dynamic_slice(keys, (*corner, 0), (1, B, K, block, H))[0]
        block_values = jax.lax.dynamic_slice(values, (*corner, 0), (1, B, K, block, H))[0]
        block_positions = jax.lax.dynamic_slice(key_positions, corner, (1, B, K, block))[0]
        fresh = start + jnp.arange(block) >= first  # not counted by an earlier block
        visible = (attention_mask(query_positions, block_positions)
                   & fresh)[:, :, None, :, :]  # [B, K, 1, T, block]
        return _online_softmax_step(carry, grouped, block_keys, block_values, visible, scale)

    init = (jnp.full((B, K, G, T), MASKED_LOGIT, jnp.float32),
            jnp.zeros((B, K, G, T), jnp.float32), jnp.zeros((B, K, G, T, H), jnp.float32))
    if block == C:  # one block: no loop (`live_slots` >= 1, the new tokens included)
        _, total, weighted = one_block(0, init)
    else:
        num_blocks = (jnp.minimum(live_slots, C) + block - 1) // block
        _, total, weighted = jax.lax.fori_loop(0, num_blocks, one_block, init)
    # Rows with no visible key (pad queries) output zeros, as in `grouped_attention`.
    out = jnp.where(total[..., None] > 0, weighted / jnp.maximum(total, 1e-30)[..., None], 0.0)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H).astype(queries.dtype)


def swiglu(x: Array, gate: Array, up: Array, down: Array) -> Array:
    """down(silu(x @ gate) * (x @ up)); gate/up [D, F], down [F, D]."""
    hidden = jax.nn.silu(x @ gate) * (x @ up)
    return hidden @ down
