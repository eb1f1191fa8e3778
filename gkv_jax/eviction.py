"""KV-cache eviction: `EvictionConfig`, the score of every policy, and the pure `select` step.

At a compression step (docs/algorithm.md, sections 3-5) each (sequence, KV head) of a
layer scores the S - W oldest rows of its cache, keeps the best `budget - W` of them in their
original order and always keeps the last W rows (the observation window). A policy only
defines its score (as NVIDIA kvpress's ScorerPress does); masking of invalid rows, the top-k,
the ordering and the gather of the carried global score live once, in `select`.

This module is the float32 reference. Inputs are cast to float32, softmaxes, sums and
normalisations run in float32 and matrix products at `Precision.HIGHEST` (no TF32 on GPUs),
so on tie-free inputs it reproduces the float32 specification exactly. Faster kernels may
feed bfloat16 to the matrix products with float32 accumulation (the reference G-KV runs in
bfloat16 and keeps 99.6-99.8% of the float32 kept set); they dispatch on
`EvictionConfig.implementation`.

Conventions chosen where the specification is silent:
  * A NaN entry of `global_score` means "this row has no history": it is treated exactly like
    a row >= C = budget - W (G = Â, which is also what `sum` gives with zero history).
  * `smooth="sum"` is G = alpha * G_prev + Â (the reference's H2O rule; rows without history
    get G = Â).
  * Score ties are broken towards the lowest slot index (`jax.lax.top_k` keeps the
    lower-index element first among equal values).
  * When fewer valid candidates than `budget - W` exist, the extra kept entries point at the
    lowest-index invalid slots (those slots stay empty) and their carried global score is
    NaN (no history), like every empty slot of `KVCache.global_score`.
  * A finished sequence keeping its old global score is the caller's business (the decode
    loop), not `select`'s.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from gkv_jax.pallas_kernels._common import (
    IMPLEMENTATIONS,
    KEY_NORM_EPS,
    MASKED_LOGIT,
    MATMUL_DTYPES,
)
from gkv_jax.pallas_kernels.redundancy.reference import redundancy
from gkv_jax.pallas_kernels.score_update.reference import (
    blend_history,
    normalise,
    update_global_score,
    window_attention,
)
from gkv_jax.pallas_kernels.topk_retention.reference import keep_top

POLICIES = ("full", "streaming", "snapkv", "rkv", "h2o", "gkv")
SMOOTH_MODES = ("max", "mean", "sum")
# Re-exported: the ops' specification functions and constants, under their old names here.
__all__ = ["IMPLEMENTATIONS", "KEY_NORM_EPS", "MASKED_LOGIT", "MATMUL_DTYPES", "POLICIES",
           "EvictionConfig", "blend_history", "keep_top", "max_pool", "normalise",
           "redundancy", "select", "update_global_score", "validate_inputs",
           "window_attention"]

# Defaults of the knobs each policy uses (docs/algorithm.md, section 5). A knob absent from a
# policy's table is not used by it and must stay None. budget, divide_length and
# implementation are common to every policy; streaming derives window, sink and recent in
# `EvictionConfig._resolve_streaming`.
_POLICY_DEFAULTS: dict[str, dict[str, Any]] = {
    "full": {},
    "streaming": {"window": None, "sink": None, "recent": None},
    "snapkv": {"window": 16, "pool_kernel": 5},
    "rkv": {"window": 16, "pool_kernel": 5, "mix_lambda": 0.1, "similarity_threshold": 0.5},
    "h2o": {"window": 1, "alpha": 0.8, "smooth": "sum"},
    "gkv": {"window": 16, "alpha": 0.8, "mix_lambda": 0.5, "similarity_threshold": 0.5,
            "smooth": "max"},
}
_KNOBS = ("window", "alpha", "mix_lambda", "similarity_threshold", "pool_kernel", "sink",
          "recent", "smooth")
DEFAULT_DIVIDE_LENGTH = 128
DEFAULT_SINK = 4


@dataclasses.dataclass(frozen=True)
class EvictionConfig:
    """Which tokens a compression keeps; frozen and hashable, a static argument of jit.

    Unset fields (None) take the policy's defaults. A knob the policy does not use must be
    left None (setting it raises, so a typo'd sweep cannot silently do nothing).

    Attributes:
      policy: "full" (never evicts), "streaming", "snapkv", "rkv", "h2o" or "gkv".
      budget: number of cache rows kept per (layer, sequence, KV head) after a compression;
        required by every policy but "full" (which ignores it).
      window: W, the always-kept, never-scored tail (16; h2o 1; streaming: = recent).
      divide_length: decode steps between compression attempts (128).
      alpha: decay of the global score (gkv, h2o: 0.8).
      mix_lambda: weight of the attention term against redundancy (gkv 0.5, rkv 0.1).
      similarity_threshold: cosine above which two keys are near-duplicates (gkv, rkv: 0.5).
      pool_kernel: odd max-pooling kernel over positions (snapkv, rkv: 5).
      sink: streaming only, number of first valid tokens kept (4).
      recent: streaming only, number of last tokens kept (budget - sink).
      smooth: global-score update, "max" (gkv), "mean" or "sum" (h2o).
      implementation: None (auto: the Pallas kernels on a backend of
        `pallas_kernels._common.VERIFIED_BACKENDS`, none yet; the XLA reference elsewhere),
        "xla", or "pallas" (Mosaic TPU on TPU, Mosaic GPU on Hopper GPUs, TPU interpret mode
        on CPU).
      matmul_dtype: operand dtype of the score matrix products in the Pallas kernels:
        "float32" (default; the float32 specification exactly) or "bfloat16" (float32
        accumulation, as the reference G-KV runs; >= 99% of each head's kept set agrees with
        float32 on realistic keys). The XLA reference always computes in float32.
    """

    policy: str
    budget: int | None = None
    window: int | None = None
    divide_length: int | None = None
    alpha: float | None = None
    mix_lambda: float | None = None
    similarity_threshold: float | None = None
    pool_kernel: int | None = None
    sink: int | None = None
    recent: int | None = None
    smooth: str | None = None
    implementation: str | None = None
    matmul_dtype: str = "float32"

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        defaults = _POLICY_DEFAULTS[self.policy]
        for name in _KNOBS:
            if name not in defaults and getattr(self, name) is not None:
                raise ValueError(f"{name} is not used by policy {self.policy!r}; leave it None")
        if self.divide_length is None:
            object.__setattr__(self, "divide_length", DEFAULT_DIVIDE_LENGTH)
        for name, value in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.policy != "full" and self.budget is None:
            raise ValueError(f"budget is required for policy {self.policy!r}")
        if self.policy == "streaming":
            self._resolve_streaming()
        self._validate()

    def _resolve_streaming(self):
        """sink + recent = budget; the recent tail is the window. Only `budget` is required."""
        budget = _check_int("budget", self.budget, 2)
        # Check what the caller passed against the budget before deriving the rest, so the
        # message names the caller's parameter (not a derived recent = budget - sink < 1).
        for name in ("sink", "recent", "window"):
            given = getattr(self, name)
            if given is not None:
                given = _check_int(name, given, 1)
                if given >= budget:
                    other = "recent" if name == "sink" else "sink"
                    raise ValueError(f"{name} must be < budget (={budget}) so that {other} = "
                                     f"budget - {name} >= 1, got {name}={given}")
                object.__setattr__(self, name, given)
        sink, recent = self.sink, self.recent
        if recent is None:
            recent = self.window
        if sink is None and recent is None:
            sink = DEFAULT_SINK
        if recent is None:
            recent = self.budget - sink
        if sink is None:
            sink = self.budget - recent
        if self.window is not None and self.window != recent:
            raise ValueError(f"window must equal recent for streaming, got window="
                             f"{self.window} and recent={recent}")
        _check_int("sink", sink, 1)
        _check_int("recent", recent, 1)
        if sink + recent != self.budget:
            raise ValueError(f"sink + recent must equal budget (={self.budget}), got sink={sink}"
                             f" and recent={recent}")
        for name, value in (("sink", sink), ("recent", recent), ("window", recent)):
            object.__setattr__(self, name, value)

    def _validate(self):
        # Integral values (numpy ints included) are stored as Python ints: the config is a
        # static jit argument, hashed and printed.
        for name in ("budget", "window", "divide_length", "pool_kernel", "sink", "recent"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, _check_int(name, getattr(self, name), 1))
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, "
                             f"got {self.implementation!r}")
        if self.matmul_dtype not in MATMUL_DTYPES:
            raise ValueError(f"matmul_dtype must be one of {MATMUL_DTYPES}, "
                             f"got {self.matmul_dtype!r}")
        if self.policy == "full":
            return
        if self.budget <= self.window:
            raise ValueError(f"budget must be > window (={self.window}), got {self.budget}")
        for name in ("alpha", "mix_lambda"):
            _check_real(self, name, 0.0, 1.0)
        _check_real(self, "similarity_threshold", -1.0, 1.0)
        if self.pool_kernel is not None and self.pool_kernel % 2 == 0:
            raise ValueError(f"pool_kernel must be odd (same-length pooling), "
                             f"got {self.pool_kernel}")
        if self.smooth is not None and self.smooth not in SMOOTH_MODES:
            raise ValueError(f"smooth must be one of {SMOOTH_MODES}, got {self.smooth!r}")

    @property
    def evicts(self) -> bool:
        """False only for "full"."""
        return self.policy != "full"

    @property
    def has_global_score(self) -> bool:
        """True for the policies that carry a per-row score across compressions (gkv, h2o)."""
        return self.policy in ("gkv", "h2o")

    @property
    def kept_scored(self) -> int | None:
        """budget - W, the rows chosen by score (C in the algorithm); None for "full"."""
        return self.budget - self.window if self.evicts else None

    @property
    def capacity(self) -> int | None:
        """budget + divide_length, the cache slots a sequence ever needs; None for "full"."""
        return self.budget + self.divide_length if self.evicts else None

    def describe(self) -> str:
        """One line with the policy and every resolved field that is set."""
        fields = ", ".join(f"{f.name}={getattr(self, f.name)!r}"
                           for f in dataclasses.fields(self)
                           if f.name != "policy" and getattr(self, f.name) is not None)
        return f"{self.policy}({fields})"


def _check_int(name: str, value: Any, low: int) -> int:
    """`value` as a Python int if it is an integer (numpy ints included, bool not) >= low."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _check_real(cfg: EvictionConfig, name: str, low: float, high: float) -> None:
    """Checks low <= value <= high (None passes) and stores the value as a Python float."""
    value = getattr(cfg, name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not low <= value <= high:
        raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}")
    object.__setattr__(cfg, name, float(value))


# --------------------------------------------------------------------------------------------
# Building blocks of the scores. The ops' specifications (window attention, normalisation, global
# score, redundancy, top-k) live in `gkv_jax.pallas_kernels.<op>.reference`; max-pooling is
# O(B K S) glue that no kernel replaces.


def max_pool(x: Float[Array, "B K P"], kernel: int) -> Float[Array, "B K P"]:
    """Max-pooling over positions, stride 1, odd kernel, same length (borders see fewer)."""
    half = kernel // 2
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 1, kernel), (1, 1, 1),
                                 ((0, 0), (0, 0), (half, half)))


# --------------------------------------------------------------------------------------------
# Policies: each only defines its score over the S - W candidate rows, and the per-row
# global score to carry (None for policies without history). Inputs are float32 and invalid
# keys are zero; invalid rows are masked afterwards by `select`.


class Scorer(Protocol):
    def score(
        self,
        cfg: EvictionConfig,
        queries: Float[Array, "B N W H"] | None,
        keys: Float[Array, "B K S H"],
        valid: Bool[Array, "B S"],
        global_score: Float[Array, "B K kept"] | None,
    ) -> tuple[Float[Array, "B K S-W"], Float[Array, "B K S-W"] | None]: ...


class Streaming:
    """StreamingLLM: nothing is scored. Older rows rank higher, so the top `sink` rows are the
    first `sink` valid positions (positions are exact in float32 up to 2**24)."""

    def score(self, cfg, queries, keys, valid, global_score):
        B, K, S, _ = keys.shape
        older_first = -jnp.arange(S - cfg.window, dtype=jnp.float32)
        return jnp.broadcast_to(older_first, (B, K, S - cfg.window)), None


class SnapKV:
    """SnapKV: F = max-pool(A)."""

    def score(self, cfg, queries, keys, valid, global_score):
        return max_pool(window_attention(queries, keys, valid), cfg.pool_kernel), None


class RKV:
    """R-KV: F = lambda * max-pool(A) - (1 - lambda) * R (nothing normalised)."""

    def score(self, cfg, queries, keys, valid, global_score):
        pooled = max_pool(window_attention(queries, keys, valid), cfg.pool_kernel)
        redundant = redundancy(keys, valid, cfg.similarity_threshold)[..., : pooled.shape[-1]]
        return cfg.mix_lambda * pooled - (1.0 - cfg.mix_lambda) * redundant, None


class H2O:
    """H2O: F = G = alpha * G_prev + Â (smooth "sum"), no redundancy, no pooling."""

    def score(self, cfg, queries, keys, valid, global_score):
        local = normalise(window_attention(queries, keys, valid))
        carried = update_global_score(cfg.smooth, cfg.alpha, local, global_score)
        return carried, carried


class GKV:
    """G-KV: F = lambda * G - (1 - lambda) * R̂, with G = max(alpha * G_prev, Â) by default."""

    def score(self, cfg, queries, keys, valid, global_score):
        local = normalise(window_attention(queries, keys, valid))
        carried = update_global_score(cfg.smooth, cfg.alpha, local, global_score)
        redundant = redundancy(keys, valid, cfg.similarity_threshold)[..., : local.shape[-1]]
        return cfg.mix_lambda * carried - (1.0 - cfg.mix_lambda) * normalise(redundant), carried


SCORERS: dict[str, Scorer] = {
    "streaming": Streaming(), "snapkv": SnapKV(), "rkv": RKV(), "h2o": H2O(), "gkv": GKV(),
}


# --------------------------------------------------------------------------------------------
# The step.


def validate_inputs(
    cfg: EvictionConfig,
    queries: Array | None,
    keys: Array,
    valid: Array,
    global_score: Array | None,
) -> None:
    """Raises ValueError unless the arrays fit `select`'s contract for `cfg` (shapes only)."""
    if not cfg.evicts:
        raise ValueError("policy 'full' never evicts; select() serves evicting policies only")
    if keys.ndim != 4 or not jnp.issubdtype(keys.dtype, jnp.floating):
        raise ValueError(f"keys must be a floating [B, K, S, H] array, got {keys.dtype}"
                         f"{list(keys.shape)}")
    B, K, S, H = keys.shape
    if valid.shape != (B, S) or valid.dtype != jnp.bool_:
        raise ValueError(f"valid must be a bool [B, S] = [{B}, {S}] array, got {valid.dtype}"
                         f"{list(valid.shape)}")
    if S < cfg.budget:
        raise ValueError(f"keys hold S={S} rows but budget={cfg.budget} needs S >= budget "
                         f"(kept_index has budget - W entries in [0, S - W))")
    if queries is None and cfg.policy == "streaming":
        return
    if (queries is None or queries.ndim != 4 or queries.shape[0] != B
            or queries.shape[3] != H or queries.shape[1] % K
            or not jnp.issubdtype(queries.dtype, jnp.floating)):
        got = None if queries is None else f"{queries.dtype}{list(queries.shape)}"
        raise ValueError(f"queries must be a floating [B={B}, N, W, H={H}] array with N a "
                         f"multiple of K={K}, got {got}")
    if cfg.policy != "streaming" and queries.shape[2] != cfg.window:
        raise ValueError(f"queries must hold W = window = {cfg.window} queries, got "
                         f"{queries.shape[2]}")
    if cfg.has_global_score and global_score is not None and (
            global_score.shape != (B, K, cfg.kept_scored)
            or not jnp.issubdtype(global_score.dtype, jnp.floating)):
        raise ValueError(f"global_score must be a floating [B, K, budget - W] = "
                         f"[{B}, {K}, {cfg.kept_scored}] array or None, got "
                         f"{global_score.dtype}{list(global_score.shape)}")


@functools.partial(jax.jit, static_argnames="cfg")
def select(
    cfg: EvictionConfig,
    queries: Float[Array, "B N W H"] | None,
    keys: Float[Array, "B K S H"],
    valid: Bool[Array, "B S"],
    global_score: Float[Array, "B K kept"] | None = None,
) -> tuple[Int[Array, "B K kept"], Float[Array, "B K kept"] | None]:
    """One compression step: which of the S - W older rows each KV head keeps.

    Args:
      cfg: an evicting policy (static; "full" raises ValueError).
      queries: [B, N, W, H] the last W queries, post-RoPE, oldest first (the current token's
        last). Not read by streaming (may be None there).
      keys: [B, K, S, H] all cached keys, post-RoPE, the window rows last. S >= budget.
        Invalid rows may hold anything (NaN included).
      valid: [B, S] bool, False for left pads and empty slots.
      global_score: [B, K, budget - W] float, the carried score of rows 0..budget-W-1 (the
        rows kept at the previous compression, in order), NaN for a row without history;
        None at the first compression. Ignored by policies without history.

    Returns:
      kept_index: [B, K, budget - W] int32 sorted positions in [0, S - W); the last W rows are
        kept besides. Invalid rows are kept only when fewer valid candidates exist.
      new_global_score: [B, K, budget - W] float32 G at kept_index (NaN at invalid rows), or
        None for policies without history (streaming, snapkv, rkv).

    >>> import jax.numpy as jnp
    >>> cfg = EvictionConfig(policy="streaming", budget=4, sink=2)
    >>> keys = jnp.ones((1, 1, 7, 8))
    >>> valid = jnp.array([[False, False, True, True, True, True, True]])
    >>> kept_index, _ = select(cfg, None, keys, valid)
    >>> kept_index.tolist()
    [[[2, 3]]]
    """
    validate_inputs(cfg, queries, keys, valid, global_score)
    # Dispatch: "pallas" (or None on a verified backend) runs the kernels of
    # gkv_jax.pallas_kernels (TPU interpret mode on CPU); "xla" (or None elsewhere) runs this
    # reference (see _common.resolve_implementation). Imported here
    # because gkv_jax.pallas_kernels builds on this module.
    from gkv_jax.pallas_kernels import _common, eviction_step
    if _common.resolve_implementation(cfg.implementation).use_pallas:
        return eviction_step.select(
            cfg, queries, keys, valid, global_score, implementation="pallas",
            matmul_dtype=cfg.matmul_dtype)
    if queries is not None:
        queries = queries.astype(jnp.float32)
    keys = jnp.where(valid[:, None, :, None], keys.astype(jnp.float32), 0.0)
    if cfg.has_global_score and global_score is not None:
        global_score = global_score.astype(jnp.float32)
    else:
        global_score = None
    scores, carried = SCORERS[cfg.policy].score(cfg, queries, keys, valid, global_score)
    candidates = keys.shape[2] - cfg.window
    return keep_top(scores, carried, valid[:, :candidates], cfg.kept_scored)
