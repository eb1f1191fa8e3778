"""Post-training losses under exact eviction masks: distillation and GRPO.

* `distill_loss`: T^2 * KL(teacher || student) over the response predictions at temperature
  T (0.6), the student under the batch's masks, the teacher (frozen, full attention) under
  `stop_gradient`; summed per sequence and averaged over the batch, or averaged per token.
* `group_advantages`: (r - mean) / (std(ddof=1) + 1e-8) within each prompt's group; a
  rollout cut at the length limit never gets a negative advantage.
* `grpo_loss`: -(1/N) sum_i A_i * mean_t log pi(y_it), logits divided by the rollout
  temperature, under each rollout's own record (REINFORCE with a group baseline, no ratio,
  no KL). Its auxiliary output carries the log-prob guard: from the same forward, the
  sampler's filtered log-probs against the ones `generate` reported.

Every loss has a pure `*_from_params` form over parameter dicts (jit-able, differentiable);
the LM head runs over row chunks (see `log_probs.map_row_chunks`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from gkv_jax.models.config import ModelConfig
from gkv_jax.models.transformer import lm_logits
from gkv_jax.sampling import SamplingParams, sampling_log_probs
from gkv_jax.training.batch import TeacherForcedBatch
from gkv_jax.training.log_probs import (
    DEFAULT_CHUNK_ROWS,
    _check_temperature,
    map_row_chunks,
    resolve_attention_impl,
    response_hidden,
)

REDUCTIONS = ("sum", "token_mean")
ADVANTAGE_EPS = 1e-8


def check_same_vocabulary(student_config: ModelConfig, teacher_config: ModelConfig) -> None:
    """Distillation compares distributions token by token: the vocabularies must match."""
    if student_config.vocab_size != teacher_config.vocab_size:
        raise ValueError(f"teacher: vocabulary of {teacher_config.vocab_size} tokens, the "
                         f"student's has {student_config.vocab_size}; distillation needs the "
                         f"same tokenizer")


def reduce_per_token(values: Float[Array, "B M"], mask: Bool[Array, "B M"],
                     reduction: str) -> Float[Array, ""]:
    """"sum": summed per sequence, averaged over the batch; "token_mean": averaged over
    every unmasked token."""
    values = jnp.where(mask, values, 0.0)
    if reduction == "sum":
        return jnp.sum(values) / values.shape[0]
    return jnp.sum(values) / jnp.maximum(jnp.sum(mask), 1)


def distill_loss_from_params(student_config: ModelConfig, student_params: dict,
                             teacher_config: ModelConfig, teacher_params: dict,
                             batch: TeacherForcedBatch, temperature: float = 0.6,
                             reduction: str = "sum", attention_impl: str = "dense",
                             chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Float[Array, ""]:
    """`distill_loss` on parameter dicts (the student's masks are `batch.visible_until`;
    None trains the student with full attention)."""
    kl = distill_token_kl(student_config, student_params, teacher_config, teacher_params,
                          batch, temperature, attention_impl, chunk_rows)
    return reduce_per_token(kl, batch.loss_mask, reduction)


def distill_token_kl(student_config: ModelConfig, student_params: dict,
                     teacher_config: ModelConfig, teacher_params: dict,
                     batch: TeacherForcedBatch, temperature: float = 0.6,
                     attention_impl: str = "dense", chunk_rows: int = DEFAULT_CHUNK_ROWS
                     ) -> Float[Array, "B M"]:
    """T^2 * KL(teacher || student) per response prediction, [B, M] (not masked)."""
    student = response_hidden(student_config, student_params, batch, attention_impl)
    teacher = response_hidden(teacher_config, jax.lax.stop_gradient(teacher_params),
                              batch.replace(visible_until=None))
    teacher = jax.lax.stop_gradient(teacher)

    def chunk_kl(student_rows, teacher_rows):
        student_log_p = jax.nn.log_softmax(
            lm_logits(student_config, student_params, student_rows[None])[0] / temperature)
        teacher_log_p = jax.nn.log_softmax(
            lm_logits(teacher_config, teacher_params, teacher_rows[None])[0] / temperature)
        teacher_log_p = jax.lax.stop_gradient(teacher_log_p)
        return jnp.sum(jnp.exp(teacher_log_p) * (teacher_log_p - student_log_p), axis=-1)

    return temperature ** 2 * map_row_chunks(chunk_kl, student, teacher,
                                             chunk_rows=chunk_rows)


def _check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def distill_loss(student, teacher, batch: TeacherForcedBatch, temperature: float = 0.6,
                 reduction: str = "sum", *, attention_impl: str | None = None,
                 chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Float[Array, ""]:
    """T^2 * KL(softmax(z_teacher / T) || softmax(z_student / T)) over the response
    predictions (the first one included; nothing after EOS), the student under the batch's
    masks and the teacher with full attention.

    Args:
      student, teacher: `gkv_jax.Transformer`s with the same vocabulary.
      batch: a `TeacherForcedBatch` (masks from `batch_from_generation` or a replay).
      temperature: T > 0 (0.6 as the G-KV paper).
      reduction: "sum" (per sequence, averaged over the batch) or "token_mean".
    """
    if not isinstance(batch, TeacherForcedBatch):
        raise TypeError(f"batch must be a TeacherForcedBatch, got {type(batch)}")
    check_same_vocabulary(student.config, teacher.config)
    impl = resolve_attention_impl(batch, attention_impl)
    return _distill_loss_jit(student.config, student.params(), teacher.config,
                             teacher.params(), batch, _check_temperature(temperature),
                             _check_reduction(reduction), impl, chunk_rows)


_distill_loss_jit = jax.jit(distill_loss_from_params, static_argnums=(0, 2, 5, 6, 7, 8))


def group_advantages(rewards, truncated=None) -> np.ndarray:
    """GRPO advantages within each prompt's group of rollouts.

    Args:
      rewards: [P, G] rewards (G >= 2 rollouts per prompt).
      truncated: [P, G] bool, rollouts cut at the length limit (no EOS); their advantage is
        clipped at 0 (never pushed down for running out of room). None: none truncated.

    Returns:
      [P, G] float32 (r - mean) / (std(ddof=1) + 1e-8); all-equal groups give 0.

    >>> [round(float(a), 3) for a in group_advantages([[1.0, 0.0, 0.0, 1.0]])[0]]
    [0.866, -0.866, -0.866, 0.866]
    """
    rewards = np.asarray(rewards, np.float64)
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [P, G] with G >= 2 rollouts per prompt, got shape "
                         f"{list(rewards.shape)}")
    if not np.isfinite(rewards).all():
        raise ValueError("rewards must be finite")
    mean = rewards.mean(axis=1, keepdims=True)
    std = rewards.std(axis=1, ddof=1, keepdims=True)
    advantages = (rewards - mean) / (std + ADVANTAGE_EPS)
    if truncated is not None:
        truncated = np.asarray(truncated, bool)
        if truncated.shape != rewards.shape:
            raise ValueError(f"truncated must have the shape of rewards {list(rewards.shape)}, "
                             f"got {list(truncated.shape)}")
        advantages = np.where(truncated, np.maximum(advantages, 0.0), advantages)
    return advantages.astype(np.float32)


def grpo_loss_from_params(config: ModelConfig, params: dict, batch: TeacherForcedBatch,
                          advantages: Float[Array, " B"], temperature: float = 0.8,
                          sampling: SamplingParams | None = None,
                          attention_impl: str = "dense",
                          chunk_rows: int = DEFAULT_CHUNK_ROWS
                          ) -> tuple[Float[Array, ""], dict[str, Array]]:
    """`grpo_loss` on a parameter dict; returns (loss, aux) with aux `mean_log_prob` [B]
    and, when `sampling` and `batch.reference_log_probs` are given, `guard` (max |filtered
    log-prob - generate's| over the response tokens) and `guard_per_row` [B]."""
    hidden = response_hidden(config, params, batch, attention_impl)

    def chunk_log_probs(rows, targets):
        logits = lm_logits(config, params, rows[None])[0]
        taken = jnp.take_along_axis(jax.nn.log_softmax(logits / temperature),
                                    targets[:, None], axis=-1)[:, 0]
        if sampling is None:
            return taken, jnp.zeros_like(taken)
        filtered = sampling_log_probs(jax.lax.stop_gradient(logits), sampling)
        return taken, jnp.take_along_axis(filtered, targets[:, None], axis=-1)[:, 0]

    log_probs, filtered = map_row_chunks(chunk_log_probs, hidden, batch.targets,
                                         chunk_rows=chunk_rows)
    mask = batch.loss_mask
    count = jnp.maximum(jnp.sum(mask, axis=1), 1)
    mean_log_prob = jnp.sum(jnp.where(mask, log_probs, 0.0), axis=1) / count
    loss = -jnp.mean(advantages * mean_log_prob)
    aux = {"mean_log_prob": mean_log_prob}
    if sampling is not None and batch.reference_log_probs is not None:
        delta = jnp.where(mask, jnp.abs(filtered - batch.reference_log_probs), 0.0)
        aux["guard_per_row"] = jnp.max(delta, axis=1)
        aux["guard"] = jnp.max(delta)
    return loss, aux


def grpo_loss(model, batch: TeacherForcedBatch, advantages, temperature: float = 0.8, *,
              sampling: SamplingParams | dict | None = None,
              attention_impl: str | None = None, chunk_rows: int = DEFAULT_CHUNK_ROWS
              ) -> tuple[Float[Array, ""], dict[str, Array]]:
    """-(1/N) sum_i A_i * mean_t log pi(y_it) under each rollout's record, with the logits
    divided by the rollout `temperature`; every response token counts (the first included,
    nothing after EOS).

    Args:
      model: a `gkv_jax.Transformer`.
      batch: the rollouts, `batch_from_generation(out)` of a generation with
        `return_eviction_record=True` (and `return_logprobs=True` for the guard).
      advantages: [B] one per rollout (`group_advantages(...).reshape(-1)` in row order).
      sampling: the rollouts' sampler (e.g. dict(temperature=0.8, top_p=0.95)); with it the
        aux output holds the log-prob guard against `batch.reference_log_probs`.

    Returns:
      (loss, aux): aux has `mean_log_prob` [B] and, with `sampling`, `guard`.
    """
    if not isinstance(batch, TeacherForcedBatch):
        raise TypeError(f"batch must be a TeacherForcedBatch, got {type(batch)}")
    advantages = jnp.asarray(advantages, jnp.float32)
    if advantages.shape != (batch.tokens.shape[0],):
        raise ValueError(f"advantages must be [B] = [{batch.tokens.shape[0]}], got "
                         f"{list(advantages.shape)}")
    if isinstance(sampling, dict):
        sampling = SamplingParams.create(**sampling)
    impl = resolve_attention_impl(batch, attention_impl)
    return _grpo_loss_jit(model.config, model.params(), batch, advantages,
                          _check_temperature(temperature), sampling, impl, chunk_rows)


_grpo_loss_jit = jax.jit(grpo_loss_from_params, static_argnums=(0, 6, 7))
