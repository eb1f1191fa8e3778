"""Eviction policies: the registry (`Policy`, `register_policy`, `get_policy`, `POLICIES`) and
the built-in policies, one `Policy` each. A policy of one's own: build a `Policy` with its
score on top of the ops and `register_policy` it (see `registry.Policy`)."""

from gkv_jax.policies import builtin, l2norm, tova  # one import registers a policy file
from gkv_jax.policies.builtin import max_pool
from gkv_jax.policies.registry import (
    POLICIES,
    WINDOW_ROLES,
    Policy,
    get_policy,
    register_policy,
    unregister_policy,
)

__all__ = ["POLICIES", "WINDOW_ROLES", "Policy", "builtin", "get_policy", "l2norm", "max_pool",
           "register_policy", "tova", "unregister_policy"]
