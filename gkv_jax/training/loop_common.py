"""What the post-training loops `distill` and `grpo` share: the model rebuilt around trained
params, the mesh they train on, the optimizer state placed on it, the seeded per-step draws,
the progress bar, and the end of each step and of the run (JSONL history, Orbax checkpoints
every `checkpoint_every` steps, evaluations every `eval_every`; `gkv_jax.training.run_dir`
keeps them). `evaluation_callback` builds the optional `eval_fn` both loops take.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from gkv_jax.generation import resolve_mesh
from gkv_jax.sharding.placement import placed_mesh
from gkv_jax.training.run_dir import RunDir
from gkv_jax.training.selection import Selection


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


def _record_recipe(run: RunDir, start: int, chosen: dict) -> None:
    """Logs the values the recipe chose for the model (`recipe.resolve`) as the history's
    step-0 entry, once per run."""
    if chosen and start == 0 and not any("recipe" in e for e in run.history()):
        run.log({"step": 0, "recipe": chosen})


def _step_rng(seed: int, step: int) -> np.random.Generator:
    """The draws of step `step`: they depend only on (seed, step), which makes a resume
    exact."""
    return np.random.default_rng([seed, step])


def _progress(total: int, initial: int, enabled: bool, label: str):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, desc=label,
                dynamic_ncols=True)


def _scalars(metrics: dict) -> dict:
    return {k: float(v) for k, v in metrics.items()}


def _check_select_by(config, eval_fn) -> None:
    if config.select_by and eval_fn is None:
        raise ValueError(f"select_by={config.select_by!r} chooses among evaluations: pass an "
                         f"eval_fn (e.g. training.evaluation_callback(...)) that returns it")


def _start_selection(run: RunDir, config, start: int, params, opt_state, model, eval_fn):
    """The run's `Selection` (None without `config.select_by`): a new run evaluates the
    model before its first update (step 0, logged); a resumed one rebuilds its best from the
    history."""
    if not config.select_by:
        return None
    selection = Selection(run, config.select_by, config.full_cache_tolerance)
    if start == 0 and not os.path.isdir(selection.path(0)):
        _evaluate(run, 0, params, opt_state, model, eval_fn, selection)
    else:
        selection.resume(run.history())
    return selection


def _evaluate(run: RunDir, step: int, params, opt_state, model, eval_fn, selection,
              checkpoint: bool = True) -> None:
    """Runs `eval_fn` at `step` into the history (then offers it to the selection: a crash
    between the two leaves an evaluation that the resume drops with its step)."""
    evaluation = eval_fn(_with_params(model, params, copy=True), step)
    run.log({"step": step, "eval": evaluation})
    if selection is not None:
        selection.offer(step, evaluation, params, opt_state, checkpoint=checkpoint)


def _end_of_step(run: RunDir, config, entry: dict, params, opt_state, model, eval_fn, bar,
                 selection=None, **postfix) -> None:
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
        _evaluate(run, done, params, opt_state, model, eval_fn, selection)


def _finish(run: RunDir, config, start: int, params, opt_state, model, eval_fn,
            selection=None):
    """The final checkpoint and evaluation (none when resuming a finished run); returns
    (trained model, history). With a selection, the model is its best evaluated step's."""
    if start < config.steps:
        run.save(config.steps, params, opt_state)
        if eval_fn is not None:
            _evaluate(run, config.steps, params, opt_state, model, eval_fn, selection,
                      checkpoint=False)
    if selection is not None:
        params = selection.best_params(params, config.steps)
        if start < config.steps:
            run.log({"step": config.steps, "selection": selection.summary()})
    return _with_params(model, params), run.history()


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

__all__ = ["evaluation_callback"]
