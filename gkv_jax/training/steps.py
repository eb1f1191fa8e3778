"""The jitted, pure update steps of post-training, which users can call in their own loops:
`distill_step` (distillation under the masks the student's own parameters give) and
`grpo_step` (REINFORCE with a group baseline under each rollout's recorded masks). AdamW with
clipping; configs and the optimizer are static arguments."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from gkv_jax.eviction import EvictionConfig
from gkv_jax.models.config import ModelConfig
from gkv_jax.sampling import SamplingParams
from gkv_jax.sharding.mesh import active_mesh
from gkv_jax.sharding.rules import param_specs
from gkv_jax.training.batch import TeacherForcedBatch
from gkv_jax.training.log_probs import DEFAULT_CHUNK_ROWS
from gkv_jax.training.losses import distill_token_kl, grpo_loss_from_params, reduce_per_token
from gkv_jax.training.replay import replay_from_params


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
        # the loss spikes of distillation under eviction are single predictions the
        # student cannot make without an evicted token: their largest KL is logged
        max_kl = jnp.max(jnp.where(mask, kl, 0.0))
        if full_batch is not None:
            full_kl = distill_token_kl(student_config, p, teacher_config, teacher_params,
                                       full_batch.replace(visible_until=None), temperature,
                                       "dense", chunk_rows)
            kl = jnp.concatenate([kl, full_kl])
            mask = jnp.concatenate([mask, full_batch.loss_mask])
        if padding and reduction == "sum":  # per sequence, averaged over the real rows
            return _row_mean(jnp.where(mask, kl, 0.0), kl.shape[0] - padding), max_kl
        return reduce_per_token(kl, mask, reduction), max_kl

    padding = batch.padding_rows + (full_batch.padding_rows if full_batch is not None else 0)
    (loss, max_kl), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    params, opt_state = _keep_rule_layout(student_config, params, opt_state)
    return params, opt_state, {"loss": loss, "grad_norm": _global_norm(grads),
                               "max_token_kl": max_kl}


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
`loss` (T^2 KL, reduced as `reduction`), `grad_norm` (before clipping), `max_token_kl` (the
largest single prediction's T^2 KL under eviction).

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
