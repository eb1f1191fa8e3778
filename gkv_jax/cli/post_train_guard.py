"""The evaluations of a `gkv-jax post-train` run: the full-cache guard (--select-problems on
validation problems, on by default where there are some) and the held-out record
(--eval-problems), as the run's `eval_fn` and its `DistillConfig` / `GRPOConfig` fields."""

from __future__ import annotations

import os

from gkv_jax.cli.args import CommandError, eviction_from_args
from gkv_jax.cli.post_train_data import VALIDATION_SEED
from gkv_jax.datasets import SYNTHETIC_LOOKUPS

# Validation problems of the full-cache guard by default: a one-point tolerance is one problem.
DEFAULT_SELECT_PROBLEMS = 100


def _eval_fn(args, tokenizer, dataset):
    """The run's `eval_fn`: --select-problems N validation problems (keys "full",
    "<policy>@<budget>": what --select-problems chooses by) and --eval-problems N held-out
    ones (the same keys prefixed "held-out "), every --eval-every steps and at the end, into
    the history and OUT/run/eval/; None when neither is asked for."""
    from gkv_jax import training
    eviction = eviction_from_args(args)

    def callback(examples, count, folder):
        return training.evaluation_callback(
            tokenizer, examples, policies=("full", eviction.policy),
            budgets=(eviction.budget,), window=args.window, divide_length=args.divide_length,
            num_problems=count, batch_size=min(count, 40),
            output_dir=os.path.join(args.output_dir, "run", folder))

    validate = held_out = None
    if args.select_problems:
        validate = callback(_validation_examples(args), args.select_problems, "validation")
    if args.eval_problems:
        held_out = callback(dataset, args.eval_problems, "eval")
    if validate is None or held_out is None:
        return validate or held_out

    def both(model, step):
        scores = validate(model, step)
        scores.update({f"held-out {k}": v for k, v in held_out(model, step).items()})
        return scores

    return both


def _validation_examples(args):
    """The problems --select-problems chooses on: --validation-dataset, else, for a
    synthetic task, its problems of `VALIDATION_SEED` (neither trained on nor held out)."""
    from gkv_jax.datasets import load_dataset, synthetic_examples
    if args.validation_dataset is not None:
        return load_dataset(args.validation_dataset, args.select_problems)
    return synthetic_examples(args.select_problems, VALIDATION_SEED, name=args.dataset)


def _has_validation(args) -> bool:
    """Whether the run has validation problems: --validation-dataset, or a synthetic task's
    own."""
    return args.validation_dataset is not None or args.dataset in SYNTHETIC_LOOKUPS


def _resolve_guard(args) -> None:
    """Fills in the defaults of the full-cache guard: --select-problems is
    `DEFAULT_SELECT_PROBLEMS` where there are validation problems (a synthetic task's own, or
    --validation-dataset), else 0; --eval-every is a quarter of the steps while the guard is
    on (so it chooses among five evaluated steps, before training included), else 0."""
    if args.select_problems is None:
        args.select_problems = DEFAULT_SELECT_PROBLEMS if _has_validation(args) else 0
    if args.eval_every is None:
        args.eval_every = max(1, args.steps // 4) if args.select_problems > 0 else 0


def _guard_line(args) -> str:
    """What the run prints about the full-cache guard."""
    if args.select_problems:
        return (f"full-cache guard: {args.select_problems} validation problems every "
                f"{args.eval_every} steps (--select-problems 0: off)")
    if not _has_validation(args):
        return ("no full-cache guard: the last step is the model (--validation-dataset "
                "NAME_OR_JSONL turns it on)")
    return "no full-cache guard (--select-problems 0): the last step is the model"


def _selection(args) -> dict:
    """DistillConfig / GRPOConfig fields of --select-problems (checked before anything is
    written)."""
    if args.select_problems < 0:
        raise CommandError(f"--select-problems must be >= 0, got {args.select_problems}")
    if not args.select_problems:
        return {}
    if not _has_validation(args):
        raise CommandError(f"--select-problems: give --validation-dataset (a dataset name or "
                           f".jsonl of question/answer) for --dataset {args.dataset!r}; only "
                           f"the synthetic tasks have validation problems of their own")
    try:  # a bad validation set fails now, not at the first evaluation
        _validation_examples(args)
    except (ValueError, FileNotFoundError) as err:
        raise CommandError(f"--validation-dataset: {err}") from None
    eviction = eviction_from_args(args)
    return {"select_by": f"{eviction.policy}@{eviction.budget}",
            "full_cache_tolerance": args.full_cache_tolerance}
