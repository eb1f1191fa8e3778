"""Post-training loops: distillation and GRPO under exact eviction masks.

* `distill_step` / `grpo_step`: jitted, pure update steps (AdamW with clipping; configs and
  the optimizer static) that users can call in their own loops.
* `distill(student, teacher, data, DistillConfig(...), run_dir=...)` and
  `grpo(model, prompts, answers, grade_fn, GRPOConfig(...), run_dir=...)`: seeded loops with
  Orbax checkpoints every `checkpoint_every` steps, an exact resume after an interruption
  (the batch of step s depends only on the seed and s), a JSONL history, a progress bar and
  an optional evaluation callback. Both return the trained model and the history. With
  `mesh=` they run data- and model-parallel on a ("data", "model") mesh by the rule table of
  `gkv_jax.sharding` (`shard_batch` places each batch).

Distillation masks are replayed every step with the student's current parameters
(`replay_from_params`); GRPO trains each rollout under its own generation record.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

from gkv_jax.eviction import EvictionConfig
from gkv_jax.generation import bucket_length, generate, resolve_mesh
from gkv_jax.models.config import ModelConfig
from gkv_jax.sampling import SamplingParams
from gkv_jax.sharding.mesh import active_mesh
from gkv_jax.sharding.placement import placed_mesh
from gkv_jax.sharding.rules import param_specs
from gkv_jax.training.batch import TeacherForcedBatch, batch_from_completions, shard_batch
from gkv_jax.training.batch import batch_from_generation as _batch_from_generation
from gkv_jax.training.log_probs import DEFAULT_CHUNK_ROWS
from gkv_jax.training.losses import (
    check_same_vocabulary,
    distill_token_kl,
    group_advantages,
    grpo_loss_from_params,
    reduce_per_token,
)
from gkv_jax.training.replay import replay_from_params

SCHEDULES = ("cosine", "constant")
GUARD_WARN = 1e-4


# ------------------------------------------------------------------------------ configs
def _check_positive_int(owner: str, name: str, value: Any, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{owner}.{name} must be an integer >= {low}, got {value!r}")


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
    """`chain(clip_by_global_norm, adamw(schedule))` for a run of `steps` updates."""
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
    _check_number(owner, "learning_rate", cfg.learning_rate, 0.0, 1.0, low_open=True)
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"{owner}.schedule must be one of {SCHEDULES}, got {cfg.schedule!r}")
    _check_number(owner, "warmup_ratio", cfg.warmup_ratio, 0.0, 1.0)
    _check_number(owner, "weight_decay", cfg.weight_decay, 0.0, 10.0)
    _check_number(owner, "clip_norm", cfg.clip_norm, 0.0, 1e9, low_open=True)


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
      learning_rate, schedule ("cosine" | "constant"), warmup_ratio, weight_decay, clip_norm:
        AdamW with global-norm clipping (the paper: lr 1e-6 on 7B, cosine, 5% warm-up).
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
    """

    eviction: EvictionConfig
    steps: int
    batch_size: int = 8
    learning_rate: float = 1e-6
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

    def __post_init__(self):
        owner = "DistillConfig"
        _check_eviction(owner, self.eviction)
        _check_positive_int(owner, "steps", self.steps)
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
      learning_rate, schedule (default "constant"), warmup_ratio, weight_decay, clip_norm:
        AdamW as in `DistillConfig`.
      seed, checkpoint_every, eval_every, attention_impl, chunk_rows: as in `DistillConfig`.
      prompt_width: left-padded prompt width of every rollout batch (default the bucket of
        the longest prompt), so every step has the same shapes.
    """

    eviction: EvictionConfig
    steps: int
    prompts_per_step: int = 4
    group_size: int = 8
    max_new_tokens: int = 512
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 0
    learning_rate: float = 1e-6
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

    def __post_init__(self):
        owner = "GRPOConfig"
        _check_eviction(owner, self.eviction)
        _check_positive_int(owner, "steps", self.steps)
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


def _optimizer_config(cfg) -> OptimizerConfig:
    return OptimizerConfig(learning_rate=cfg.learning_rate, schedule=cfg.schedule,
                           warmup_ratio=cfg.warmup_ratio, weight_decay=cfg.weight_decay,
                           clip_norm=cfg.clip_norm)


# ------------------------------------------------------------------------------ steps
def _global_norm(tree) -> jax.Array:
    norm = getattr(getattr(optax, "tree", None), "norm", None)
    return norm(tree) if norm is not None else optax.global_norm(tree)


def _impl(attention_impl: str | None, eviction: EvictionConfig | None) -> str:
    if attention_impl is not None:
        return attention_impl
    return "segments" if eviction is not None and eviction.evicts else "dense"


def _keep_rule_layout(config: ModelConfig, params: dict, opt_state):
    """Under a mesh: the updated `params`, and every params-shaped part of `opt_state` (Adam's
    moments), pinned to the rule table's shardings, so that step after step the weights keep
    the layout `shard_params` gave them. Without a mesh, unchanged."""
    mesh = active_mesh()
    if mesh is None:
        return params, opt_state
    specs = param_specs(config, params, mesh)
    structure = jax.tree.structure(params)

    def pin(tree):
        return jax.lax.with_sharding_constraint(tree, specs)

    def like_params(x):
        return jax.tree.structure(x) == structure

    opt_state = jax.tree.map(lambda x: pin(x) if like_params(x) else x, opt_state,
                             is_leaf=like_params)
    return pin(params), opt_state


def _row_mean(values, rows: int):
    """sum(values) / rows: the batch mean over the real rows (padding rows hold 0)."""
    return jnp.sum(values) / rows


def _distill_step(student_config: ModelConfig, teacher_config: ModelConfig,
                  optimizer: optax.GradientTransformation, eviction: EvictionConfig,
                  params: dict, opt_state, teacher_params: dict, batch: TeacherForcedBatch,
                  full_batch: TeacherForcedBatch | None = None, *, temperature: float = 0.6,
                  reduction: str = "sum", attention_impl: str | None = None,
                  chunk_rows: int = DEFAULT_CHUNK_ROWS):
    impl = _impl(attention_impl, eviction)
    masks = replay_from_params(student_config, params, eviction, batch, attention_impl=impl)
    masked = batch.replace(visible_until=masks, eviction=eviction)

    def loss_fn(p):
        kl = distill_token_kl(student_config, p, teacher_config, teacher_params, masked,
                              temperature, impl, chunk_rows)
        mask = masked.loss_mask
        if full_batch is not None:
            full_kl = distill_token_kl(student_config, p, teacher_config, teacher_params,
                                       full_batch.replace(visible_until=None), temperature,
                                       "dense", chunk_rows)
            kl = jnp.concatenate([kl, full_kl])
            mask = jnp.concatenate([mask, full_batch.loss_mask])
        if padding and reduction == "sum":  # per sequence, averaged over the real rows
            return _row_mean(jnp.where(mask, kl, 0.0), kl.shape[0] - padding)
        return reduce_per_token(kl, mask, reduction)

    padding = batch.padding_rows + (full_batch.padding_rows if full_batch is not None else 0)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    params, opt_state = _keep_rule_layout(student_config, params, opt_state)
    return params, opt_state, {"loss": loss, "grad_norm": _global_norm(grads)}


distill_step = jax.jit(
    _distill_step, static_argnums=(0, 1, 2, 3),
    static_argnames=("temperature", "reduction", "attention_impl", "chunk_rows"),
    donate_argnums=(4, 5))
distill_step.__doc__ = """One distillation update, jitted (configs, optimizer and eviction static;
`params` and `opt_state` donated).

    distill_step(student_config, teacher_config, optimizer, eviction, params, opt_state,
                 teacher_params, batch, full_batch=None, *, temperature=0.6, reduction="sum",
                 attention_impl=None, chunk_rows=512) -> (params, opt_state, metrics)

The student's masks for `batch` are replayed under `eviction` with the current `params`
(under stop_gradient); `full_batch` rows (optional) train with full attention. metrics:
`loss` (T^2 KL, reduced as `reduction`), `grad_norm` (before clipping).

On a mesh (data- and model-parallel): pass `params` / `teacher_params` from
`gkv_jax.sharding.shard_params(config, params, mesh)`, `opt_state = optimizer.init(params)`
(it follows the params' shardings) and batches from `gkv_jax.training.shard_batch(batch,
mesh)`, and call the step inside `with jax.set_mesh(mesh):`, so that it is traced with the
mesh and the replay's compression runs on each device's block of sequences and KV heads.
The updated params and Adam moments keep the rule table's shardings; padding rows of
`shard_batch` change neither the loss nor the update."""


def _grpo_step(config: ModelConfig, optimizer: optax.GradientTransformation, params: dict,
               opt_state, batch: TeacherForcedBatch, advantages, sampling: SamplingParams, *,
               temperature: float = 0.8, attention_impl: str | None = None,
               chunk_rows: int = DEFAULT_CHUNK_ROWS):
    impl = _impl(attention_impl, batch.eviction)
    advantages = jnp.asarray(advantages, jnp.float32)
    B, padding = batch.tokens.shape[0], batch.padding_rows
    if padding and advantages.shape == (B - padding,):  # none for `shard_batch`'s pad rows
        advantages = jnp.pad(advantages, (0, padding))
    if advantages.shape != (B,):
        raise ValueError(f"advantages must be [B] = [{B - padding}] (one per rollout), got "
                         f"{list(advantages.shape)}")

    def loss_fn(p):
        loss, aux = grpo_loss_from_params(config, p, batch, advantages, temperature,
                                          sampling, impl, chunk_rows)
        if padding:  # the mean over the real rows (padding rows: advantage 0)
            loss = -_row_mean(advantages * aux["mean_log_prob"], B - padding)
        return loss, aux

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    params, opt_state = _keep_rule_layout(config, params, opt_state)
    metrics = {"loss": loss, "grad_norm": _global_norm(grads),
               "guard": aux.get("guard", jnp.float32(jnp.nan))}
    return params, opt_state, metrics


grpo_step = jax.jit(_grpo_step, static_argnums=(0, 1),
                    static_argnames=("temperature", "attention_impl", "chunk_rows"),
                    donate_argnums=(2, 3))
grpo_step.__doc__ = """One GRPO update, jitted (config and optimizer static; params and opt_state
donated).

    grpo_step(config, optimizer, params, opt_state, batch, advantages, sampling, *,
              temperature=0.8, attention_impl=None, chunk_rows=512)
        -> (params, opt_state, metrics)

`batch` is `batch_from_generation(out)` of the rollouts (their own records and reported
log-probs); `advantages` [B]. metrics: `loss`, `grad_norm`, `guard` (max |sampler log-prob
recomputed from this forward - generate's|; should stay below 1e-4 in float32).

On a mesh: `params` from `gkv_jax.sharding.shard_params`, the batch from
`gkv_jax.training.shard_batch(batch, mesh)` (`advantages` of its real rows: padding rows get
0), and the call inside `with jax.set_mesh(mesh):`; see `distill_step`."""


# ------------------------------------------------------------------------------ run dir
class RunDirError(ValueError):
    """run_dir holds a different run."""


def _run_identity(kind: str, config, data_fingerprint: str, model_config: ModelConfig):
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    fields["eviction"] = config.eviction.describe()
    for name in ("checkpoint_every", "eval_every"):
        fields.pop(name)
    return {"kind": kind, "config": json.loads(json.dumps(fields, default=str)),
            "data": data_fingerprint, "model": repr(model_config)}


def _fingerprint(*arrays) -> str:
    digest = hashlib.sha256()
    for item in arrays:
        digest.update(json.dumps(item, default=str).encode())
    return digest.hexdigest()[:16]


class _Run:
    """run_dir: run.json (what the run is), history.jsonl, checkpoints/ (Orbax).

    With several processes (multi-host) Orbax writes each process's shards and process 0
    alone checks and writes run.json and the history.
    """

    def __init__(self, run_dir: str, identity: dict, keep: int = 2):
        self.run_dir = os.path.abspath(os.fspath(run_dir))
        os.makedirs(self.run_dir, exist_ok=True)
        self.identity_path = os.path.join(self.run_dir, "run.json")
        self.history_path = os.path.join(self.run_dir, "history.jsonl")
        self.writer = jax.process_index() == 0
        if self.writer:
            self._claim(identity)
        self.manager = ocp.CheckpointManager(
            os.path.join(self.run_dir, "checkpoints"),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def _claim(self, identity: dict) -> None:
        """Writes run.json, or checks that the one there describes this run."""
        if os.path.exists(self.identity_path):
            with open(self.identity_path) as f:
                existing = json.load(f)
            if existing != identity:
                changed = sorted(k for k in set(existing) | set(identity)
                                 if existing.get(k) != identity.get(k))
                raise RunDirError(
                    f"run_dir: {self.run_dir} holds a different run (differs in {changed}); "
                    f"use another run_dir to start fresh, or the same settings to resume")
        elif os.listdir(self.run_dir):
            raise RunDirError(f"run_dir: {self.run_dir} is not empty and holds no run.json; "
                              f"use an empty or new directory")
        else:
            with open(self.identity_path, "w") as f:
                json.dump(identity, f, indent=1)

    def restore(self, params, opt_state):
        """(step, params, opt_state) of the latest checkpoint, restored onto the shardings
        of the given ones (a mesh's shards: each device reads its own), or (0, the given
        ones)."""
        step = self.manager.latest_step()
        if step is None:
            self._truncate_history(0)
            return 0, params, opt_state
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                             sharding=x.sharding),
                              {"params": params, "opt_state": opt_state})
        restored = self.manager.restore(step, args=ocp.args.StandardRestore(target))
        self._truncate_history(step)
        return step, restored["params"], restored["opt_state"]

    def save(self, step: int, params, opt_state) -> None:
        self.manager.save(step, args=ocp.args.StandardSave(
            {"params": params, "opt_state": opt_state}), force=True)
        self.manager.wait_until_finished()

    def _truncate_history(self, step: int) -> None:
        """Drops history lines after `step` (written past the checkpoint resumed from)."""
        if not self.writer or not os.path.exists(self.history_path):
            return
        with open(self.history_path) as f:
            lines = [line for line in f if line.strip()]
        kept = []
        for line in lines:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut off mid-write
            if entry.get("step", 0) <= step:
                kept.append(json.dumps(entry) + "\n")
        with open(self.history_path, "w") as f:
            f.writelines(kept)

    def log(self, entry: dict) -> None:
        if not self.writer:
            return
        with open(self.history_path, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def history(self) -> list[dict]:
        if not os.path.exists(self.history_path):
            return []
        with open(self.history_path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def close(self) -> None:
        self.manager.close()


def _with_params(model, params: dict, copy: bool = False):
    """A new `Transformer` of `model`'s config and dtype holding `params` (copies of them
    with `copy`: the next step donates, i.e. deletes, the buffers it is given)."""
    from gkv_jax.conversion.hf import model_from_weights
    if copy:
        params = jax.tree.map(jnp.copy, params)
    return model_from_weights(model.config, params, model.dtype)


def _training_mesh(mesh, *models):
    """The mesh a loop trains on: `mesh`, else the first mesh a model is already sharded over
    (None: one device). Every model's weights are moved onto it by the rule table (in place,
    as `generate(..., mesh=)` does).

    Raises:
      ValueError: a model's weights are sharded over a different mesh.
    """
    if mesh is None:
        mesh = next((m for m in map(placed_mesh, models) if m is not None), None)
    # Models already on a mesh first: one on the wrong mesh raises before any is moved.
    for model in sorted(models, key=lambda m: placed_mesh(m) is None):
        resolve_mesh(model, mesh)
    return mesh


def _on_mesh(mesh):
    """`jax.set_mesh(mesh)`, under which the steps are traced (nothing without a mesh)."""
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def _init_opt_state(optimizer: optax.GradientTransformation, params: dict, mesh):
    """`optimizer.init(params)`: the moments follow the params' shardings; on a mesh the
    scalars (step counts) are replicated on it too, so that a checkpoint restores every
    leaf onto the mesh."""
    opt_state = optimizer.init(params)
    if mesh is None:
        return opt_state
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda x: x if isinstance(x.sharding, NamedSharding)
                        else jax.device_put(np.asarray(x), replicated), opt_state)


def _progress(total: int, initial: int, enabled: bool, label: str):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, desc=label,
                dynamic_ncols=True)


def _scalars(metrics: dict) -> dict:
    return {k: float(v) for k, v in metrics.items()}


def _end_of_step(run: _Run, config, entry: dict, params, opt_state, model, eval_fn, bar,
                 **postfix) -> None:
    """Logs a step; checkpoints and evaluates on their periods (the last step: `_finish`)."""
    run.log(entry)
    bar.update(1)
    bar.set_postfix(**postfix)
    done = entry["step"]
    if done >= config.steps:
        return
    if config.checkpoint_every and done % config.checkpoint_every == 0:
        run.save(done, params, opt_state)
    if eval_fn is not None and config.eval_every and done % config.eval_every == 0:
        run.log({"step": done, "eval": eval_fn(_with_params(model, params, copy=True), done)})


def _finish(run: _Run, config, start: int, params, opt_state, model, eval_fn):
    """The final checkpoint and evaluation (none when resuming a finished run); returns
    (trained model, history)."""
    trained = _with_params(model, params)
    if start < config.steps:
        run.save(config.steps, params, opt_state)
        if eval_fn is not None:
            run.log({"step": config.steps, "eval": eval_fn(trained, config.steps)})
    return trained, run.history()


def _check_run_dir(run_dir) -> str:
    if run_dir is None or not isinstance(run_dir, str | os.PathLike) or not os.fspath(run_dir):
        raise ValueError(f"run_dir must be a directory path, got {run_dir!r}")
    return os.fspath(run_dir)


def evaluation_callback(tokenizer, dataset: str = "synthetic", *,
                        policies: Sequence[str] = ("full", "gkv"), budgets: Sequence[int] = (68,),
                        output_dir: str, **evaluate_kwargs) -> Callable[[Any, int], dict]:
    """An `eval_fn` for `distill` / `grpo` that runs `gkv_jax.evaluate` into
    `output_dir/step_<s>` and returns {config name: pass@1}.

    >>> callable(evaluation_callback(None, output_dir="/tmp/x"))
    True
    """
    from gkv_jax.evaluation import evaluate

    def eval_fn(model, step: int) -> dict:
        report = evaluate(model, tokenizer, dataset, policies=policies, budgets=budgets,
                          output_dir=os.path.join(output_dir, f"step_{step}"),
                          progress=False, **evaluate_kwargs)
        return {entry["name"]: entry["pass@1"] for entry in report.summary}

    return eval_fn


# ------------------------------------------------------------------------------ distill
def _check_pairs(data) -> list[tuple[list[int], list[int]]]:
    if isinstance(data, str | bytes) or not isinstance(data, Sequence) or len(data) == 0:
        raise ValueError("data must be a non-empty sequence of (prompt_ids, completion_ids) "
                         "pairs")
    pairs = []
    for i, item in enumerate(data):
        if not isinstance(item, Sequence) or len(item) != 2:
            raise ValueError(f"data[{i}] must be a (prompt_ids, completion_ids) pair")
        prompt, completion = ([int(t) for t in part] for part in item)
        if not prompt or not completion:
            raise ValueError(f"data[{i}]: prompt and completion need at least one token each")
        pairs.append((prompt, completion))
    return pairs


def _step_rng(seed: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, step])


def distill(student, teacher, data, config: DistillConfig, *, run_dir,
            eval_fn: Callable[[Any, int], dict] | None = None, progress: bool = True,
            mesh=None):
    """Distils a full-attention teacher into a student trained under `config.eviction`.

    Args:
      student: the `gkv_jax.Transformer` to train (not modified; a new one is returned).
      teacher: the frozen teacher (same vocabulary), run with full attention.
      data: a sequence of `(prompt_ids, completion_ids)` token-id pairs (completions from a
        dataset or the teacher; with `config.on_policy` only the prompts are used).
      config: a `DistillConfig`.
      run_dir: where run.json, history.jsonl and the Orbax checkpoints go. Running again
        with the same arguments resumes from the latest checkpoint and ends with the same
        parameters as an uninterrupted run; a different run there raises.
      eval_fn: optional `eval_fn(model, step) -> dict`, called every `config.eval_every`
        steps and at the end; its dict goes to the history (e.g. a `gkv_jax.evaluate`).
      progress: show a progress bar.
      mesh: a ("data", "model") `jax.sharding.Mesh` (`gkv_jax.sharding.make_mesh`) to train
        on, data- and model-parallel: student and teacher weights are placed by the rule
        table (`shard_model`, in place), the optimizer state follows them, each batch is
        split over `data` (`shard_batch`) and the step runs under `jax.set_mesh`. Default:
        the mesh the models are already sharded over, if any. Checkpoints hold the sharded
        arrays (Orbax: each process writes its own shards) and a resume restores them onto
        the run's shardings.

    Returns:
      (trained model, history): the history is the list of JSON entries of history.jsonl.

    Raises:
      ValueError: `mesh` is not a ("data", "model") mesh, or a model is sharded over
        another one.
    """
    if not isinstance(config, DistillConfig):
        raise TypeError(f"config must be a DistillConfig, got {type(config)}")
    check_same_vocabulary(student.config, teacher.config)
    pairs = _check_pairs(data)
    run_dir = _check_run_dir(run_dir)
    mesh = _training_mesh(mesh, student, teacher)
    width = bucket_length(max(len(p) for p, _ in pairs), None)
    num_targets = config.max_new_tokens or max(len(c) for _, c in pairs)
    identity = _run_identity("distill", config, _fingerprint(pairs), student.config)
    run = _Run(run_dir, identity)
    optimizer = make_optimizer(_optimizer_config(config), config.steps)
    params = jax.tree.map(jnp.copy, student.params())  # the steps donate their buffers
    opt_state = _init_opt_state(optimizer, params, mesh)
    start, params, opt_state = run.restore(params, opt_state)
    teacher_params = teacher.params()
    budgets = config.budgets or (config.eviction.budget,)
    full_rows = config.full_rows
    bar = _progress(config.steps, start, progress, "distill")
    try:
        for step in range(start, config.steps):
            rng = _step_rng(config.seed, step)
            chosen = rng.choice(len(pairs), config.batch_size,
                                replace=len(pairs) < config.batch_size)
            budget = int(budgets[rng.integers(len(budgets))])
            eviction = dataclasses.replace(config.eviction, budget=budget)
            prompts = [pairs[i][0] for i in chosen]
            completions = [pairs[i][1] for i in chosen]
            if config.on_policy:
                completions = _student_completions(student, params, prompts[full_rows:],
                                                   eviction, num_targets, width, mesh)
                completions = [pairs[i][1][:num_targets] for i in chosen[:full_rows]] \
                    + completions
            started = time.perf_counter()
            full_batch = None
            if full_rows:
                full_batch = batch_from_completions(prompts[:full_rows],
                                                    completions[:full_rows], width=width,
                                                    num_targets=num_targets)
            batch = batch_from_completions(prompts[full_rows:], completions[full_rows:],
                                           width=width, num_targets=num_targets)
            if mesh is not None:
                batch = shard_batch(batch, mesh)
                if full_batch is not None:
                    full_batch = shard_batch(full_batch, mesh)
            with _on_mesh(mesh):
                params, opt_state, metrics = distill_step(
                    student.config, teacher.config, optimizer, eviction, params, opt_state,
                    teacher_params, batch, full_batch, temperature=config.temperature,
                    reduction=config.reduction, attention_impl=config.attention_impl,
                    chunk_rows=config.chunk_rows)
            entry = {"step": step + 1, "budget": budget, **_scalars(metrics),
                     "seconds": time.perf_counter() - started}
            _end_of_step(run, config, entry, params, opt_state, student, eval_fn, bar,
                         loss=f"{entry['loss']:.4f}")
        return _finish(run, config, start, params, opt_state, student, eval_fn)
    finally:
        bar.close()
        run.close()


def _student_completions(student, params, prompts, eviction, max_new_tokens, width, mesh):
    """On-policy completions: the student's greedy generation under `eviction`."""
    model = _with_params(student, params)
    out = generate(model, prompts, eviction=eviction, max_new_tokens=max_new_tokens,
                   prompt_buckets=[width], mesh=mesh)
    return out.tokens


# ------------------------------------------------------------------------------ GRPO
def grpo(model, prompts, answers, grade_fn: Callable[[Any, Any], bool], config: GRPOConfig,
         *, run_dir, tokenizer=None, eval_fn: Callable[[Any, int], dict] | None = None,
         progress: bool = True, mesh=None):
    """GRPO (REINFORCE with a group baseline) on rollouts generated with the compressed cache.

    Each step draws `prompts_per_step` prompts, generates `group_size` rollouts of each with
    `generate(..., return_logprobs=True, return_eviction_record=True)` under
    `config.eviction`, grades them with `grade_fn(text or ids, answer) -> bool`, computes
    `group_advantages` (truncated rollouts never negative) and applies one `grpo_step` under
    each rollout's own record. The history records the reward, the loss, and the log-prob
    guard (max |Δ| between the step's recomputed sampler log-probs and generate's; a warning
    above 1e-4).

    Args:
      model: the `gkv_jax.Transformer` to train (a new one is returned).
      prompts: token-id lists (or strings with `tokenizer`). answers: one per prompt.
      grade_fn: `grade_fn(completion, answer) -> bool`; `completion` is the decoded text
        when a tokenizer is given, else the token ids.
      config: a `GRPOConfig`. run_dir, eval_fn, progress: as in `distill`.
      mesh: as in `distill` (the model's weights placed by the rule table, the rollouts
        generated with `generate(..., mesh=mesh)`, each update data- and model-parallel).

    Returns:
      (trained model, history).
    """
    if not isinstance(config, GRPOConfig):
        raise TypeError(f"config must be a GRPOConfig, got {type(config)}")
    if not callable(grade_fn):
        raise TypeError("grade_fn must be callable: grade_fn(completion, answer) -> bool")
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list")
    if len(answers) != len(prompts):
        raise ValueError(f"answers must have one entry per prompt ({len(prompts)}), got "
                         f"{len(answers)}")
    if all(isinstance(p, str) for p in prompts):
        if tokenizer is None:
            raise ValueError("prompts are strings: pass tokenizer= (or token-id lists)")
        prompt_ids = [list(tokenizer(p)["input_ids"]) for p in prompts]
    else:
        prompt_ids = [[int(t) for t in p] for p in prompts]
    run_dir = _check_run_dir(run_dir)
    mesh = _training_mesh(mesh, model)
    width = config.prompt_width or bucket_length(max(len(p) for p in prompt_ids), None)
    identity = _run_identity("grpo", config, _fingerprint(prompt_ids, list(map(str, answers))),
                             model.config)
    run = _Run(run_dir, identity)
    optimizer = make_optimizer(_optimizer_config(config), config.steps)
    params = jax.tree.map(jnp.copy, model.params())  # the steps donate their buffers
    opt_state = _init_opt_state(optimizer, params, mesh)
    start, params, opt_state = run.restore(params, opt_state)
    sampling = config.sampling
    if mesh is not None:  # host scalars: every process passes the same values
        sampling = jax.tree.map(np.asarray, sampling)
    bar = _progress(config.steps, start, progress, "grpo")
    try:
        for step in range(start, config.steps):
            started = time.perf_counter()
            rng = _step_rng(config.seed, step)
            chosen = rng.choice(len(prompt_ids), config.prompts_per_step,
                                replace=len(prompt_ids) < config.prompts_per_step)
            rollout_prompts = [prompt_ids[i] for i in chosen for _ in range(config.group_size)]
            current = _with_params(model, params)
            out = generate(current, rollout_prompts, tokenizer=tokenizer,
                           eviction=config.eviction, max_new_tokens=config.max_new_tokens,
                           temperature=config.temperature, top_p=config.top_p,
                           top_k=config.top_k, seed=int(rng.integers(2**31 - 1)),
                           prompt_buckets=[width], return_logprobs=True,
                           return_eviction_record=True, mesh=mesh)
            completions = out.texts if tokenizer is not None else out.tokens
            owners = np.repeat(chosen, config.group_size)
            rewards = np.asarray([float(bool(grade_fn(c, answers[i])))
                                  for i, c in zip(owners, completions, strict=True)],
                                 np.float32)
            rewards = rewards.reshape(config.prompts_per_step, config.group_size)
            truncated = np.asarray([len(t) == config.max_new_tokens
                                    and not _ends_with_eos(out, t) for t in out.tokens])
            advantages = group_advantages(rewards, truncated.reshape(rewards.shape))
            batch = _batch_from_generation(out, num_targets=config.max_new_tokens)
            advantages = advantages.reshape(-1)
            if mesh is not None:
                batch = shard_batch(batch, mesh)
            else:
                advantages = jnp.asarray(advantages)
            with _on_mesh(mesh):
                params, opt_state, metrics = grpo_step(
                    model.config, optimizer, params, opt_state, batch, advantages, sampling,
                    temperature=config.temperature, attention_impl=config.attention_impl,
                    chunk_rows=config.chunk_rows)
            metrics = _scalars(metrics)
            if metrics["guard"] > GUARD_WARN and jnp.dtype(model.dtype) == jnp.float32:
                warnings.warn(f"grpo step {step + 1}: log-prob guard {metrics['guard']:.2e} "
                              f"> {GUARD_WARN}: the training forward does not reproduce the "
                              f"rollouts' log-probs", stacklevel=2)
            entry = {"step": step + 1, "reward": float(rewards.mean()), **metrics,
                     "truncated": int(truncated.sum()),
                     "mean_length": float(np.mean([len(t) for t in out.tokens])),
                     "seconds": time.perf_counter() - started}
            _end_of_step(run, config, entry, params, opt_state, model, eval_fn, bar,
                         reward=f"{entry['reward']:.3f}", guard=f"{metrics['guard']:.1e}")
        return _finish(run, config, start, params, opt_state, model, eval_fn)
    finally:
        bar.close()
        run.close()


def _ends_with_eos(out, tokens) -> bool:
    """Whether a rollout stopped at an EOS (else it was cut at the length limit)."""
    return bool(tokens) and tokens[-1] in out.stats["eos_token_ids"]


__all__ = ["DistillConfig", "GRPOConfig", "OptimizerConfig", "RunDirError", "distill",
           "distill_step", "evaluation_callback", "grpo", "grpo_step", "make_optimizer"]
