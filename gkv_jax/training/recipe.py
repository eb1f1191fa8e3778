"""The default post-training recipe's model-dependent values, above all the learning rate.

A learning rate that suits a 7B model (the G-KV paper's 1e-6) changes nothing in a few
hundred steps on a model of a few million parameters, and one that suits the small model
(1e-4) would wreck a 7B one. So when a `DistillConfig` or `GRPOConfig` leaves
`learning_rate` unset, the loop derives it from the student's size:

    lr(N) = 10 ** interp(log10 N, [log10 3.16e6, log10 1.5e9], [log10 1e-4, log10 1e-6])

log-linear in the parameter count N between two measured anchors (the bundled reasoner,
3.16M parameters, distils well at 1e-4; the paper trains 1.5B and 7B models at 1e-6) and
held at the anchors' values outside them, so 1.5B, 7B and every larger model get the
paper's 1e-6.

    >>> f"{learning_rate_for(3_164_416):.0e}", f"{learning_rate_for(7_000_000_000):.0e}"
    ('1e-04', '1e-06')
    >>> f"{learning_rate_for(100_000_000):.1e}"
    '7.6e-06'
"""

from __future__ import annotations

import dataclasses
import math

# (parameters, learning rate) where the rule is anchored; between them it is log-linear.
SMALL_ANCHOR = (3_164_416, 1e-4)        # the bundled reasoner (docs: post-training results)
LARGE_ANCHOR = (1_500_000_000, 1e-6)    # R1-Distill-Qwen-1.5B and up (the G-KV paper)
RULE = ("log-linear in the parameter count between (3.16e6, 1e-4) and (1.5e9, 1e-6), "
        "held at the ends")


def learning_rate_for(num_parameters: int) -> float:
    """The default peak learning rate of a model of `num_parameters` parameters."""
    if num_parameters < 1:
        raise ValueError(f"num_parameters must be >= 1, got {num_parameters}")
    (n_small, lr_small), (n_large, lr_large) = SMALL_ANCHOR, LARGE_ANCHOR
    position = (math.log10(num_parameters) - math.log10(n_small)) \
        / (math.log10(n_large) - math.log10(n_small))
    position = min(max(position, 0.0), 1.0)
    return 10 ** (math.log10(lr_small) + position * (math.log10(lr_large) - math.log10(lr_small)))


def resolve(config, model_config):
    """`config` with every unset recipe value chosen for the model, and what was chosen.

    Returns:
      (config, chosen): `chosen` maps each filled-in field to {"value", "rule"} (empty when
      the caller set everything).
    """
    chosen = {}
    if config.learning_rate is None:
        size = model_config.num_parameters()
        value = float(f"{learning_rate_for(size):.3g}")
        config = dataclasses.replace(config, learning_rate=value)
        chosen["learning_rate"] = {"value": value, "rule": f"{RULE}; model of {size:,} "
                                                           f"parameters"}
    return config, chosen


__all__ = ["LARGE_ANCHOR", "RULE", "SMALL_ANCHOR", "learning_rate_for", "resolve"]
