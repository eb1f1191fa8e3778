"""KV-cache eviction: `EvictionConfig` and the pure `select` step.

At a compression step (docs/algorithm.md, sections 3-5) each (sequence, KV head) of a
layer scores the S - W oldest rows of its cache, keeps the best `budget - W` of them in their
original order and always keeps the last W rows (the observation window). A policy
(`gkv_jax.policies`, one registered `Policy` each) only defines its score (as NVIDIA
kvpress's ScorerPress does), on top of the ops; masking of invalid rows, the top-k, the
ordering and the gather of the carried global score live once, in `select`.

The ops run on the backend that `EvictionConfig.implementation` resolves to, once per call
(`Ops.resolve`): the float32 references of `gkv_jax.pallas_kernels.<op>.reference` (inputs
cast to float32, matrix products at `Precision.HIGHEST`, so on tie-free inputs the float32
specification exactly) or the Pallas kernels, which may feed bfloat16 to the matrix products
with float32 accumulation (`matmul_dtype`; the reference G-KV runs in bfloat16 and keeps
99.6-99.8% of the float32 kept set).

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

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from gkv_jax.pallas_kernels._common import (
    IMPLEMENTATIONS,
    KEY_NORM_EPS,
    MASKED_LOGIT,
    MATMUL_DTYPES,
)
from gkv_jax.pallas_kernels.ops import Ops
from gkv_jax.pallas_kernels.redundancy.reference import redundancy
from gkv_jax.pallas_kernels.score_update.reference import (
    blend_history,
    normalise,
    update_global_score,
    window_attention,
)
from gkv_jax.pallas_kernels.topk_retention.reference import keep_top
from gkv_jax.policies import POLICIES, Policy, get_policy, max_pool, register_policy
from gkv_jax.policies.builtin import DEFAULT_SINK
from gkv_jax.policies.registry import check_int as _check_int

SMOOTH_MODES = ("max", "mean", "sum")
# Re-exported: the ops' specification functions and constants, under their old names here.
__all__ = ["DEFAULT_SINK", "IMPLEMENTATIONS", "KEY_NORM_EPS", "MASKED_LOGIT", "MATMUL_DTYPES",
           "POLICIES", "EvictionConfig", "Ops", "Policy", "blend_history", "get_policy",
           "keep_top", "max_pool", "normalise", "policy_scores", "redundancy",
           "register_policy", "select", "select_with_ops", "update_global_score",
           "validate_inputs", "window_attention"]

# The knobs a policy may declare (`Policy.knobs`); budget, divide_length, implementation and
# matmul_dtype are common to every policy.
_KNOBS = ("window", "alpha", "mix_lambda", "similarity_threshold", "pool_kernel", "sink",
          "recent", "smooth")
DEFAULT_DIVIDE_LENGTH = 128


@dataclasses.dataclass(frozen=True)
class EvictionConfig:
    """Which tokens a compression keeps; frozen and hashable, a static argument of jit.

    Unset fields (None) take the policy's defaults. A knob the policy does not use must be
    left None (setting it raises, so a typo'd sweep cannot silently do nothing).

    Attributes:
      policy: a registered policy name (`POLICIES`): "full" (never evicts), "streaming",
        "snapkv", "rkv", "h2o", "gkv", or one added with `register_policy`.
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
        policy = get_policy(self.policy)
        defaults = policy.knobs
        unknown = sorted(set(defaults) - set(_KNOBS))
        if unknown:  # a registered policy's knobs must be fields of this config
            raise ValueError(f"policy {self.policy!r} declares knobs {unknown} that "
                             f"EvictionConfig lacks; its knobs are among {_KNOBS}")
        for name in _KNOBS:
            if name not in defaults and getattr(self, name) is not None:
                raise ValueError(f"{name} is not used by policy {self.policy!r}; leave it None")
        if self.divide_length is None:
            object.__setattr__(self, "divide_length", DEFAULT_DIVIDE_LENGTH)
        for name, value in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if policy.evicts and self.budget is None:
            raise ValueError(f"budget is required for policy {self.policy!r}")
        if policy.resolve is not None:
            given = {name: getattr(self, name) for name in ("budget", *_KNOBS)}
            for name, value in policy.resolve(given).items():
                object.__setattr__(self, name, value)
        self._validate()

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
        if not self.evicts:
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
    def policy_object(self) -> Policy:
        """The registered `Policy` of `policy`."""
        return get_policy(self.policy)

    @property
    def evicts(self) -> bool:
        """False only for a policy without a score ("full")."""
        return self.policy_object.evicts

    @property
    def has_global_score(self) -> bool:
        """True for the policies that carry a per-row score across compressions (gkv, h2o)."""
        return self.policy_object.carries_global_score

    @property
    def query_window_size(self) -> int:
        """W of the query ring the cache keeps: the window of a policy that scores with
        queries, else 0 (streaming, full)."""
        return self.window if self.policy_object.needs_queries else 0

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


def _check_real(cfg: EvictionConfig, name: str, low: float, high: float) -> None:
    """Checks low <= value <= high (None passes) and stores the value as a Python float."""
    value = getattr(cfg, name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not low <= value <= high:
        raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}")
    object.__setattr__(cfg, name, float(value))


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
        raise ValueError(f"policy {cfg.policy!r} never evicts; select() serves evicting "
                         f"policies only")
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
    if not cfg.policy_object.needs_queries:
        return
    if (queries is None or queries.ndim != 4 or queries.shape[0] != B
            or queries.shape[3] != H or queries.shape[1] % K
            or not jnp.issubdtype(queries.dtype, jnp.floating)):
        got = None if queries is None else f"{queries.dtype}{list(queries.shape)}"
        raise ValueError(f"queries must be a floating [B={B}, N, W, H={H}] array with N a "
                         f"multiple of K={K}, got {got}")
    if queries.shape[2] != cfg.window:
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
    ops = Ops.resolve(cfg.implementation, matmul_dtype=cfg.matmul_dtype)
    return select_with_ops(cfg, ops, queries, keys, valid, global_score)


def policy_scores(
    cfg: EvictionConfig,
    ops: Ops,
    queries: Float[Array, "B N W H"] | None,
    keys: Float[Array, "B K S H"],
    valid: Bool[Array, "B S"],
    global_score: Float[Array, "B K kept"] | None = None,
) -> tuple[Float[Array, "B K S-W"], Float[Array, "B K S-W"] | None]:
    """The policy's (F, carried G or None) over the S - W candidates, on `ops`; the inputs
    the policy does not read (queries, history) are not passed to it."""
    policy = cfg.policy_object
    queries = queries if policy.needs_queries else None
    history = global_score if policy.carries_global_score else None
    return policy.score(cfg, ops, queries, keys, valid, history)


def select_with_ops(
    cfg: EvictionConfig,
    ops: Ops,
    queries: Float[Array, "B N W H"] | None,
    keys: Float[Array, "B K S H"],
    valid: Bool[Array, "B S"],
    global_score: Float[Array, "B K kept"] | None = None,
) -> tuple[Int[Array, "B K kept"], Float[Array, "B K kept"] | None]:
    """`select` on the given ops (`Ops.resolve(...)`: the references, or the kernels with an
    interpret mode or matmul dtype of one's choice); same contract, not jitted."""
    validate_inputs(cfg, queries, keys, valid, global_score)
    scores, carried = policy_scores(cfg, ops, queries, keys, valid, global_score)
    candidates = keys.shape[2] - cfg.window
    return ops.keep_top(scores, carried, valid[:, :candidates], cfg.kept_scored)
