"""The distillation loop: `distill(student, teacher, data, DistillConfig(...), run_dir=...)`.

A seeded loop over `gkv_jax.training.steps.distill_step`: the student learns, under
`config.eviction`, the distribution of a frozen full-attention teacher. Distillation masks are
replayed every step with the student's current parameters (`replay_from_params`); with
`config.on_policy` the student generates the completions it is trained on. Its inputs are
checked (`gkv_jax.training.inputs`) before the run directory is claimed
(`gkv_jax.training.run_dir`); checkpoints, exact resume, history, progress and evaluations
follow `gkv_jax.training.loop_common`. With `mesh=` it runs data- and model-parallel on a
("data", "model") mesh by the rule table of `gkv_jax.sharding` (`shard_batch` places each
batch).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from gkv_jax.generation import generate
from gkv_jax.generation_inputs import bucket_length
from gkv_jax.training import recipe
from gkv_jax.training.batch import batch_from_completions, shard_batch
from gkv_jax.training.configs import DistillConfig, make_optimizer, optimizer_config
from gkv_jax.training.inputs import distill_pairs
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
    _with_params,
)
from gkv_jax.training.losses import check_same_vocabulary
from gkv_jax.training.run_dir import RunDir, check_run_dir, fingerprint, run_identity
from gkv_jax.training.steps import distill_step


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
    config, chosen = recipe.resolve(config, student.config)
    _check_select_by(config, eval_fn)
    budgets = config.budgets or (config.eviction.budget,)
    # The shorter context of the two bounds the sequences (both share the vocabulary).
    bounding = min(student.config, teacher.config, key=lambda c: c.max_position_embeddings)
    pairs = distill_pairs(data, config.eviction, budgets, bounding,
                          num_targets=config.max_new_tokens if config.on_policy else None)
    run = RunDir(check_run_dir(run_dir), run_identity("distill", config, fingerprint(pairs),
                                                      student.config))
    run.check()
    mesh = _training_mesh(mesh, student, teacher)
    width = bucket_length(max(len(p) for p, _ in pairs), None)
    num_targets = config.max_new_tokens or max(len(c) for _, c in pairs)
    optimizer = make_optimizer(optimizer_config(config), config.steps)
    run.open()  # every check passed: claim run_dir
    params = jax.tree.map(jnp.copy, student.params())  # the steps donate their buffers
    opt_state = _init_opt_state(optimizer, params, mesh)
    start, params, opt_state = run.restore(params, opt_state)
    _record_recipe(run, start, chosen)
    selection = _start_selection(run, config, start, params, opt_state, student, eval_fn)
    teacher_params = teacher.params()
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
                         selection, loss=f"{entry['loss']:.4f}")
        return _finish(run, config, start, params, opt_state, student, eval_fn, selection)
    finally:
        bar.close()
        run.close()


def _student_completions(student, params, prompts, eviction, max_new_tokens, width, mesh):
    """On-policy completions: the student's greedy generation under `eviction`."""
    model = _with_params(student, params)
    out = generate(model, prompts, eviction=eviction, max_new_tokens=max_new_tokens,
                   prompt_buckets=[width], mesh=mesh)
    return out.tokens


__all__ = ["distill"]
