"""KV-cache eviction: `EvictionConfig` (`config`) and the pure compression step `select`
(`selection`).

  * `config`: `EvictionConfig`, its knobs (`KNOBS`, defaults from the policy registry) and
    their validation.
  * `selection`: `select` / `select_with_ops` (validate the arrays once, resolve the backend
    once, score with the policy, keep the top rows), `policy_scores`, `validate_inputs`.

The ops run on the backend that `EvictionConfig.implementation` resolves to, once per call
(`Ops.resolve`): the float32 references of `gkv_jax.pallas_kernels.<op>.reference` (inputs
cast to float32, matrix products at `Precision.HIGHEST`, so on tie-free inputs the float32
specification exactly) or the Pallas kernels, which may feed bfloat16 to the matrix products
with float32 accumulation (`matmul_dtype`; the reference G-KV runs in bfloat16 and keeps
99.6-99.8% of the float32 kept set).

Also re-exported here, under their old names: the policy registry (`POLICIES`,
`register_policy`, ...), the ops (`Ops`) and the ops' specification functions and constants.
"""

from __future__ import annotations

from gkv_jax.eviction.config import (
    DEFAULT_DIVIDE_LENGTH,
    KNOBS,
    SMOOTH_MODES,
    EvictionConfig,
)
from gkv_jax.eviction.selection import policy_scores, select, select_with_ops, validate_inputs
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

__all__ = ["DEFAULT_DIVIDE_LENGTH", "DEFAULT_SINK", "IMPLEMENTATIONS", "KEY_NORM_EPS", "KNOBS",
           "MASKED_LOGIT", "MATMUL_DTYPES", "POLICIES", "SMOOTH_MODES", "EvictionConfig", "Ops",
           "Policy", "blend_history", "get_policy", "keep_top", "max_pool", "normalise",
           "policy_scores", "redundancy", "register_policy", "select", "select_with_ops",
           "update_global_score", "validate_inputs", "window_attention"]
