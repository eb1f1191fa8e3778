"""`EvictionConfig`: which tokens a compression keeps, its knobs and their validation.

The knobs' defaults and meaning per policy come from the policy registry (`gkv_jax.policies`);
this module checks the values and derives what the decode loop sizes from them (`capacity`,
`kept_scored`, `query_window_size`). The selection itself is `gkv_jax.eviction.selection`.
"""

from __future__ import annotations

import dataclasses
import numbers

from gkv_jax.pallas_kernels._common import IMPLEMENTATIONS, MATMUL_DTYPES
from gkv_jax.policies import Policy, get_policy
from gkv_jax.policies.registry import KNOBS
from gkv_jax.policies.registry import check_int as _check_int

__all__ = ["DEFAULT_DIVIDE_LENGTH", "KNOBS", "SMOOTH_MODES", "EvictionConfig"]

SMOOTH_MODES = ("max", "mean", "sum")

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
        required by every policy but "full", which never evicts and refuses one.
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
        defaults = policy.knobs  # names checked when the Policy was built
        if not policy.evicts and self.budget is not None:
            raise ValueError(f"budget is not used by policy {self.policy!r}, which never "
                             f"evicts; leave it unset")
        for name in KNOBS:
            if name not in defaults and getattr(self, name) is not None:
                raise ValueError(f"{name} is not used by policy {self.policy!r}; leave it unset")
        if self.divide_length is None:
            object.__setattr__(self, "divide_length", DEFAULT_DIVIDE_LENGTH)
        for name, value in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if policy.evicts and self.budget is None:
            raise ValueError(f"budget is required for policy {self.policy!r}")
        if policy.resolve is not None:
            given = {name: getattr(self, name) for name in ("budget", *KNOBS)}
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

    def peak_tokens(self, prompt_length: int, new_tokens: int) -> int:
        """The most real tokens a sequence's cache holds at a compression, when `new_tokens`
        tokens (generated, or teacher-forced in training) follow a prompt of
        `prompt_length`: compressions come after the prefill and after every
        `divide_length`-th decode forward, and decode forward k holds prompt_length + k
        tokens (`gkv_jax.decode`). An evicting policy drops a token of the sequence iff this
        exceeds `budget`.

        >>> EvictionConfig("gkv", budget=64, divide_length=16).peak_tokens(40, 41)
        72
        """
        last_compression = (new_tokens - 1) // self.divide_length * self.divide_length
        return prompt_length + last_compression

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
