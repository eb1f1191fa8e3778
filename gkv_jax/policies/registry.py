"""The policy registry: a policy is one `Policy` object, registered once by name.

A policy defines only its score over the S - W candidate rows (masking of invalid rows, the
top-k, the ordering and the gather of the carried score live once, in
`gkv_jax.eviction.select`), on top of the ops of `gkv_jax.pallas_kernels` passed to it as an
`Ops` (the backend, chosen once per call), so the same score runs on XLA and on the kernels.
Everything that knows policies by name (`EvictionConfig`, the decode loop, the evaluation, the
CLI choices) reads this registry.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import numbers
from collections.abc import Callable, Mapping
from typing import Any

from jaxtyping import Array, Bool, Float

from gkv_jax.pallas_kernels.ops import Ops

# What the `window` knob means to a policy, which decides whether a sweep's common window
# applies to it (docs/algorithm.md section 5):
#   "observation": the last W queries score the older rows (snapkv, rkv, gkv);
#   "current_query": W = 1 by convention, the query of the current token (h2o);
#   "recent": the always-kept recent tail, no query scores anything (streaming);
#   "none": never evicts (full).
WINDOW_ROLES = ("observation", "current_query", "recent", "none")

# The knobs a policy may declare (`Policy.knobs`), each an `EvictionConfig` field, with the
# kind of default it takes (None = derived by the policy's `resolve`); budget, divide_length,
# implementation and matmul_dtype are common to every policy.
KNOB_KINDS = {"window": "integer", "alpha": "number", "mix_lambda": "number",
              "similarity_threshold": "number", "pool_kernel": "integer", "sink": "integer",
              "recent": "integer", "smooth": "string"}
KNOBS = tuple(KNOB_KINDS)

Score = Callable[
    [Any, Ops, Float[Array, "B N W H"] | None, Float[Array, "B K S H"], Bool[Array, "B S"],
     Float[Array, "B K kept"] | None],
    tuple[Float[Array, "B K S-W"], Float[Array, "B K S-W"] | None]]


@dataclasses.dataclass(frozen=True)
class Policy:
    """One eviction policy.

    Attributes:
      name: what `EvictionConfig(policy=...)` and the CLI call it: a non-empty string
        without commas or whitespace (the CLI takes policies as a comma-separated list).
      score: `score(cfg, ops, queries, keys, valid, global_score) -> (scores, carried)`:
        scores [B, K, S - W] float32 of the candidate rows (higher is kept; invalid rows are
        masked afterwards) and carried [B, K, S - W] (the global score to carry) or None.
        `queries` [B, N, W, H] (None unless `needs_queries`); `keys` [B, K, S, H] as cached
        (any float dtype; invalid rows may hold anything, NaN included: the ops mask them, a
        score reading keys itself must too); `global_score` [B, K, budget - W] (None at the
        first compression or unless `carries_global_score`). None for a policy that never
        evicts.
      knobs: the `EvictionConfig` knobs the policy reads (names from `KNOBS`), with their
        defaults (None = derived by `resolve`). A knob absent here must be left None by the
        user. Checked when the `Policy` is built: an unknown knob raises then, not at first
        use.
      needs_queries: scores with the last W queries (the cache keeps a query ring of W).
      carries_global_score: keeps a per-row score across compressions (`carried`).
      window_role: what `window` means to it (see `WINDOW_ROLES`).
      resolve: derives knobs from the others: `resolve(fields) -> fields to set`, with
        `fields` the config's budget and knobs as given; None = the defaults only.
      about: one line for the policies table (docs/guides/policies.md) and the CLI help.
    """

    name: str
    score: Score | None
    knobs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    needs_queries: bool = True
    carries_global_score: bool = False
    window_role: str = "observation"
    resolve: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None
    about: str = ""

    def __post_init__(self):
        _check_name(self.name)
        if self.score is not None and not callable(self.score):
            raise TypeError(f"policy {self.name!r}: score must be callable or None, got "
                            f"{type(self.score).__name__}")
        _check_knobs(self.name, self.knobs)
        if self.window_role not in WINDOW_ROLES:
            raise ValueError(f"window_role must be one of {WINDOW_ROLES}, "
                             f"got {self.window_role!r}")

    @property
    def evicts(self) -> bool:
        return self.score is not None


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not name or name != name.strip() or any(
            c == "," or c.isspace() for c in name):
        raise ValueError(f"Policy name must be a non-empty string without commas or "
                         f"whitespace (the CLI's --policies is a comma-separated list), got "
                         f"{name!r}")


def _check_knobs(name: str, knobs: Any) -> None:
    """A policy's knobs: a mapping from `KNOBS` names to defaults of the knob's kind."""
    if not isinstance(knobs, Mapping):
        raise TypeError(f"policy {name!r}: knobs must be a mapping of knob name to default, "
                        f"got {type(knobs).__name__}")
    unknown = sorted(str(k) for k in knobs if k not in KNOB_KINDS)
    if unknown:
        raise ValueError(f"policy {name!r}: knobs {unknown} are not EvictionConfig knobs; a "
                         f"policy's knobs are among {KNOBS}")
    for knob, default in knobs.items():
        kind = KNOB_KINDS[knob]
        fits = default is None or {
            "integer": isinstance(default, numbers.Integral) and not isinstance(default, bool),
            "number": isinstance(default, numbers.Real) and not isinstance(default, bool),
            "string": isinstance(default, str)}[kind]
        if not fits:
            raise ValueError(f"policy {name!r}: the default of knob {knob!r} must be an "
                             f"{kind} or None, got {default!r}")


_REGISTRY: dict[str, Policy] = {}


def register_policy(policy: Policy, *, replace: bool = False) -> Policy:
    """Adds `policy` under `policy.name` (`replace=True` to redefine one); returns it.

    Register before compiling: programs are cached by `EvictionConfig` (which names the
    policy), so one compiled before a `replace` keeps the old score.
    """
    if not isinstance(policy, Policy):
        raise TypeError(f"register_policy takes a Policy, got {type(policy)}")
    if policy.name in _REGISTRY and not replace:
        raise ValueError(f"policy {policy.name!r} is already registered (replace=True to "
                         f"redefine it)")
    _REGISTRY[policy.name] = policy
    return policy


def unregister_policy(name: str) -> Policy:
    """Removes and returns the policy `name` (a toy policy in a test or a notebook)."""
    return _REGISTRY.pop(get_policy(name).name)


def get_policy(name: str) -> Policy:
    """The registered policy `name`; ValueError naming the valid ones otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"policy must be one of {tuple(_REGISTRY)}, got {name!r}") from None


class PolicyNames(collections.abc.Sequence):
    """The registered policy names, in registration order: a live, read-only tuple (a policy
    registered later appears in it) that compares equal to the tuple of its names."""

    def __getitem__(self, index):
        return tuple(_REGISTRY)[index]

    def __len__(self) -> int:
        return len(_REGISTRY)

    def __contains__(self, name) -> bool:
        return isinstance(name, str) and name in _REGISTRY

    def __eq__(self, other) -> bool:
        return tuple(self) == (tuple(other) if isinstance(other, PolicyNames) else other)

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return repr(tuple(self))


POLICIES = PolicyNames()


def check_int(name: str, value: Any, low: int) -> int:
    """`value` as a Python int if it is an integer (numpy ints included, bool not) >= low."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)
