"""`gkv-jax post-train distill|grpo`: post-training for a compressed cache from the shell.

    gkv-jax post-train distill --model DIR --policy gkv --budget 68 --window 16 \\
        --divide-length 16 --steps 40 --batch-size 8 --learning-rate 1e-4 --output-dir OUT
    gkv-jax post-train grpo --model OUT/model --policy gkv --budget 68 --steps 30 \\
        --prompts-per-step 4 --group-size 8 --output-dir OUT2

Writes `OUT/model` (a Hugging Face checkpoint with the tokenizer: `gkv_jax.load` and
`transformers` read it), `OUT/run/` (run.json, history.jsonl and the Orbax checkpoints;
running the same command again resumes), and prints where they are. This module holds the
two commands and their flags; their training examples come from `post_train_data`, their
evaluations (the full-cache guard) from `post_train_guard`, and `post_train_run` keeps the
output directory.
"""

from __future__ import annotations

import argparse
import os

from gkv_jax.cli.args import (
    CommandError,
    HelpFormatter,
    comma_list,
    eviction_from_args,
    load_checkpoint,
    positive_int,
    require_tokenizer,
    seed_value,
)
from gkv_jax.cli.post_train_data import (
    SYNTHETIC_TRAIN_SEED,
    VALIDATION_SEED,
    _jsonl_pairs,
    synthetic_pairs,
)
from gkv_jax.cli.post_train_guard import (
    DEFAULT_SELECT_PROBLEMS,
    _eval_fn,
    _guard_line,
    _resolve_guard,
    _selection,
)
from gkv_jax.cli.post_train_run import (
    _check_output_dir,
    _export,
    _report_complete,
    _summary,
    _train,
)
from gkv_jax.datasets import SYNTHETIC_LOOKUPS
from gkv_jax.eviction import POLICIES, get_policy


def _learning_rate(config, model) -> str:
    """The learning rate a run will use, and where it came from."""
    from gkv_jax.training import recipe
    resolved, chosen = recipe.resolve(config, model.config)
    source = " (from the model's size)" if chosen else ""
    return f"learning rate {resolved.learning_rate:.3g}{source}"


def _cmd_distill(args: argparse.Namespace) -> int:
    from gkv_jax import training

    eviction = eviction_from_args(args)
    _resolve_guard(args)
    config = training.DistillConfig(
        eviction=eviction, steps=args.steps, batch_size=args.batch_size,
        learning_rate=args.learning_rate, temperature=args.temperature, seed=args.seed,
        schedule=args.schedule, warmup_ratio=args.warmup_ratio,
        weight_decay=args.weight_decay, clip_norm=args.clip_norm, reduction=args.reduction,
        budgets=tuple(args.budgets) if args.budgets else None,
        full_attention_share=args.full_attention_share, on_policy=args.on_policy,
        checkpoint_every=args.checkpoint_every, eval_every=args.eval_every, **_selection(args))
    model_dir, run_dir, complete = _check_output_dir(args.output_dir, args.steps)
    if args.dataset not in SYNTHETIC_LOOKUPS and not os.path.isfile(args.dataset):
        raise CommandError(f"--dataset must be 'synthetic', 'synthetic-chain' or a .jsonl "
                           f"file of prompt/completion pairs, got {args.dataset!r}")
    student, tokenizer = load_checkpoint(args.model, args.dtype)
    teacher = student
    if args.teacher is not None:
        teacher, _ = load_checkpoint(args.teacher, args.dtype, flag="--teacher")
    lines = None
    # a jsonl's held-out evaluation (--eval-problems) is the bundled task's
    eval_dataset = args.dataset if args.dataset in SYNTHETIC_LOOKUPS else "synthetic"
    if args.dataset in SYNTHETIC_LOOKUPS:
        require_tokenizer(tokenizer, args, "cannot encode synthetic problems")
        data = synthetic_pairs(tokenizer, args.num_examples, args.data_seed,
                               SYNTHETIC_LOOKUPS[args.dataset])
    else:
        data, lines = _jsonl_pairs(args.dataset, tokenizer, args.num_examples)
    print(f"distill: {len(data)} examples, {eviction.describe()}, {args.steps} steps of "
          f"{args.batch_size}, {_learning_rate(config, student)}\n{_guard_line(args)}")
    trained, history = _train(
        lambda: training.distill(student, teacher, data, config, run_dir=run_dir,
                                 eval_fn=_eval_fn(args, tokenizer, eval_dataset)),
        args, run_dir, lines)
    if complete:
        _report_complete(model_dir, args.steps)
        return 0
    _export(trained, tokenizer, model_dir)
    _summary(history, model_dir, run_dir)
    return 0


def _cmd_grpo(args: argparse.Namespace) -> int:
    from gkv_jax import grading, training
    from gkv_jax.datasets import load_dataset
    from gkv_jax.evaluation import format_prompts

    eviction = eviction_from_args(args)
    _resolve_guard(args)
    config = training.GRPOConfig(
        eviction=eviction, steps=args.steps, prompts_per_step=args.prompts_per_step,
        group_size=args.group_size, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        learning_rate=args.learning_rate, schedule=args.schedule,
        warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay,
        clip_norm=args.clip_norm, seed=args.seed, checkpoint_every=args.checkpoint_every,
        eval_every=args.eval_every, **_selection(args))
    model_dir, run_dir, complete = _check_output_dir(args.output_dir, args.steps)
    seed = args.data_seed if args.dataset in SYNTHETIC_LOOKUPS else 0
    examples = load_dataset(args.dataset, args.num_problems, seed=seed)
    model, tokenizer = load_checkpoint(args.model, args.dtype)
    require_tokenizer(tokenizer, args, "cannot encode the dataset's questions")
    prompts = format_prompts(examples, tokenizer)
    answers = [(e.kind, e.answer) for e in examples]

    def grade(text, answer):
        return grading.grade(answer[0], text, answer[1])

    print(f"grpo: {len(prompts)} prompts, {eviction.describe()}, {args.steps} steps of "
          f"{args.prompts_per_step} x {args.group_size} rollouts, "
          f"{_learning_rate(config, model)}\n{_guard_line(args)}")
    trained, history = _train(
        lambda: training.grpo(model, prompts, answers, grade, config, run_dir=run_dir,
                              tokenizer=tokenizer,
                              eval_fn=_eval_fn(args, tokenizer, args.dataset)),
        args, run_dir)
    if complete:
        _report_complete(model_dir, args.steps)
        return 0
    _export(trained, tokenizer, model_dir)
    rewards = [e["reward"] for e in history if "reward" in e]
    guards = [e["guard"] for e in history if "guard" in e]
    if rewards:
        print(f"reward {rewards[0]:.3f} -> {rewards[-1]:.3f}; log-prob guard max "
              f"{max(guards):.2e}")
    _summary(history, model_dir, run_dir)
    return 0


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="checkpoint to train: a local Hugging Face directory or a hub id")
    parser.add_argument("--output-dir", required=True,
                        help="writes OUT/model (HF checkpoint) and OUT/run (history, "
                             "checkpoints; the same command resumes)")
    parser.add_argument("--policy", default="gkv",
                        choices=[p for p in POLICIES if get_policy(p).evicts],
                        help="eviction policy trained for")
    parser.add_argument("--budget", type=int, required=True,
                        help="kept tokens per layer and KV head")
    parser.add_argument("--window", type=int, default=None,
                        help="observation window of snapkv, rkv and gkv (default: the "
                             "policy's)")
    parser.add_argument("--divide-length", type=int, default=None,
                        help="new tokens between compressions (default: the policy's)")
    parser.add_argument("--steps", type=int, required=True, help="optimizer steps")
    parser.add_argument("--learning-rate", type=float, default=None,
                        help="peak learning rate (default: derived from the model's size, "
                             "1e-4 at 3M parameters to 1e-6 from 1.5B up)")
    parser.add_argument("--warmup-ratio", type=float, default=0.05,
                        help="share of the steps spent warming the learning rate up")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    parser.add_argument("--clip-norm", type=float, default=1.0,
                        help="global gradient-norm clipping")
    parser.add_argument("--seed", type=seed_value, default=0,
                        help="training seed (batches, sampling)")
    parser.add_argument("--data-seed", type=int, default=SYNTHETIC_TRAIN_SEED,
                        help="synthetic problems' seed (0 is the held-out set)")
    parser.add_argument("--checkpoint-every", type=int, default=10,
                        help="steps between Orbax checkpoints (what a rerun resumes from)")
    parser.add_argument("--eval-problems", type=int, default=0,
                        help="held-out synthetic problems evaluated (full and the policy at "
                             "the budget) every --eval-every steps and at the end; 0: none")
    parser.add_argument("--select-problems", type=int, default=None,
                        help="validation problems evaluated before training, every "
                             "--eval-every steps and at the end; the run's model is the "
                             "evaluated step with the best accuracy under the policy whose "
                             "full-cache accuracy stays within --full-cache-tolerance of "
                             "before (before training included: no harm); 0: the last step "
                             f"(default: {DEFAULT_SELECT_PROBLEMS} where there are "
                             "validation problems: a synthetic task or --validation-dataset)")
    parser.add_argument("--validation-dataset", default=None,
                        help="what --select-problems evaluates (default: the synthetic "
                             f"task's problems of seed {VALIDATION_SEED}, neither trained on "
                             "nor held out)")
    parser.add_argument("--full-cache-tolerance", type=float, default=0.01,
                        help="full-cache accuracy a selected step may lose")
    parser.add_argument("--eval-every", type=int, default=None,
                        help="steps between evaluations; 0: only at the end (default: a "
                             "quarter of --steps while --select-problems is on, else 0)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="parameter dtype trained in")


def add_post_train_parser(commands) -> None:
    about = "distillation or GRPO under a compressed cache's masks"
    post = commands.add_parser("post-train", help=about, description=about,
                               formatter_class=HelpFormatter)
    kinds = post.add_subparsers(dest="method", required=True, metavar="METHOD",
                                title="methods")
    about = ("distil a full-attention teacher into a student trained under eviction (masks "
             "replayed every step)")
    distill = kinds.add_parser("distill", help=about, description=about,
                               formatter_class=HelpFormatter)
    _common(distill)
    distill.add_argument("--teacher", default=None,
                         help="teacher checkpoint (default: --model itself)")
    distill.add_argument("--dataset", default="synthetic",
                         help="synthetic or synthetic-chain (training problems) or a .jsonl "
                              "of prompt/completion")
    distill.add_argument("--num-examples", type=positive_int, default=512,
                         help="training examples drawn from --dataset")
    distill.add_argument("--batch-size", type=int, default=8, help="examples per step")
    distill.add_argument("--temperature", type=float, default=0.6,
                         help="temperature of the teacher's distribution")
    distill.add_argument("--schedule", default="cosine", choices=["cosine", "constant"],
                         help="learning-rate schedule after the warm-up")
    distill.add_argument("--reduction", default="sum", choices=["sum", "token_mean"],
                         help="how each sequence's token losses are combined")
    distill.add_argument("--budgets", type=comma_list(int), default=None,
                         help="sample each batch's budget from these (default: --budget)")
    distill.add_argument("--full-attention-share", type=float, default=0.0,
                         help="share of batches trained with the full cache")
    distill.add_argument("--on-policy", action="store_true",
                         help="the student generates the completions, the teacher scores them")
    distill.set_defaults(func=_cmd_distill)

    about = "GRPO on rollouts generated with the compressed cache"
    grpo = kinds.add_parser("grpo", help=about, description=about,
                            formatter_class=HelpFormatter)
    _common(grpo)
    grpo.add_argument("--dataset", default="synthetic",
                      help="synthetic, synthetic-chain, aime24, aime25, amc23, math500 or "
                           "a .jsonl")
    grpo.add_argument("--num-problems", type=positive_int, default=256,
                      help="training problems drawn from --dataset")
    grpo.add_argument("--prompts-per-step", type=int, default=4, help="prompts per step")
    grpo.add_argument("--group-size", type=int, default=8, help="rollouts per prompt")
    grpo.add_argument("--max-new-tokens", type=int, default=520,
                      help="generated tokens per rollout")
    grpo.add_argument("--temperature", type=float, default=0.8, help="rollout temperature")
    grpo.add_argument("--top-p", type=float, default=0.95, help="rollout nucleus mass")
    grpo.add_argument("--top-k", type=int, default=0, help="rollout top-k; 0 keeps every token")
    grpo.add_argument("--schedule", default="constant", choices=["cosine", "constant"],
                      help="learning-rate schedule after the warm-up")
    grpo.set_defaults(func=_cmd_grpo)
