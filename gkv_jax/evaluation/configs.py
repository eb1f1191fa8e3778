"""The eviction configs an evaluation runs (one per policy and budget; "full" once), their
short names, and the argument check the evaluation modules share."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

from gkv_jax.eviction import POLICIES, EvictionConfig, get_policy


def eviction_configs(policies: Sequence[str] | str, budgets: Sequence[int] | int,
                     window: int | None = None, divide_length: int | None = None
                     ) -> list[EvictionConfig]:
    """One `EvictionConfig` per (policy, budget); "full" once. Raises ValueError early."""
    if isinstance(policies, str):
        policies = [p.strip() for p in policies.split(",") if p.strip()]
    budgets = [budgets] if isinstance(budgets, numbers.Integral) else list(budgets)
    # numpy integers (a sweep built with np.arange) as plain ints, for json and describe().
    budgets = [int(b) if isinstance(b, numbers.Integral) and not isinstance(b, bool) else b
               for b in budgets]
    policies = list(dict.fromkeys(policies))
    if not policies:
        raise ValueError(f"policies: give at least one of {POLICIES}")
    for policy in policies:
        if policy not in POLICIES:
            raise ValueError(f"policies: unknown policy {policy!r}; valid policies are "
                             f"{', '.join(POLICIES)}")
    common = {} if divide_length is None else {"divide_length": divide_length}
    configs = []
    for policy in policies:
        if not get_policy(policy).evicts:
            configs.append(EvictionConfig(policy=policy, **common))
            continue
        if not budgets:
            raise ValueError(f"budgets: policy {policy!r} needs at least one budget")
        for budget in dict.fromkeys(budgets):
            knobs = dict(common, budget=budget)
            # A sweep's window is the observation window; h2o's (the current query) and
            # streaming's (the recent tail) mean something else and keep their own.
            if window is not None and get_policy(policy).window_role == "observation":
                knobs["window"] = window
            configs.append(EvictionConfig(policy=policy, **knobs))
    return configs


def config_name(config: EvictionConfig) -> str:
    """A short name: "full" or "policy@budget"."""
    return config.policy if not config.evicts else f"{config.policy}@{config.budget}"


def check_positive(name: str, value: Any) -> None:
    """Raises ValueError naming `name` unless `value` is an int >= 1 (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
