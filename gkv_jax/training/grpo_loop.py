"""The GRPO loop: `grpo(model, prompts, answers, grade_fn, GRPOConfig(...), run_dir=...)`.

A seeded loop over `gkv_jax.training.steps.grpo_step`: each step generates groups of rollouts
with the compressed cache on a `gkv_jax.Engine`, grades them, and trains each rollout under
its own generation record (the exact masks it was generated with), with a guard that the
training forward reproduces the rollouts' log-probs. Its inputs are checked
(`gkv_jax.training.inputs`) before the run directory is claimed (`gkv_jax.training.run_dir`);
checkpoints, exact resume, history, progress and evaluations follow
`gkv_jax.training.loop_common`. With `mesh=` it runs data- and model-parallel on a
("data", "model") mesh by the rule table of `gkv_jax.sharding`.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gkv_jax.engine import Engine, as_generate_output
from gkv_jax.generation import padded_batch_size
from gkv_jax.generation_inputs import bucket_length
from gkv_jax.training import recipe
from gkv_jax.training.batch import batch_from_generation as _batch_from_generation
from gkv_jax.training.batch import shard_batch
from gkv_jax.training.configs import GRPOConfig, make_optimizer, optimizer_config
from gkv_jax.training.inputs import grpo_prompt_ids
from gkv_jax.training.loop_common import (
    _check_select_by,
    _end_of_step,
    _finish,
    _init_opt_state,
    _on_mesh,
    _progress,
    _record_recipe,
    _scalars,
    _start_selection,
    _step_rng,
    _training_mesh,
)
from gkv_jax.training.losses import group_advantages
from gkv_jax.training.run_dir import RunDir, check_run_dir, fingerprint, run_identity
from gkv_jax.training.steps import grpo_step

GUARD_WARN = 1e-4


def grpo(model, prompts, answers, grade_fn: Callable[[Any, Any], bool], config: GRPOConfig,
         *, run_dir, tokenizer=None, eval_fn: Callable[[Any, int], dict] | None = None,
         progress: bool = True, mesh=None):
    """GRPO (REINFORCE with a group baseline) on rollouts generated with the compressed cache.

    Each step draws `prompts_per_step` prompts and generates `group_size` rollouts of each
    under `config.eviction` on a `gkv_jax.Engine` (one prefill per prompt, its group
    inserted `group_size` times; rollout b of the step draws with seed `s + b` for the step's
    seed s, so the rollouts equal `generate` of the repeated prompts with seed s, records and
    log-probs included). It grades them with `grade_fn(text or ids, answer) -> bool`,
    computes `group_advantages` (truncated rollouts never negative) and applies one
    `grpo_step` under each rollout's own record. The history records the reward, the loss,
    the prompts prefilled, and the log-prob guard (max |Δ| between the step's recomputed
    sampler log-probs and the rollouts'; a warning above 1e-4).

    Args:
      model: the `gkv_jax.Transformer` to train (a new one is returned).
      prompts: token-id lists (or strings with `tokenizer`). answers: one per prompt.
      grade_fn: `grade_fn(completion, answer) -> bool`; `completion` is the decoded text
        when a tokenizer is given, else the token ids.
      config: a `GRPOConfig`. run_dir, eval_fn, progress: as in `distill`.
      mesh: as in `distill` (the model's weights placed by the rule table, the engine's
        slots over `data`, each update data- and model-parallel).

    Returns:
      (trained model, history).
    """
    if not isinstance(config, GRPOConfig):
        raise TypeError(f"config must be a GRPOConfig, got {type(config)}")
    if not callable(grade_fn):
        raise TypeError("grade_fn must be callable: grade_fn(completion, answer) -> bool")
    config, chosen = recipe.resolve(config, model.config)
    _check_select_by(config, eval_fn)
    prompt_ids = grpo_prompt_ids(prompts, tokenizer, config.eviction, config.max_new_tokens,
                                 model.config)
    if isinstance(answers, str) or not isinstance(answers, Sequence) \
            or len(answers) != len(prompt_ids):
        raise ValueError(f"answers must have one entry per prompt ({len(prompt_ids)}), got "
                         f"{_count(answers)}")
    longest = max(len(p) for p in prompt_ids)
    if config.prompt_width is not None and config.prompt_width < longest:
        raise ValueError(f"prompt_width: GRPOConfig.prompt_width {config.prompt_width} is "
                         f"below the longest prompt ({longest} tokens)")
    width = config.prompt_width or bucket_length(longest, None)
    run = RunDir(check_run_dir(run_dir), run_identity(
        "grpo", config, fingerprint(prompt_ids, list(map(str, answers))), model.config))
    run.check()
    mesh = _training_mesh(mesh, model)
    optimizer = make_optimizer(optimizer_config(config), config.steps)
    run.open()  # every check passed: claim run_dir
    params = jax.tree.map(jnp.copy, model.params())  # the steps donate their buffers
    opt_state = _init_opt_state(optimizer, params, mesh)
    start, params, opt_state = run.restore(params, opt_state)
    _record_recipe(run, start, chosen)
    selection = _start_selection(run, config, start, params, opt_state, model, eval_fn)
    sampling = config.sampling
    if mesh is not None:  # host scalars: every process passes the same values
        sampling = jax.tree.map(np.asarray, sampling)
    rollouts = config.prompts_per_step * config.group_size
    # Rollouts run on the slot engine: one prefill per prompt, its group inserted G times.
    engine = Engine(model, tokenizer, config.eviction,
                    slots=padded_batch_size(rollouts, mesh),
                    max_new_tokens=config.max_new_tokens, max_prompt_length=width,
                    prefill_batch=config.prompts_per_step, prompt_buckets=[width], record=True,
                    mesh=mesh)
    bar = _progress(config.steps, start, progress, "grpo")
    try:
        for step in range(start, config.steps):
            started = time.perf_counter()
            rng = _step_rng(config.seed, step)
            chosen = rng.choice(len(prompt_ids), config.prompts_per_step,
                                replace=len(prompt_ids) < config.prompts_per_step)
            out, prefills = _rollouts(engine, params, [prompt_ids[i] for i in chosen], config,
                                      seed=int(rng.integers(2**31 - 1)), width=width)
            completions = out.texts if tokenizer is not None else out.tokens
            owners = np.repeat(chosen, config.group_size)
            rewards = np.asarray([_reward(grade_fn(c, answers[i]), n) for n, (i, c) in
                                  enumerate(zip(owners, completions, strict=True))], np.float32)
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
                     "prefills": prefills,
                     "truncated": int(truncated.sum()),
                     "mean_length": float(np.mean([len(t) for t in out.tokens])),
                     "seconds": time.perf_counter() - started}
            _end_of_step(run, config, entry, params, opt_state, model, eval_fn, bar,
                         selection, reward=f"{entry['reward']:.3f}",
                         guard=f"{metrics['guard']:.1e}")
        return _finish(run, config, start, params, opt_state, model, eval_fn, selection)
    finally:
        bar.close()
        run.close()


def _rollouts(engine: Engine, params, prompts, config: GRPOConfig, *, seed: int, width: int):
    """The step's rollouts, `group_size` per prompt, through the engine with the current
    `params`: rollout b (prompt b // G, sample b % G) draws with seed `seed + b`, so they equal
    `generate` of the repeated prompts with `seed`. Returns (a `GenerateOutput` of the
    rollouts, with their records and log-probs; the prompts prefilled)."""
    engine.load_params(params)
    before = engine.stats["prefills"]
    G = config.group_size
    ids = [engine.submit_group(prompt, [seed + k * G + g for g in range(G)],
                               temperature=config.temperature, top_p=config.top_p,
                               top_k=config.top_k)
           for k, prompt in enumerate(prompts)]
    outputs = engine.run()
    out = as_generate_output([outputs[i] for group in ids for i in group], prompt_bucket=width,
                             eos_ids=engine.default_eos, eviction=config.eviction)
    return out, engine.stats["prefills"] - before


def _count(answers) -> str:
    return str(len(answers)) if isinstance(answers, Sequence) \
        and not isinstance(answers, str) else type(answers).__name__


def _reward(value, index: int) -> float:
    """1.0 / 0.0 for a grade of True / False; anything else is refused (a string such as
    "no" would otherwise count as correct)."""
    if isinstance(value, bool | np.bool_):
        return float(value)
    raise TypeError(f"grade_fn must return a bool (True for a correct completion), got "
                    f"{value!r} ({type(value).__name__}) for rollout {index}")


def _ends_with_eos(out, tokens) -> bool:
    """Whether a rollout stopped at an EOS (else it was cut at the length limit)."""
    return bool(tokens) and tokens[-1] in out.stats["eos_token_ids"]


__all__ = ["grpo"]
