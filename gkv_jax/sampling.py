"""Token sampling: greedy, temperature, top-k and top-p, with every knob a traced value.

Changing temperature, top-p or top-k therefore never recompiles a decode loop; a batch that
is all greedy (temperature == 0) skips the vocabulary sort through `lax.cond`. The knobs are
scalars or one value per row (the slot engine serves requests with their own values).

Random keys are per row: a sequence sampled with seed s draws its token j with
`fold_in(PRNGKey(s), j)` (`seed_keys`, `token_keys`), so its tokens never depend on the batch
it runs in, its row, or its neighbours.
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
    """The sampler's knobs, traced (a pytree, not a static argument): scalars for the whole
    batch, or [B] arrays, one value per row (`stack`).

    Attributes:
      temperature: [] or [B] float32; 0 means greedy.
      top_p: [] or [B] float32 in (0, 1]; 1 disables nucleus filtering.
      top_k: [] or [B] int32; 0 disables top-k filtering.
    """

    temperature: Float[Array, "*B"]
    top_p: Float[Array, "*B"]
    top_k: Int[Array, "*B"]

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

    @classmethod
    def stack(cls, rows) -> SamplingParams:
        """[B] knobs from B scalar `SamplingParams` (one per row)."""
        return jax.tree.map(lambda *values: jnp.stack(values), *rows)


def _is_real(value) -> bool:
    """A real number (numpy and 0-d JAX scalars included); not a bool or a string."""
    if isinstance(value, bool | str | bytes):
        return False
    return isinstance(value, numbers.Real) or getattr(value, "shape", None) == ()


def _column(x):
    """A knob as a [B, 1] or [1, 1] column that broadcasts over the vocabulary."""
    return jnp.reshape(x, (-1, 1))


def filtered_log_probs(logits: Float[Array, "B V"], params: SamplingParams) -> Array:
    """Log-probabilities of the sampling distribution: logits / temperature, restricted to
    the top-k tokens and to the smallest prefix of tokens whose mass reaches top_p
    (-inf elsewhere). Assumes temperature > 0."""
    scaled = logits.astype(jnp.float32) / _column(params.temperature)
    order = jnp.argsort(-scaled, axis=-1)
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    rank = jnp.arange(scaled.shape[-1])
    top_k = _column(params.top_k)
    keep = (top_k <= 0) | (rank < top_k)
    sorted_logits = jnp.where(keep, sorted_logits, -jnp.inf)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    sorted_logits = jnp.where(mass_before < _column(params.top_p), sorted_logits, -jnp.inf)
    inverse = jnp.argsort(order, axis=-1)
    return jax.nn.log_softmax(jnp.take_along_axis(sorted_logits, inverse, axis=-1), axis=-1)


def seed_keys(seeds: Int[Array, " B"]) -> Array:
    """[B, 2] uint32 base keys, `PRNGKey(seed)` of each row's seed (int32: seeds in [2**31,
    2**32) passed as the negative int32 with the same bits)."""
    return jax.vmap(jax.random.PRNGKey)(seeds)


def token_keys(keys: Array, index: Int[Array, " B"]) -> Array:
    """[B, 2] the key each row samples its token `index` with: fold_in(base key, index)."""
    return jax.vmap(jax.random.fold_in)(keys, index)


def sample(logits: Float[Array, "B V"], keys: Array, params: SamplingParams
           ) -> tuple[Int[Array, " B"], Float[Array, " B"]]:
    """Draws one token per row, row b with its own key `keys[b]` ([B, 2], see `token_keys`)
    and its own knobs when `params` holds [B] values: a row's draw does not depend on the
    other rows.

    Returns:
      tokens: [B] int32.
      log_probs: [B] float32 log-probability of each drawn token under the distribution it
        was drawn from (for greedy rows, the plain softmax of the logits).
    """
    logits = logits.astype(jnp.float32)
    stochastic_rows = jnp.broadcast_to(params.temperature > 0, logits.shape[:1])

    def greedy(_):
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return tokens, jax.nn.log_softmax(logits, axis=-1)

    def mixed(_):
        # Greedy rows divide by 1 here (no NaN), then take the greedy result.
        safe = params.replace(temperature=jnp.where(params.temperature > 0,
                                                    params.temperature, 1.0))
        log_probs = filtered_log_probs(logits, safe)
        drawn = jax.vmap(jax.random.categorical)(keys, log_probs).astype(jnp.int32)
        tokens, plain = greedy(None)
        return (jnp.where(stochastic_rows, drawn, tokens),
                jnp.where(stochastic_rows[:, None], log_probs, plain))

    tokens, log_probs = jax.lax.cond(jnp.any(stochastic_rows), mixed, greedy, None)
    return tokens, jnp.take_along_axis(log_probs, tokens[:, None], axis=-1)[:, 0]


def sampling_log_probs(logits: Float[Array, "R V"], params: SamplingParams
                       ) -> Float[Array, "R V"]:
    """Log-probabilities of the distribution `sample` draws from (and reports) with scalar
    knobs: the plain softmax for greedy (temperature 0), else `filtered_log_probs`."""
    logits = logits.astype(jnp.float32)
    return jax.lax.cond(params.temperature > 0,
                        lambda x: filtered_log_probs(x, params),
                        lambda x: jax.nn.log_softmax(x, axis=-1), logits)
