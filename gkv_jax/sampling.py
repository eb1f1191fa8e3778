"""Token sampling: greedy, temperature, top-k and top-p, with every knob a traced value.

Changing temperature, top-p or top-k therefore never recompiles a decode loop; greedy
decoding (temperature == 0) skips the vocabulary sort through `lax.cond`.
"""

from __future__ import annotations

import math
import numbers

import chex
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


@chex.dataclass(frozen=True)
class SamplingParams:
    """Scalars of the sampler, traced (a pytree, not a static argument).

    Attributes:
      temperature: [] float32; 0 means greedy.
      top_p: [] float32 in (0, 1]; 1 disables nucleus filtering.
      top_k: [] int32; 0 disables top-k filtering.
    """

    temperature: Float[Array, ""]
    top_p: Float[Array, ""]
    top_k: Int[Array, ""]

    @classmethod
    def create(cls, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0):
        """Validated sampling parameters (ValueError naming the bad parameter)."""
        if not _is_real(temperature) or not 0 <= temperature < math.inf:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), "
                             f"got {temperature!r}")
        if not _is_real(top_p) or not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        if (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral)
                or not 0 <= top_k < 2**31):
            raise ValueError(f"top_k must be an integer in [0, 2**31) (0 = off), got {top_k!r}")
        return cls(temperature=jnp.float32(temperature), top_p=jnp.float32(top_p),
                   top_k=jnp.int32(top_k))


def _is_real(value) -> bool:
    """A real number (numpy and 0-d JAX scalars included); not a bool or a string."""
    if isinstance(value, bool | str | bytes):
        return False
    return isinstance(value, numbers.Real) or getattr(value, "shape", None) == ()


def filtered_log_probs(logits: Float[Array, "B V"], params: SamplingParams) -> Array:
    """Log-probabilities of the sampling distribution: logits / temperature, restricted to
    the top-k tokens and to the smallest prefix of tokens whose mass reaches top_p
    (-inf elsewhere). Assumes temperature > 0."""
    scaled = logits.astype(jnp.float32) / params.temperature
    order = jnp.argsort(-scaled, axis=-1)
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    rank = jnp.arange(scaled.shape[-1])
    keep = (params.top_k <= 0) | (rank < params.top_k)
    sorted_logits = jnp.where(keep, sorted_logits, -jnp.inf)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    sorted_logits = jnp.where(mass_before < params.top_p, sorted_logits, -jnp.inf)
    inverse = jnp.argsort(order, axis=-1)
    return jax.nn.log_softmax(jnp.take_along_axis(sorted_logits, inverse, axis=-1), axis=-1)


def sample(logits: Float[Array, "B V"], key: Array, params: SamplingParams
           ) -> tuple[Int[Array, " B"], Float[Array, " B"]]:
    """Draws one token per row.

    Returns:
      tokens: [B] int32.
      log_probs: [B] float32 log-probability of each drawn token under the distribution it
        was drawn from (for greedy, the plain softmax of the logits).
    """
    logits = logits.astype(jnp.float32)

    def greedy(_):
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return tokens, jax.nn.log_softmax(logits, axis=-1)

    def stochastic(_):
        log_probs = filtered_log_probs(logits, params)
        return jax.random.categorical(key, log_probs, axis=-1).astype(jnp.int32), log_probs

    tokens, log_probs = jax.lax.cond(params.temperature > 0, stochastic, greedy, None)
    return tokens, jnp.take_along_axis(log_probs, tokens[:, None], axis=-1)[:, 0]


def sampling_log_probs(logits: Float[Array, "R V"], params: SamplingParams
                       ) -> Float[Array, "R V"]:
    """Log-probabilities of the distribution `sample` draws from (and reports): the plain
    softmax for greedy (temperature 0), else `filtered_log_probs`."""
    logits = logits.astype(jnp.float32)
    return jax.lax.cond(params.temperature > 0,
                        lambda x: filtered_log_probs(x, params),
                        lambda x: jax.nn.log_softmax(x, axis=-1), logits)
