"""`gkv-jax post-train distill|grpo`: post-training for a compressed cache from the shell.

    gkv-jax post-train distill --model DIR --policy gkv --budget 68 --window 16 \\
        --divide-length 16 --steps 40 --batch-size 8 --learning-rate 1e-4 --output-dir OUT
    gkv-jax post-train grpo --model OUT/model --policy gkv --budget 68 --steps 30 \\
        --prompts-per-step 4 --group-size 8 --output-dir OUT2

Writes `OUT/model` (a Hugging Face checkpoint with the tokenizer: `gkv_jax.load` and
`transformers` read it), `OUT/run/` (run.json, history.jsonl and the Orbax checkpoints;
running the same command again resumes), and prints where they are.
"""

from __future__ import annotations

import argparse
import json
import os

from gkv_jax.eviction import POLICIES, EvictionConfig

SYNTHETIC_TRAIN_SEED = 1  # training problems; seed 0 is the held-out set


def synthetic_pairs(tokenizer, count: int, seed: int = SYNTHETIC_TRAIN_SEED
                    ) -> list[tuple[list[int], list[int]]]:
    """(BOS + prompt, trace + answer + EOS) token ids of `count` table-walk problems drawn
    from `seed`, none of them among the held-out problems."""
    from gkv_jax import synthetic
    from gkv_jax.datasets import HELD_OUT_SEED

    if seed == HELD_OUT_SEED:
        raise ValueError(f"seed: {HELD_OUT_SEED} draws the held-out problems; train on another")
    held_out = {(p.table, p.order, p.start) for p in synthetic.problems(HELD_OUT_SEED, 1000)}
    pairs: list[tuple[list[int], list[int]]] = []
    draw = 0
    while len(pairs) < count:
        for problem in synthetic.problems(seed + 7919 * draw, 2 * count):
            if (problem.table, problem.order, problem.start) in held_out:
                continue
            prompt = [tokenizer.bos_token_id] + tokenizer(problem.prompt)["input_ids"]
            completion = tokenizer(problem.completion)["input_ids"] + [tokenizer.eos_token_id]
            pairs.append((prompt, completion))
            if len(pairs) == count:
                break
        draw += 1
    return pairs


def _jsonl_pairs(path: str, tokenizer, count: int | None):
    """(prompt, completion) pairs of a JSON-lines file: `prompt_ids` / `completion_ids`
    lists, or `prompt` / `completion` texts (tokenized with the model's tokenizer)."""
    pairs = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"--dataset: {path} line {number} is not JSON ({err})") from None
            if "prompt_ids" in row and "completion_ids" in row:
                pairs.append((row["prompt_ids"], row["completion_ids"]))
            elif "prompt" in row and "completion" in row:
                pairs.append((tokenizer(row["prompt"])["input_ids"],
                              tokenizer(row["completion"])["input_ids"]))
            else:
                raise ValueError(f"--dataset: {path} line {number} needs prompt/completion "
                                 f"(texts) or prompt_ids/completion_ids")
            if count is not None and len(pairs) == count:
                break
    return pairs


def _eviction(args) -> EvictionConfig:
    knobs = {"budget": args.budget, "window": args.window,
             "divide_length": args.divide_length}
    return EvictionConfig(policy=args.policy, **{k: v for k, v in knobs.items()
                                                 if v is not None})


def _check_output_dir(output_dir: str) -> tuple[str, str]:
    """OUT/model must not hold a model yet (never overwritten); OUT/run resumes."""
    model_dir = os.path.join(output_dir, "model")
    if os.path.isdir(model_dir) and os.listdir(model_dir):
        raise ValueError(f"--output-dir: {model_dir} already holds a model; choose another "
                         f"--output-dir (nothing is overwritten)")
    return model_dir, os.path.join(output_dir, "run")


def _export(model, tokenizer, model_dir: str) -> None:
    from gkv_jax.conversion import to_hf
    to_hf(model, model_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(model_dir)


def _summary(history, model_dir, run_dir) -> None:
    steps = [e for e in history if "loss" in e]
    if steps:
        print(f"steps {steps[0]['step']}..{steps[-1]['step']}: loss {steps[0]['loss']:.4f} "
              f"-> {steps[-1]['loss']:.4f}")
    print(f"model:   {model_dir}\nhistory: {os.path.join(run_dir, 'history.jsonl')}\n"
          f"checkpoints: {os.path.join(run_dir, 'checkpoints')}")


def _eval_fn(args, tokenizer, dataset):
    """--eval-problems N: held-out accuracy (full and the trained policy) every
    --eval-every steps and at the end, into the history and OUT/run/eval/."""
    from gkv_jax import training
    if not args.eval_problems:
        return None
    eviction = _eviction(args)
    return training.evaluation_callback(
        tokenizer, dataset, policies=("full", eviction.policy), budgets=(eviction.budget,),
        window=args.window, divide_length=args.divide_length, num_problems=args.eval_problems,
        batch_size=min(args.eval_problems, 40),
        output_dir=os.path.join(args.output_dir, "run", "eval"))


def _cmd_distill(args: argparse.Namespace) -> int:
    import gkv_jax
    from gkv_jax import training

    eviction = _eviction(args)
    config = training.DistillConfig(
        eviction=eviction, steps=args.steps, batch_size=args.batch_size,
        learning_rate=args.learning_rate, temperature=args.temperature, seed=args.seed,
        schedule=args.schedule, warmup_ratio=args.warmup_ratio,
        weight_decay=args.weight_decay, clip_norm=args.clip_norm, reduction=args.reduction,
        budgets=tuple(args.budgets) if args.budgets else None,
        full_attention_share=args.full_attention_share, on_policy=args.on_policy,
        checkpoint_every=args.checkpoint_every, eval_every=args.eval_every)
    model_dir, run_dir = _check_output_dir(args.output_dir)
    student, tokenizer = gkv_jax.load(args.model, dtype=args.dtype)
    teacher = student
    if args.teacher is not None:
        teacher, _ = gkv_jax.load(args.teacher, dtype=args.dtype)
    if args.dataset == "synthetic":
        if tokenizer is None:
            raise ValueError(f"--model: {args.model} has no tokenizer files")
        data = synthetic_pairs(tokenizer, args.num_examples, args.data_seed)
    elif os.path.isfile(args.dataset):
        data = _jsonl_pairs(args.dataset, tokenizer, args.num_examples)
    else:
        raise ValueError(f"--dataset must be 'synthetic' or a .jsonl file of prompt/completion "
                         f"pairs, got {args.dataset!r}")
    print(f"distill: {len(data)} examples, {eviction.describe()}, {args.steps} steps of "
          f"{args.batch_size}")
    trained, history = training.distill(student, teacher, data, config, run_dir=run_dir,
                                        eval_fn=_eval_fn(args, tokenizer, "synthetic"))
    _export(trained, tokenizer, model_dir)
    _summary(history, model_dir, run_dir)
    return 0


def _cmd_grpo(args: argparse.Namespace) -> int:
    import gkv_jax
    from gkv_jax import grading, training
    from gkv_jax.datasets import load_dataset
    from gkv_jax.evaluation import format_prompt

    eviction = _eviction(args)
    config = training.GRPOConfig(
        eviction=eviction, steps=args.steps, prompts_per_step=args.prompts_per_step,
        group_size=args.group_size, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        learning_rate=args.learning_rate, schedule=args.schedule,
        warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay,
        clip_norm=args.clip_norm, seed=args.seed, checkpoint_every=args.checkpoint_every,
        eval_every=args.eval_every)
    model_dir, run_dir = _check_output_dir(args.output_dir)
    model, tokenizer = gkv_jax.load(args.model, dtype=args.dtype)
    if tokenizer is None:
        raise ValueError(f"--model: {args.model} has no tokenizer files")
    seed = args.data_seed if args.dataset == "synthetic" else 0
    examples = load_dataset(args.dataset, args.num_problems, seed=seed)
    prompts = [format_prompt(e, tokenizer) for e in examples]
    answers = [(e.kind, e.answer) for e in examples]

    def grade(text, answer):
        return grading.grade(answer[0], text, answer[1])

    print(f"grpo: {len(prompts)} prompts, {eviction.describe()}, {args.steps} steps of "
          f"{args.prompts_per_step} x {args.group_size} rollouts")
    trained, history = training.grpo(model, prompts, answers, grade, config, run_dir=run_dir,
                                     tokenizer=tokenizer,
                                     eval_fn=_eval_fn(args, tokenizer, args.dataset))
    _export(trained, tokenizer, model_dir)
    rewards = [e["reward"] for e in history if "reward" in e]
    guards = [e["guard"] for e in history if "guard" in e]
    if rewards:
        print(f"reward {rewards[0]:.3f} -> {rewards[-1]:.3f}; log-prob guard max "
              f"{max(guards):.2e}")
    _summary(history, model_dir, run_dir)
    return 0


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="local HF directory or hub id")
    parser.add_argument("--output-dir", required=True,
                        help="writes OUT/model (HF checkpoint) and OUT/run (history, "
                             "checkpoints; the same command resumes)")
    parser.add_argument("--policy", default="gkv", choices=[p for p in POLICIES if p != "full"])
    parser.add_argument("--budget", type=int, required=True)
    parser.add_argument("--window", type=int, default=None)
    parser.add_argument("--divide-length", type=int, default=None)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--learning-rate", type=float, default=1e-6)
    parser.add_argument("--warmup-ratio", type=float, default=0.05)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--clip-norm", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-seed", type=int, default=SYNTHETIC_TRAIN_SEED,
                        help="synthetic problems' seed (0 is the held-out set)")
    parser.add_argument("--checkpoint-every", type=int, default=10)
    parser.add_argument("--eval-problems", type=int, default=0,
                        help="held-out synthetic problems evaluated (full and the policy at "
                             "the budget) every --eval-every steps and at the end")
    parser.add_argument("--eval-every", type=int, default=0)
    parser.add_argument("--dtype", default="float32",
                        choices=["float32", "bfloat16", "float16"])


def add_post_train_parser(commands, comma_list) -> None:
    post = commands.add_parser("post-train",
                               help="distillation or GRPO under a compressed cache's masks")
    kinds = post.add_subparsers(dest="method", required=True)
    distill = kinds.add_parser("distill", help="distil a full-attention teacher into a "
                               "student trained under eviction (masks replayed every step)")
    _common(distill)
    distill.add_argument("--teacher", default=None, help="default: --model itself")
    distill.add_argument("--dataset", default="synthetic",
                         help="synthetic (training problems) or a .jsonl of prompt/completion")
    distill.add_argument("--num-examples", type=int, default=512)
    distill.add_argument("--batch-size", type=int, default=8)
    distill.add_argument("--temperature", type=float, default=0.6)
    distill.add_argument("--schedule", default="cosine", choices=["cosine", "constant"])
    distill.add_argument("--reduction", default="sum", choices=["sum", "token_mean"])
    distill.add_argument("--budgets", type=comma_list(int), default=None,
                         help="sample each batch's budget from these")
    distill.add_argument("--full-attention-share", type=float, default=0.0)
    distill.add_argument("--on-policy", action="store_true",
                         help="the student generates the completions, the teacher scores them")
    distill.set_defaults(func=_cmd_distill)

    grpo = kinds.add_parser("grpo", help="GRPO on rollouts generated with the compressed cache")
    _common(grpo)
    grpo.add_argument("--dataset", default="synthetic",
                      help="synthetic, aime24, aime25, amc23, math500 or a .jsonl")
    grpo.add_argument("--num-problems", type=int, default=256)
    grpo.add_argument("--prompts-per-step", type=int, default=4)
    grpo.add_argument("--group-size", type=int, default=8)
    grpo.add_argument("--max-new-tokens", type=int, default=520)
    grpo.add_argument("--temperature", type=float, default=0.8)
    grpo.add_argument("--top-p", type=float, default=0.95)
    grpo.add_argument("--top-k", type=int, default=0)
    grpo.add_argument("--schedule", default="constant", choices=["cosine", "constant"])
    grpo.set_defaults(func=_cmd_grpo)
