"""`Ops`: the eviction ops on one backend, resolved once per call and handed to the policies.

A policy's score is written once on top of these methods; whether they run the float32
references or the Pallas kernels is decided here, once (`Ops.resolve`), not by each op.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxtyping import Array, Bool, Float, Int

from gkv_jax.pallas_kernels import _common
from gkv_jax.pallas_kernels.redundancy import redundancy
from gkv_jax.pallas_kernels.score_update import score_update
from gkv_jax.pallas_kernels.topk_retention import compact, keep_top


@dataclasses.dataclass(frozen=True)
class Ops:
    """The ops on a resolved backend.

    Attributes:
      implementation: "xla" (the references) or "pallas" (the kernels).
      interpret: the resolved Pallas interpret mode (see `_common.resolve_implementation`);
        None for "xla".
      matmul_dtype: operand dtype of the score matrix products on the kernels ("float32" or
        "bfloat16"); the references always compute in float32.
    """

    implementation: str = "xla"
    interpret: Any = None
    matmul_dtype: str = "float32"

    @classmethod
    def resolve(cls, implementation: str | None, interpret: Any = None,
                matmul_dtype: str = "float32") -> Ops:
        """The ops `implementation` (None = auto) runs on the current default backend."""
        _common.check_matmul_dtype(matmul_dtype)
        dispatch = _common.resolve_implementation(implementation, interpret)
        if not dispatch.use_pallas:
            return cls("xla", None, matmul_dtype)
        return cls("pallas", dispatch.interpret, matmul_dtype)

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
        return score_update(queries, keys, valid, global_score, normalise=normalise,
                            smooth=smooth, alpha=alpha, implementation=self.implementation,
                            matmul_dtype=self.matmul_dtype, interpret=self.interpret)

    def redundancy(self, keys: Float[Array, "B K S H"], valid: Bool[Array, "B S"],
                   threshold: float) -> Float[Array, "B K S"]:
        """`redundancy.redundancy` on this backend."""
        return redundancy(keys, valid, threshold, implementation=self.implementation,
                          matmul_dtype=self.matmul_dtype, interpret=self.interpret)

    def keep_top(
        self,
        scores: Float[Array, "B K P"],
        carried: Float[Array, "B K P"] | None,
        candidate_valid: Bool[Array, "B P"],
        count: int,
    ) -> tuple[Int[Array, "B K count"], Float[Array, "B K count"] | None]:
        """`topk_retention.keep_top` on this backend."""
        return keep_top(scores, carried, candidate_valid, count,
                        implementation=self.implementation, interpret=self.interpret)

    def compact(self, keys, values, positions, global_score, kept_index, *, window: int,
                active=None, new_score=None, replace_score=None):
        """`topk_retention.compact` on this backend (see its docstring for shapes)."""
        return compact(keys, values, positions, global_score, kept_index, window=window,
                       active=active, new_score=new_score, replace_score=replace_score,
                       implementation=self.implementation, interpret=self.interpret)
