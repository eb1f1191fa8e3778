"""The `gkv-jax` command line: `generate`, `eval` (batch evaluation), `post-train`
(distillation, GRPO) and `smoke` (a check).

    gkv-jax generate --model DIR --prompt TEXT --policy gkv --budget 512 --max-new-tokens 1024
    gkv-jax eval --model DIR --dataset aime24 --policies full,gkv --budgets 512,1024
    gkv-jax post-train distill --model DIR --policy gkv --budget 68 --steps 40 --output-dir OUT
    gkv-jax smoke
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

from gkv_jax.evaluation import R1_SYSTEM_PROMPT
from gkv_jax.eviction import POLICIES, EvictionConfig
from gkv_jax.post_train_cli import add_post_train_parser


def eviction_from_args(args: argparse.Namespace) -> EvictionConfig:
    """The `EvictionConfig` named by --policy and its knobs (unset knobs: policy defaults)."""
    knobs = {"budget": args.budget, "window": args.window, "divide_length": args.divide_length}
    if args.policy == "full":
        knobs = {"divide_length": args.divide_length}
    return EvictionConfig(policy=args.policy, **{k: v for k, v in knobs.items() if v is not None})


def format_stats(stats: dict) -> str:
    """One human-readable line per statistic."""
    lines = []
    for key, value in stats.items():
        if key.endswith("bytes"):
            value = f"{value / 2**20:.2f} MiB"
        elif isinstance(value, float):
            value = f"{value:.3f}"
        lines.append(f"  {key}: {value}")
    return "\n".join(lines)


def _add_generation_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", default="gkv", choices=POLICIES)
    parser.add_argument("--budget", type=int, default=None,
                        help="kept tokens per layer and KV head (required unless --policy full)")
    parser.add_argument("--window", type=int, default=None)
    parser.add_argument("--divide-length", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)


def _cmd_generate(args: argparse.Namespace) -> int:
    import gkv_jax
    from gkv_jax.generation import generate

    eviction = eviction_from_args(args)
    model, tokenizer = gkv_jax.load(args.model, dtype=args.dtype)
    if tokenizer is None:
        raise SystemExit(f"--model: {args.model} has no tokenizer files; cannot encode --prompt")
    system_prompt = R1_SYSTEM_PROMPT if args.r1_system_prompt else args.system_prompt
    out = generate(model, args.prompt, tokenizer=tokenizer, eviction=eviction,
                   max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                   chat_template=args.chat_template, system_prompt=system_prompt)
    for i, text in enumerate(out.texts):
        print(f"--- [{i}] {len(out.tokens[i])} tokens\n{text}")
    print(f"--- {eviction.describe()}\n{format_stats(out.stats)}")
    if args.json:
        print(json.dumps({"texts": out.texts, "tokens": out.tokens, "stats": out.stats}))
    return 0


def _comma_list(kind):
    """An argparse type: comma-separated values of `kind` (int or str)."""
    def parse(text: str):
        try:
            return [kind(part.strip()) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {kind.__name__} values, got {text!r}") from None
    parse.__name__ = f"comma-separated {kind.__name__} list"
    return parse


def _cmd_eval(args: argparse.Namespace) -> int:
    import gkv_jax
    from gkv_jax.evaluation import evaluate, eviction_configs

    # Bad policies, budgets and knobs fail here, before the model loads.
    eviction_configs(args.policies, args.budgets, args.window, args.divide_length)
    model, tokenizer = gkv_jax.load(args.model, dtype=args.dtype)
    if tokenizer is None:
        raise ValueError(f"--model: {args.model} has no tokenizer files")
    evaluate(model, tokenizer, args.dataset, policies=args.policies, budgets=args.budgets,
             window=args.window, divide_length=args.divide_length,
             num_problems=args.num_problems, samples=args.samples, pass_k=args.pass_k,
             max_new_tokens=args.max_new_tokens, temperature=args.temperature,
             top_p=args.top_p, top_k=args.top_k, seed=args.seed, batch_size=args.batch_size,
             output_dir=args.output_dir, progress=True)
    return 0


def _add_eval_parser(commands) -> None:
    evaluation = commands.add_parser(
        "eval", help="accuracy of eviction policies and budgets on a dataset (resumable)")
    evaluation.add_argument("--model", required=True, help="local HF directory or hub id")
    evaluation.add_argument("--dataset", default="synthetic",
                            help="synthetic, aime24, aime25, amc23, math500 or a .jsonl path")
    evaluation.add_argument("--policies", type=_comma_list(str), default=["full", "gkv"],
                            help=f"comma-separated, from {', '.join(POLICIES)}")
    evaluation.add_argument("--budgets", type=_comma_list(int), default=[128],
                            help="comma-separated budgets (full ignores them)")
    evaluation.add_argument("--window", type=int, default=None,
                            help="observation window of snapkv, rkv and gkv")
    evaluation.add_argument("--divide-length", type=int, default=None)
    evaluation.add_argument("--num-problems", type=int, default=None)
    evaluation.add_argument("--samples", type=int, default=1)
    evaluation.add_argument("--pass-k", type=_comma_list(int), default=[1])
    evaluation.add_argument("--max-new-tokens", type=int, default=None,
                            help="default: 520 for synthetic, 16384 for math (capped)")
    evaluation.add_argument("--temperature", type=float, default=0.0)
    evaluation.add_argument("--top-p", type=float, default=1.0)
    evaluation.add_argument("--top-k", type=int, default=0)
    evaluation.add_argument("--seed", type=int, default=0)
    evaluation.add_argument("--batch-size", type=int, default=16)
    evaluation.add_argument("--output-dir", default="runs/eval")
    evaluation.add_argument("--dtype", default="bfloat16",
                            choices=["float32", "bfloat16", "float16"])
    evaluation.set_defaults(func=_cmd_eval)


def _cmd_demo(args: argparse.Namespace) -> int:
    """Accuracy, cache memory and speed of every policy on the bundled model: held-out
    table-walk problems, one budget (a quarter of the sequence by default; a fresh run)."""
    import shutil

    import gkv_jax
    from gkv_jax.evaluation import evaluate
    from gkv_jax.loading import bundled_model_dir

    model, tokenizer = gkv_jax.load(bundled_model_dir(), dtype="float32")
    shutil.rmtree(args.output_dir, ignore_errors=True)
    print(f"bundled model: {model.config.num_parameters():,} parameters; "
          f"{args.num_problems} held-out problems (500-token traces); "
          f"budget {args.budget}, window {args.window}, divide_length {args.divide_length}")
    report = evaluate(model, tokenizer, "synthetic", policies=POLICIES, budgets=[args.budget],
                      window=args.window, divide_length=args.divide_length,
                      num_problems=args.num_problems, batch_size=args.batch_size,
                      output_dir=args.output_dir, progress=True)
    full = next(e for e in report.summary if e["policy"] == "full")
    print(f"full cache: {full['pass@1']:.1%} exact answers; see {report.plot_path}")
    if args.distilled:
        _demo_distilled(args, model, tokenizer, report)
    return 0


DISTILLED_BUDGET = 68  # the budget the bundled distilled model was trained for


def _demo_distilled(args: argparse.Namespace, model, tokenizer, report) -> None:
    """The bundled model beside its copy distilled for gkv at budget 68 (same problems)."""
    import os

    import gkv_jax
    from gkv_jax.evaluation import evaluate
    from gkv_jax.loading import bundled_model_dir

    distilled, _ = gkv_jax.load(bundled_model_dir("distilled"), dtype="float32")
    budgets = sorted({DISTILLED_BUDGET, args.budget})
    common = dict(window=args.window, divide_length=args.divide_length,
                  num_problems=args.num_problems, batch_size=args.batch_size, progress=True)
    extra = evaluate(model, tokenizer, "synthetic", policies=("gkv",),
                     budgets=[b for b in budgets if b != args.budget],
                     output_dir=os.path.join(args.output_dir, "bundled_extra"), **common)
    after = evaluate(distilled, tokenizer, "synthetic", policies=("full", "gkv"),
                     budgets=budgets, output_dir=os.path.join(args.output_dir, "distilled"),
                     **common)
    before = {e["name"]: e["pass@1"] for e in report.summary + extra.summary}
    print(f"\nbundled model vs the same model distilled for gkv@{DISTILLED_BUDGET} "
          f"(gkv-jax post-train distill; exact answers on the same {args.num_problems} "
          f"problems):")
    print(f"{'config':<10} {'bundled':>9} {'distilled':>10}")
    for entry in after.summary:
        print(f"{entry['name']:<10} {before[entry['name']]:>9.1%} {entry['pass@1']:>10.1%}")


def _cmd_smoke(args: argparse.Namespace) -> int:
    """A tiny random-weights model through the whole pipeline: save as a Hugging Face
    checkpoint, load it back with `gkv_jax.load`, generate with `full` and `gkv`."""
    import jax.numpy as jnp
    from flax import nnx

    import gkv_jax
    from gkv_jax.conversion import to_hf
    from gkv_jax.generation import generate
    from gkv_jax.models import ModelConfig, Transformer

    config = ModelConfig(family="qwen2", vocab_size=512, hidden_size=128, intermediate_size=384,
                         num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, qkv_bias=True,
                         max_position_embeddings=4096)
    with tempfile.TemporaryDirectory() as directory:
        to_hf(Transformer(config, dtype=jnp.float32, rngs=nnx.Rngs(args.seed)), directory)
        model, _ = gkv_jax.load(directory, dtype="float32")
    prompts = [[1 + (7 * i + j) % 500 for j in range(n)] for i, n in enumerate((24, 40))]
    results = {}
    for eviction in (EvictionConfig(policy="full"),
                     EvictionConfig(policy="gkv", budget=64, window=8, divide_length=32)):
        out = generate(model, prompts, eviction=eviction, max_new_tokens=args.max_new_tokens,
                       eos_token_id=[])
        results[eviction.policy] = out
        print(f"--- {eviction.describe()}\n{format_stats(out.stats)}")
    full, gkv = results["full"].stats, results["gkv"].stats
    print(f"cache: gkv {gkv['cache_bytes'] / 2**10:.0f} KiB vs a full cache's "
          f"{gkv['full_cache_bytes'] / 2**10:.0f} KiB at the final length; "
          f"tokens/s gkv {gkv['tokens_per_second']:.0f}, full {full['tokens_per_second']:.0f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gkv-jax", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate from a Hugging Face checkpoint")
    gen.add_argument("--model", required=True, help="local HF directory or hub id")
    gen.add_argument("--prompt", required=True, action="append",
                     help="a prompt (repeat for a batch)")
    gen.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    gen.add_argument("--chat-template", action="store_true")
    gen.add_argument("--system-prompt", default=None)
    gen.add_argument("--r1-system-prompt", action="store_true",
                     help=f"use the R1 math system prompt: {R1_SYSTEM_PROMPT!r}")
    gen.add_argument("--json", action="store_true", help="also print the result as JSON")
    _add_generation_args(gen)
    gen.set_defaults(func=_cmd_generate)

    _add_eval_parser(commands)
    add_post_train_parser(commands, _comma_list)

    demo = commands.add_parser(
        "demo", help="every policy on the bundled reasoning model (the default job)")
    demo.add_argument("--num-problems", type=int, default=64)
    demo.add_argument("--budget", type=int, default=136)
    demo.add_argument("--window", type=int, default=16)
    demo.add_argument("--divide-length", type=int, default=16)
    demo.add_argument("--batch-size", type=int, default=32)
    demo.add_argument("--output-dir", default="runs/demo")
    demo.add_argument("--no-distilled", dest="distilled", action="store_false",
                      help="skip the side-by-side with the bundled distilled model")
    demo.set_defaults(func=_cmd_demo)

    smoke = commands.add_parser("smoke", help="end-to-end check on a tiny random model")
    smoke.add_argument("--max-new-tokens", type=int, default=256)
    smoke.add_argument("--seed", type=int, default=0)
    smoke.set_defaults(func=_cmd_smoke)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"gkv-jax {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
