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


def swiglu(x: Array, gate: Array, up: Array, down: Array) -> Array:
    """down(silu(x @ gate) * (x @ up)); gate/up [D, F], down [F, D]."""
    hidden = jax.nn.silu(x @ gate) * (x @ up)
    return hidden @ down
