"""`token_log_probs`: teacher-forced log-probabilities of a batch's targets under its masks.

The forward is `models.forward_visible` (the mask of each layer built inside the layer
scan from `batch.visible_until`); the LM head runs over chunks of rows, each chunk
rematerialised in the backward pass, so no [B, T, V] float32 array ever exists.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from gkv_jax.models.config import ModelConfig
from gkv_jax.models.transformer import forward_hidden, forward_visible, lm_logits
from gkv_jax.sampling import SamplingParams, sampling_log_probs
from gkv_jax.training.batch import TeacherForcedBatch

DEFAULT_CHUNK_ROWS = 512
ATTENTION_IMPLS = (None, "dense", "segments")


def resolve_attention_impl(batch: TeacherForcedBatch, attention_impl: str | None) -> str:
    """None (auto) is "segments" for masks of an evicting policy, else "dense"."""
    if attention_impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got "
                         f"{attention_impl!r}")
    if attention_impl == "segments" and batch.segment_layout is None:
        raise ValueError('attention_impl="segments" needs a batch with the masks of an '
                         "evicting policy (batch.eviction)")
    if attention_impl is None:
        return "segments" if batch.segment_layout is not None else "dense"
    return attention_impl


def response_hidden(config: ModelConfig, params: dict, batch: TeacherForcedBatch,
                    attention_impl: str = "dense") -> Float[Array, "B M D"]:
    """Hidden states (pre final norm) of the rows that predict the targets: slots
    width - 1 .. width + M - 2."""
    if batch.visible_until is None:
        hidden = forward_hidden(config, params, batch.tokens, batch.positions)
    else:
        segments = batch.segment_layout if attention_impl == "segments" else None
        hidden, _ = forward_visible(config, params, batch.tokens, batch.positions,
                                    batch.visible_until, attention_impl=attention_impl,
                                    segments=segments)
    M = batch.targets.shape[1]
    return hidden[:, batch.width - 1: batch.width - 1 + M]


def map_row_chunks(fn, rows: Array, *others: Array, chunk_rows: int) -> Array:
    """`fn(rows_chunk [R, D], *others_chunks [R, ...]) -> [R, ...]` (or a tuple of such)
    over chunks of `chunk_rows` rows of the flattened leading axes, each chunk under
    `jax.checkpoint`."""
    lead = rows.shape[:-1]
    count = math.prod(lead)
    flat = [x.reshape(count, *x.shape[len(lead):]) for x in (rows, *others)]
    chunks = max(1, -(-count // chunk_rows))
    size = min(chunk_rows, count)
    padded = [jnp.pad(x, [(0, chunks * size - count)] + [(0, 0)] * (x.ndim - 1))
              for x in flat]
    stacked = [x.reshape(chunks, size, *x.shape[1:]) for x in padded]
    out = jax.lax.map(lambda xs: jax.checkpoint(fn)(*xs), tuple(stacked))

    def unchunk(x):
        x = x.reshape(chunks * size, *x.shape[2:])[:count]
        return x.reshape(*lead, *x.shape[1:])

    return jax.tree.map(unchunk, out)


@functools.partial(jax.jit, static_argnames=("config", "attention_impl", "chunk_rows"))
def token_log_probs_from_params(config: ModelConfig, params: dict, batch: TeacherForcedBatch,
                                temperature: Array | float = 1.0,
                                sampling: SamplingParams | None = None, *,
                                attention_impl: str = "dense",
                                chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Float[Array, "B M"]:
    """`token_log_probs` on a plain parameter dict: jit-able and differentiable in `params`
    (config, attention_impl and chunk_rows static; temperature and sampling traced)."""
    hidden = response_hidden(config, params, batch, attention_impl)

    def chunk_log_probs(rows, targets):
        logits = lm_logits(config, params, rows[None])[0]
        if sampling is None:
            log_probs = jax.nn.log_softmax(logits / temperature, axis=-1)
        else:
            log_probs = sampling_log_probs(logits, sampling)
        return jnp.take_along_axis(log_probs, targets[:, None], axis=-1)[:, 0]

    log_probs = map_row_chunks(chunk_log_probs, hidden, batch.targets, chunk_rows=chunk_rows)
    return jnp.where(batch.loss_mask, log_probs, 0.0)


def _check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) \
            or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return float(temperature)


def token_log_probs(model, batch: TeacherForcedBatch, temperature: float = 1.0,
                    sampling: SamplingParams | dict | None = None, *,
                    attention_impl: str | None = None,
                    chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Float[Array, "B M"]:
    """Log-probabilities of `batch.targets` under the batch's masks: [B, M] float32, 0 where
    `batch.loss_mask` is False.

    Args:
      model: a `gkv_jax.Transformer` (or anything with `.config` and `.params()`).
      batch: a `TeacherForcedBatch`; `visible_until=None` means full attention.
      temperature: the logits are divided by it (> 0) before the log-softmax.
      sampling: instead of `temperature`, the sampler's distribution (a `SamplingParams` or
        a dict of `temperature`, `top_p`, `top_k`): temperature, top-k and nucleus
        filtering as `generate` samples, the plain softmax for temperature 0. Then the
        result equals `generate(..., return_logprobs=True).logprobs` for the same settings.
      attention_impl: "dense" (the [B, K, T, T] mask per layer), "segments" (linear in T,
        for masks of an evicting policy), or None: "segments" when the batch has such masks.
      chunk_rows: rows of the LM head computed at once ([chunk_rows, V] float32 logits).
    """
    if not isinstance(batch, TeacherForcedBatch):
        raise TypeError(f"batch must be a TeacherForcedBatch, got {type(batch)}")
    temperature = _check_temperature(temperature)
    if sampling is not None:
        if temperature != 1.0:
            raise ValueError("give either temperature or sampling, not both")
        if isinstance(sampling, dict):
            sampling = SamplingParams.create(**sampling)
        elif not isinstance(sampling, SamplingParams):
            raise TypeError(f"sampling must be a SamplingParams, a dict or None, got "
                            f"{type(sampling)}")
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be an integer >= 1, got {chunk_rows!r}")
    impl = resolve_attention_impl(batch, attention_impl)
    return token_log_probs_from_params(model.config, model.params(), batch,
                                       jnp.float32(temperature), sampling,
                                       attention_impl=impl, chunk_rows=chunk_rows)
