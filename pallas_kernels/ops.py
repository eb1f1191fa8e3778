"""`Ops`: the eviction ops on one backend, resolved once per call and handed to the policies.

A policy's score is written once on top of these methods; whether they run the float32
references or the Pallas kernels is decided here, once (`Ops.resolve`), not by each op. Each
method validates its inputs, unless the caller validated them already (`Ops.trusted`, as
`gkv_jax.eviction.select` does), and never resolves the backend again.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxtyping import Array, Bool, Float, Int

from gkv_jax.pallas_kernels import _common
from gkv_jax.pallas_kernels.redundancy import redundancy_on
from gkv_jax.pallas_kernels.score_update import score_update_on
from gkv_jax.pallas_kernels.topk_retention import compact_on, keep_top_on


@dataclasses.dataclass(frozen=True)
class Ops:
    """The ops on a resolved backend.

    Attributes:
      implementation: "xla" (the references) or "pallas" (the kernels).
      interpret: the resolved Pallas interpret mode (see `_common.resolve_implementation`);
        None for "xla".
      matmul_dtype: operand dtype of the score matrix products on the kernels ("float32" or
        "bfloat16"); the references always compute in float32.
      kernels: which kernels "pallas" runs, "tpu" or "gpu" (`_common.Dispatch.kernels`);
        None for "xla", and derived from `interpret` when an Ops is built by hand.
      validate: each method validates its inputs (True); `trusted()` turns it off for a
        caller that validated them already.
    """

    implementation: str = "xla"
    interpret: Any = None
    matmul_dtype: str = "float32"
    kernels: str | None = None
    validate: bool = True

    def __post_init__(self):
        if self.implementation == "pallas" and self.kernels is None:  # built by hand
            dispatch = _common.resolve_implementation("pallas", self.interpret)
            object.__setattr__(self, "interpret", dispatch.interpret)
            object.__setattr__(self, "kernels", dispatch.kernels)

    @classmethod
    def resolve(cls, implementation: str | None, interpret: Any = None,
                matmul_dtype: str = "float32") -> Ops:
        """The ops `implementation` (None = auto) runs on the current default backend."""
        _common.check_matmul_dtype(matmul_dtype)
        dispatch = _common.resolve_implementation(implementation, interpret)
        if not dispatch.use_pallas:
            return cls("xla", None, matmul_dtype)
        return cls("pallas", dispatch.interpret, matmul_dtype, kernels=dispatch.kernels)

    def trusted(self) -> Ops:
        """These ops without input validation (the caller validated the arrays once)."""
        return dataclasses.replace(self, validate=False)

    @property
    def dispatch(self) -> _common.Dispatch:
        """The resolved backend, as the ops' `*_on` functions take it."""
        if self.implementation != "pallas":
            return _common.Dispatch(use_pallas=False)
        return _common.Dispatch(use_pallas=True, interpret=self.interpret, kernels=self.kernels)

    def score_update(
        self,
        queries: Float[Array, "B N W H"],
        keys: Float[Array, "B K S H"],
        valid: Bool[Array, "B S"],
        global_score: Float[Array, "B K C"] | None = None,
        *,
        normalise: bool = True,
        smooth: str = "max",
        alpha: float = 0.8,
    ) -> Float[Array, "B K S-W"]:
        """`score_update.score_update` on this backend."""
        if self.validate:
            _common.validate_score_update(queries, keys, valid, global_score, normalise, smooth,
                                          alpha)
        return score_update_on(self.dispatch, queries, keys, valid, global_score,
                               normalise=normalise, smooth=smooth, alpha=alpha,
                               matmul_dtype=self.matmul_dtype)

    def redundancy(self, keys: Float[Array, "B K S H"], valid: Bool[Array, "B S"],
                   threshold: float) -> Float[Array, "B K S"]:
        """`redundancy.redundancy` on this backend."""
        if self.validate:
            _common.validate_redundancy(keys, valid, threshold)
        return redundancy_on(self.dispatch, keys, valid, threshold,
                             matmul_dtype=self.matmul_dtype)

    def keep_top(
        self,
        scores: Float[Array, "B K P"],
        carried: Float[Array, "B K P"] | None,
        candidate_valid: Bool[Array, "B P"],
        count: int,
    ) -> tuple[Int[Array, "B K count"], Float[Array, "B K count"] | None]:
        """`topk_retention.keep_top` on this backend."""
        if self.validate:
            _common.validate_keep_top(scores, carried, candidate_valid, count)
        return keep_top_on(self.dispatch, scores, carried, candidate_valid, count)

    def compact(self, keys, values, positions, global_score, kept_index, *, window: int,
                active=None, new_score=None, replace_score=None):
        """`topk_retention.compact` on this backend (see its docstring for shapes)."""
        if self.validate:
            _common.validate_compact(keys, values, positions, global_score, kept_index, window,
                                     active, new_score, replace_score)
        return compact_on(self.dispatch, keys, values, positions, global_score, kept_index,
                          window=window, active=active, new_score=new_score,
                          replace_score=replace_score)
