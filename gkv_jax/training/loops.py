"""Post-training loops: `distill` and `grpo` under exact eviction masks.

`distill(student, teacher, data, DistillConfig(...), run_dir=...)` and
`grpo(model, prompts, answers, grade_fn, GRPOConfig(...), run_dir=...)` are seeded loops over
the jitted steps of `gkv_jax.training.steps`, with Orbax checkpoints every `checkpoint_every`
steps, an exact resume after an interruption (the batch of step s depends only on the seed
and s), a JSONL history, a progress bar and an optional evaluation callback. Both return the
trained model and the history. Their inputs are checked (`gkv_jax.training.inputs`) before
the run directory is claimed (`gkv_jax.training.run_dir`). With `mesh=` they run data- and
model-parallel on a ("data", "model") mesh by the rule table of `gkv_jax.sharding`
(`shard_batch` places each batch).

Distillation masks are replayed every step with the student's current parameters
(`replay_from_params`); GRPO trains each rollout under its own generation record.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from gkv_jax.engine import Engine, as_generate_output
from gkv_jax.generation import bucket_length, generate, padded_batch_size, resolve_mesh
from gkv_jax.sharding.placement import placed_mesh
from gkv_jax.training.batch import batch_from_completions, shard_batch
from gkv_jax.training.batch import batch_from_generation as _batch_from_generation
from gkv_jax.training.configs import DistillConfig, GRPOConfig, make_optimizer, optimizer_config
from gkv_jax.training.inputs import distill_pairs, grpo_prompt_ids
from gkv_jax.training.losses import check_same_vocabulary, group_advantages
from gkv_jax.training.run_dir import RunDir, check_run_dir, fingerprint, run_identity
from gkv_jax.training.steps import distill_step, grpo_step

GUARD_WARN = 1e-4


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


def _end_of_step(run: RunDir, config, entry: dict, params, opt_state, model, eval_fn, bar,
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


def _finish(run: RunDir, config, start: int, params, opt_state, model, eval_fn):
    """The final checkpoint and evaluation (none when resuming a finished run); returns
    (trained model, history)."""
    trained = _with_params(model, params)
    if start < config.steps:
        run.save(config.steps, params, opt_state)
        if eval_fn is not None:
            run.log({"step": config.steps, "eval": eval_fn(trained, config.steps)})
    return trained, run.history()


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
                         reward=f"{entry['reward']:.3f}", guard=f"{metrics['guard']:.1e}")
        return _finish(run, config, start, params, opt_state, model, eval_fn)
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


__all__ = ["distill", "evaluation_callback", "grpo"]
