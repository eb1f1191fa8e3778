"""`gkv-jax eval`: accuracy of eviction policies and budgets on a dataset (resumable).

    gkv-jax eval --model DIR --dataset aime24 --policies full,gkv --budgets 512,1024

Everything that can be checked without the model is checked first (`check_eval_args`);
`gkv_jax.evaluate` then writes results.jsonl, summary.csv, settings.json and the plot into
--output-dir, keeping the rows already there.
"""

from __future__ import annotations

import argparse

from gkv_jax.cli.args import (
    SEED_LIMIT,
    CommandError,
    HelpFormatter,
    _add_dtype_arg,
    _add_mesh_arg,
    _add_sampling_args,
    check_sampling,
    comma_list,
    load_checkpoint,
    mesh_from_args,
    positive_int,
    require_tokenizer,
)
from gkv_jax.eviction import POLICIES


def check_eval_args(args: argparse.Namespace) -> None:
    """Everything `eval` can check without the model: policies, budgets and knobs, sampling
    values, seeds, the dataset (its name, or the file's lines) and --output-dir (new, empty
    or an evaluation's own)."""
    from gkv_jax.datasets import load_dataset
    from gkv_jax.evaluation import eviction_configs, output_dir_problem

    eviction_configs(args.policies, args.budgets, args.window, args.divide_length)
    check_sampling(args)
    if args.seed + args.samples - 1 >= SEED_LIMIT:  # sample s runs with seed + s
        raise CommandError(f"--seed: --seed + --samples - 1 must be below {SEED_LIMIT}, "
                           f"got {args.seed} + {args.samples} - 1")
    try:
        load_dataset(args.dataset, args.num_problems)
    except UnicodeDecodeError as err:
        raise CommandError(f"--dataset: {args.dataset} is not UTF-8 text ({err})") from err
    problem = output_dir_problem(args.output_dir)
    if problem is not None:
        raise CommandError(f"--output-dir: {problem}")


def _cmd_eval(args: argparse.Namespace) -> int:
    from gkv_jax.evaluation import evaluate

    check_eval_args(args)
    mesh = mesh_from_args(args)
    model, tokenizer = load_checkpoint(args.model, args.dtype, mesh=mesh)
    require_tokenizer(tokenizer, args, "cannot encode the dataset's questions")
    evaluate(model, tokenizer, args.dataset, policies=args.policies, budgets=args.budgets,
             window=args.window, divide_length=args.divide_length,
             num_problems=args.num_problems, samples=args.samples, pass_k=args.pass_k,
             max_new_tokens=args.max_new_tokens, temperature=args.temperature,
             top_p=args.top_p, top_k=args.top_k, seed=args.seed, batch_size=args.batch_size,
             output_dir=args.output_dir, progress=True)
    return 0


def add_eval_parser(commands) -> None:
    about = "accuracy of eviction policies and budgets on a dataset (resumable)"
    evaluation = commands.add_parser("eval", help=about, description=about,
                                     formatter_class=HelpFormatter)
    evaluation.add_argument("--model", required=True,
                            help="checkpoint: a local Hugging Face directory or a hub id")
    evaluation.add_argument("--dataset", default="synthetic",
                            help="synthetic, synthetic-chain, aime24, aime25, amc23, math500 or a "
                                 ".jsonl path")
    evaluation.add_argument("--policies", type=comma_list(str), default=["full", "gkv"],
                            help=f"comma-separated, from {', '.join(POLICIES)}")
    evaluation.add_argument("--budgets", type=comma_list(int), default=[128],
                            help="comma-separated kept tokens per layer and KV head (full "
                                 "ignores them)")
    evaluation.add_argument("--window", type=int, default=None,
                            help="observation window of snapkv, rkv and gkv (default: the "
                                 "policy's)")
    evaluation.add_argument("--divide-length", type=int, default=None,
                            help="new tokens between compressions (default: the policy's)")
    evaluation.add_argument("--num-problems", type=positive_int, default=None,
                            help="the first N problems (default: all; synthetic: 200)")
    evaluation.add_argument("--samples", type=positive_int, default=1,
                            help="generations per problem; sample s uses seed + s")
    evaluation.add_argument("--pass-k", type=comma_list(positive_int), default=[1],
                            help="comma-separated k of pass@k (those above --samples skipped)")
    evaluation.add_argument("--max-new-tokens", type=positive_int, default=None,
                            help="generated tokens per problem (default: 520 for synthetic, "
                                 "16384 for math, capped at the context)")
    _add_sampling_args(evaluation)
    evaluation.add_argument("--batch-size", type=positive_int, default=16,
                            help="rows decoded together: the slot engine's slots (a finished "
                                 "row's slot takes the next row at once)")
    evaluation.add_argument("--output-dir", default="runs/eval",
                            help="results.jsonl, summary.csv, settings.json and the plot; "
                                 "rows already there are kept (the same command resumes)")
    _add_dtype_arg(evaluation)
    _add_mesh_arg(evaluation)
    evaluation.set_defaults(func=_cmd_eval)
