"""The settings of post-training: `DistillConfig`, `GRPOConfig`, and the optimizer they
build (`OptimizerConfig`, `make_optimizer`). Every field is checked when the config is made,
so a bad value fails before any step runs or any file is written."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import optax

from gkv_jax.eviction import EvictionConfig
from gkv_jax.sampling import SamplingParams
from gkv_jax.training.log_probs import DEFAULT_CHUNK_ROWS

SCHEDULES = ("cosine", "constant")
# Optax counts steps in int32 (Adam's bias correction, the schedules): a run of more steps
# would overflow them.
MAX_STEPS = 2**31 - 1


def _check_positive_int(owner: str, name: str, value: Any, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{owner}.{name} must be an integer >= {low}, got {value!r}")


def _check_steps(owner: str | None, steps: Any) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        name = f"{owner}.steps" if owner else "steps"
        raise ValueError(f"{name} must be an integer in [1, {MAX_STEPS}] (optax counts steps "
                         f"in int32), got {steps!r}")


def _check_number(owner: str, name: str, value: Any, low: float, high: float,
                  low_open: bool = False) -> None:
    ok = (not isinstance(value, bool) and isinstance(value, int | float)
          and math.isfinite(value) and (value > low if low_open else value >= low)
          and value <= high)
    if not ok:
        bracket = "(" if low_open else "["
        raise ValueError(f"{owner}.{name} must be a number in {bracket}{low}, {high}], "
                         f"got {value!r}")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with global-norm clipping and a warm-up schedule (the G-KV paper's recipe:
    betas 0.9/0.999, eps 1e-8, weight decay 0.01, clipping 1.0, 5% warm-up; cosine for
    distillation, constant for RL)."""

    learning_rate: float = 1e-6
    schedule: str = "cosine"
    warmup_ratio: float = 0.05
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8


def make_optimizer(config: OptimizerConfig, steps: int) -> optax.GradientTransformation:
    """`chain(clip_by_global_norm, adamw(schedule))` for a run of `steps` updates (at most
    `MAX_STEPS`)."""
    _check_steps(None, steps)
    warmup = int(round(config.warmup_ratio * steps))
    if config.schedule == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(
            0.0 if warmup else config.learning_rate, config.learning_rate, max(warmup, 0),
            max(steps, warmup + 1), end_value=0.0)
    else:
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, config.learning_rate, max(warmup, 1)),
             optax.constant_schedule(config.learning_rate)], [max(warmup, 1)]) \
            if warmup else optax.constant_schedule(config.learning_rate)
    return optax.chain(
        optax.clip_by_global_norm(config.clip_norm),
        optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                    weight_decay=config.weight_decay))


def _check_optimizer(owner: str, cfg) -> None:
    if cfg.learning_rate is not None:  # None: chosen for the model (`recipe.resolve`)
        _check_number(owner, "learning_rate", cfg.learning_rate, 0.0, 1.0, low_open=True)
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"{owner}.schedule must be one of {SCHEDULES}, got {cfg.schedule!r}")
    _check_number(owner, "warmup_ratio", cfg.warmup_ratio, 0.0, 1.0)
    _check_number(owner, "weight_decay", cfg.weight_decay, 0.0, 10.0)
    _check_number(owner, "clip_norm", cfg.clip_norm, 0.0, 1e9, low_open=True)


def _check_selection(owner: str, cfg) -> None:
    if cfg.select_by is not None and (not isinstance(cfg.select_by, str) or not cfg.select_by):
        raise ValueError(f"{owner}.select_by must be None or a key of eval_fn's dict (e.g. "
                         f"'gkv@68'), got {cfg.select_by!r}")
    _check_number(owner, "full_cache_tolerance", cfg.full_cache_tolerance, 0.0, 1.0)


def _check_eviction(owner: str, eviction: Any) -> None:
    if not isinstance(eviction, EvictionConfig):
        raise TypeError(f"{owner}.eviction must be an EvictionConfig, got {type(eviction)}")
    if not eviction.evicts:
        raise ValueError(f"{owner}.eviction: policy 'full' evicts nothing, so there is no mask "
                         f"to train under; use an evicting policy (e.g. 'gkv')")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Settings of `distill`.

    Attributes:
      eviction: the evicting policy the student trains under (masks replayed every step).
      steps: optimizer updates. batch_size: sequences per update.
      learning_rate: the peak learning rate; None (default) derives it from the student's
        size (`gkv_jax.training.recipe`: 1e-4 at 3M parameters, the paper's 1e-6 from 1.5B
        up), recorded in run.json and the history.
      schedule ("cosine" | "constant"), warmup_ratio, weight_decay, clip_norm:
        AdamW with global-norm clipping (the paper: cosine, 5% warm-up).
      temperature: T of the T^2-scaled KL (0.6). reduction: "sum" | "token_mean".
      seed: the data order (and budget choices) of step s depend only on (seed, s).
      budgets: if set, each batch trains under `eviction` with a budget drawn from these.
      full_attention_share: fraction of each batch's rows trained with full attention.
      on_policy: the student generates each batch's completions (greedy, with the record)
        from the prompts, and the teacher scores its tokens; else the data's completions.
      max_new_tokens: on-policy generation length (default the longest data completion).
      checkpoint_every: Orbax checkpoint period (0: only at the end).
      eval_every: call `eval_fn` every that many steps (0: only at the end).
      attention_impl: None (auto), "dense" or "segments" for the student's masked rows.
      chunk_rows: LM-head rows per chunk.
      select_by: a key of `eval_fn`'s dict (e.g. "gkv@68"): the run evaluates the model
        before its first update too and returns the evaluated step with the highest score
        among those whose "full" score (if the dict has one) is at most
        `full_cache_tolerance` below step 0's (`gkv_jax.training.selection`); None (the
        default) returns the last step. Needs `eval_fn`.
      full_cache_tolerance: the full-cache accuracy a selected step may lose (0.01).
    """

    eviction: EvictionConfig
    steps: int
    batch_size: int = 8
    learning_rate: float | None = None
    temperature: float = 0.6
    seed: int = 0
    schedule: str = "cosine"
    warmup_ratio: float = 0.05
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    reduction: str = "sum"
    budgets: tuple[int, ...] | None = None
    full_attention_share: float = 0.0
    on_policy: bool = False
    max_new_tokens: int | None = None
    checkpoint_every: int = 100
    eval_every: int = 0
    attention_impl: str | None = None
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    select_by: str | None = None
    full_cache_tolerance: float = 0.01

    def __post_init__(self):
        owner = "DistillConfig"
        _check_selection(owner, self)
        _check_eviction(owner, self.eviction)
        _check_steps(owner, self.steps)
        _check_positive_int(owner, "batch_size", self.batch_size)
        _check_positive_int(owner, "seed", self.seed, 0)
        _check_optimizer(owner, self)
        _check_number(owner, "temperature", self.temperature, 0.0, 1e6, low_open=True)
        if self.reduction not in ("sum", "token_mean"):
            raise ValueError(f"{owner}.reduction must be 'sum' or 'token_mean', got "
                             f"{self.reduction!r}")
        if self.budgets is not None:
            budgets = tuple(self.budgets)
            if not budgets:
                raise ValueError(f"{owner}.budgets must be None or a non-empty list")
            for budget in budgets:  # each must make a valid config
                dataclasses.replace(self.eviction, budget=budget)
            object.__setattr__(self, "budgets", budgets)
        _check_number(owner, "full_attention_share", self.full_attention_share, 0.0, 1.0)
        if self.max_new_tokens is not None:
            _check_positive_int(owner, "max_new_tokens", self.max_new_tokens)
        _check_positive_int(owner, "checkpoint_every", self.checkpoint_every, 0)
        _check_positive_int(owner, "eval_every", self.eval_every, 0)
        _check_positive_int(owner, "chunk_rows", self.chunk_rows)
        if self.attention_impl not in (None, "dense", "segments"):
            raise ValueError(f"{owner}.attention_impl must be None, 'dense' or 'segments', "
                             f"got {self.attention_impl!r}")

    @property
    def full_rows(self) -> int:
        """Rows of each batch trained with full attention."""
        return int(round(self.full_attention_share * self.batch_size))


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """Settings of `grpo`.

    Attributes:
      eviction: the evicting policy rollouts are generated (and trained) under.
      steps: updates, one per rollout batch (no ratio, no KL: REINFORCE with a group
        baseline). prompts_per_step: P prompts per batch. group_size: G >= 2 rollouts each.
      max_new_tokens: rollout length limit (a rollout without EOS is truncated).
      temperature, top_p, top_k: the rollout sampler (the paper: 0.8, 0.95); the loss divides
        the logits by `temperature`.
      learning_rate (None: derived from the model's size, as in `DistillConfig`), schedule
        (default "constant"), warmup_ratio, weight_decay, clip_norm: AdamW as in
        `DistillConfig`.
      seed, checkpoint_every, eval_every, attention_impl, chunk_rows: as in `DistillConfig`.
      prompt_width: left-padded prompt width of every rollout batch (default the bucket of
        the longest prompt), so every step has the same shapes.
      select_by, full_cache_tolerance: as in `DistillConfig` (the full-cache guard).
    """

    eviction: EvictionConfig
    steps: int
    prompts_per_step: int = 4
    group_size: int = 8
    max_new_tokens: int = 512
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 0
    learning_rate: float | None = None
    schedule: str = "constant"
    warmup_ratio: float = 0.05
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    seed: int = 0
    checkpoint_every: int = 10
    eval_every: int = 0
    attention_impl: str | None = None
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    prompt_width: int | None = None
    select_by: str | None = None
    full_cache_tolerance: float = 0.01

    def __post_init__(self):
        owner = "GRPOConfig"
        _check_selection(owner, self)
        _check_eviction(owner, self.eviction)
        _check_steps(owner, self.steps)
        _check_positive_int(owner, "prompts_per_step", self.prompts_per_step)
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) \
                or self.group_size < 2:
            raise ValueError(f"{owner}.group_size must be an integer >= 2 (the group baseline "
                             f"needs two rollouts), got {self.group_size!r}")
        _check_positive_int(owner, "max_new_tokens", self.max_new_tokens)
        _check_number(owner, "temperature", self.temperature, 0.0, 1e6, low_open=True)
        SamplingParams.create(self.temperature, self.top_p, self.top_k)
        _check_optimizer(owner, self)
        _check_positive_int(owner, "seed", self.seed, 0)
        _check_positive_int(owner, "checkpoint_every", self.checkpoint_every, 0)
        _check_positive_int(owner, "eval_every", self.eval_every, 0)
        _check_positive_int(owner, "chunk_rows", self.chunk_rows)
        if self.prompt_width is not None:
            _check_positive_int(owner, "prompt_width", self.prompt_width)
        if self.attention_impl not in (None, "dense", "segments"):
            raise ValueError(f"{owner}.attention_impl must be None, 'dense' or 'segments', "
                             f"got {self.attention_impl!r}")

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams.create(self.temperature, self.top_p, self.top_k)


def optimizer_config(cfg) -> OptimizerConfig:
    """The `OptimizerConfig` of a `DistillConfig` or `GRPOConfig` whose learning rate is
    set (`recipe.resolve` sets it for a model)."""
    if cfg.learning_rate is None:
        raise ValueError("learning_rate is unset: resolve the config for its model first "
                         "(gkv_jax.training.recipe.resolve)")
    return OptimizerConfig(learning_rate=cfg.learning_rate, schedule=cfg.schedule,
                           warmup_ratio=cfg.warmup_ratio, weight_decay=cfg.weight_decay,
                           clip_norm=cfg.clip_norm)
