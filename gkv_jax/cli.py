"""The `gkv-jax` command line: generate, eval, demo, smoke and post-train.

    gkv-jax generate --model DIR --prompt TEXT --policy gkv --budget 512 --max-new-tokens 1024
    gkv-jax eval --model DIR --dataset aime24 --policies full,gkv --budgets 512,1024
    gkv-jax demo
    gkv-jax smoke
    gkv-jax post-train distill --model DIR --policy gkv --budget 68 --steps 40 --output-dir OUT
    gkv-jax plan --target v5e-8 --model deepseek-r1-distill-qwen-7b --budget 2048

Bad arguments and unreadable inputs exit with status 2 and one `error:` line naming the
flag or file; Ctrl-C exits with status 130 and says where the results so far are.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile

from gkv_jax.cli_args import (
    SEED_LIMIT,
    CommandError,
    HelpFormatter,
    comma_list,
    load_checkpoint,
    mesh_from_args,
    mesh_shape,
    one_line,
    positive_int,
    require_tokenizer,
    seed_value,
)
from gkv_jax.evaluation import R1_SYSTEM_PROMPT
from gkv_jax.eviction import POLICIES, EvictionConfig, get_policy

DESCRIPTION = (
    "Inference with an evicted, fixed-size KV cache. Commands: generate (text from a "
    "Hugging Face checkpoint), eval (accuracy of eviction policies and budgets on a dataset; "
    "resumable), demo (every policy on the bundled reasoning model), smoke (a self-check on "
    "a tiny random model), post-train (distillation or GRPO under eviction), plan (will it "
    "fit on a TPU slice: compiled without one).")
DTYPES = ("float32", "bfloat16", "float16")
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # the shell's convention for SIGINT
DEMO_MARKER = ".gkv-jax-demo"  # written by `demo` into its --output-dir
DEMO_SUBDIRS = ("bundled_extra", "distilled")


# --------------------------------------------------------------------------------------------
# Argument types and help.


# --------------------------------------------------------------------------------------------
# Checks before any model loads, and loading.


def eviction_from_args(args: argparse.Namespace) -> EvictionConfig:
    """The `EvictionConfig` named by --policy and its knobs (unset knobs: policy defaults; a
    knob the policy does not use is refused, naming its flag)."""
    knobs = {"budget": args.budget, "window": args.window, "divide_length": args.divide_length}
    return EvictionConfig(policy=args.policy, **{k: v for k, v in knobs.items() if v is not None})


def check_sampling(args: argparse.Namespace) -> None:
    """--temperature, --top-p and --top-k, checked by the sampler's own rules."""
    from gkv_jax.sampling import SamplingParams

    SamplingParams.create(args.temperature, args.top_p, args.top_k)


# --------------------------------------------------------------------------------------------
# generate


def format_stats(stats: dict) -> str:
    """One human-readable line per statistic, whatever the keys (byte counts in MiB)."""
    lines = []
    for key, value in stats.items():
        if key.endswith("bytes") and isinstance(value, int | float) and not isinstance(value,
                                                                                      bool):
            value = f"{value / 2**20:.2f} MiB"
        elif isinstance(value, float):
            value = f"{value:.3f}"
        lines.append(f"  {key}: {value}")
    return "\n".join(lines)


def _cmd_generate(args: argparse.Namespace) -> int:
    from gkv_jax.generation import generate

    eviction = eviction_from_args(args)
    check_sampling(args)
    mesh = mesh_from_args(args)
    model, tokenizer = load_checkpoint(args.model, args.dtype, mesh=mesh)
    require_tokenizer(tokenizer, args, "cannot encode --prompt")
    system_prompt = R1_SYSTEM_PROMPT if args.r1_system_prompt else args.system_prompt
    out = generate(model, args.prompt, tokenizer=tokenizer, eviction=eviction,
                   max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                   chat_template=args.chat_template, system_prompt=system_prompt,
                   add_special_tokens=args.bos)  # None: the tokenizer's own convention
    for i, text in enumerate(out.texts):
        print(f"--- [{i}] {len(out.tokens[i])} tokens\n{text}")
    print(f"--- {eviction.describe()}\n{format_stats(out.stats)}")
    if args.json:
        print(json.dumps({"texts": out.texts, "tokens": out.tokens,
                          "prompt_ids": out.prompt_ids, "stats": out.stats}))
    return 0


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sampling temperature; 0 decodes greedily")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="nucleus sampling mass, in (0, 1]; 1 keeps every token")
    parser.add_argument("--top-k", type=int, default=0,
                        help="sample among the k most likely tokens; 0 keeps every token")
    parser.add_argument("--seed", type=seed_value, default=0,
                        help=f"sampler seed, in [0, {SEED_LIMIT - 1}]")


def _add_dtype_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", default=None, choices=DTYPES,
                        help="parameter dtype (default: the checkpoint's own dtype)")


def _add_mesh_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mesh", type=mesh_shape, default=None, metavar="DATAxMODEL",
                        help="run on a data x model mesh of all devices, e.g. 2x4: the "
                             "batch over data, heads/MLP/vocabulary over model (default: "
                             "one device)")


def _add_generate_parser(commands) -> None:
    about = "generate text from a Hugging Face checkpoint with an evicted KV cache"
    gen = commands.add_parser("generate", help=about, description=about,
                              formatter_class=HelpFormatter)
    gen.add_argument("--model", required=True,
                     help="checkpoint: a local Hugging Face directory or a hub id")
    gen.add_argument("--prompt", required=True, action="append",
                     help="a prompt (repeat the flag for a batch)")
    _add_dtype_arg(gen)
    _add_mesh_arg(gen)
    gen.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None,
                     help="add the tokenizer's special tokens (BOS) to each prompt, or not "
                          "(--no-bos); default: the tokenizer's own convention")
    gen.add_argument("--chat-template", action="store_true",
                     help="format each prompt with the tokenizer's chat template")
    gen.add_argument("--system-prompt", default=None,
                     help="system turn of the chat template (default: none)")
    gen.add_argument("--r1-system-prompt", action="store_true",
                     help=f"use the R1 math system prompt: {R1_SYSTEM_PROMPT!r}")
    gen.add_argument("--json", action="store_true",
                     help="also print texts, tokens, prompt ids and stats as one JSON line")
    gen.add_argument("--policy", default="gkv", choices=POLICIES,
                     help="eviction policy; full keeps every token")
    gen.add_argument("--budget", type=int, default=None,
                     help="kept tokens per layer and KV head (required unless --policy full)")
    gen.add_argument("--window", type=int, default=None,
                     help="observation window of snapkv, rkv and gkv (default: the policy's)")
    gen.add_argument("--divide-length", type=int, default=None,
                     help="new tokens between compressions (default: the policy's)")
    gen.add_argument("--max-new-tokens", type=positive_int, default=256,
                     help="generated tokens per prompt, EOS included")
    _add_sampling_args(gen)
    gen.set_defaults(func=_cmd_generate)


# --------------------------------------------------------------------------------------------
# eval


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


def _add_eval_parser(commands) -> None:
    about = "accuracy of eviction policies and budgets on a dataset (resumable)"
    evaluation = commands.add_parser("eval", help=about, description=about,
                                     formatter_class=HelpFormatter)
    evaluation.add_argument("--model", required=True,
                            help="checkpoint: a local Hugging Face directory or a hub id")
    evaluation.add_argument("--dataset", default="synthetic",
                            help="synthetic, aime24, aime25, amc23, math500 or a .jsonl path")
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


# --------------------------------------------------------------------------------------------
# demo


def demo_files(output_dir: str) -> list[str]:
    """Every file a demo writes into `output_dir` (its marker aside): its evaluations' files
    and markers."""
    from gkv_jax.evaluation import (
        EVAL_MARKER,
        PLOT_FILE,
        RESULTS_FILE,
        SETTINGS_FILE,
        SUMMARY_FILE,
    )

    directories = [output_dir] + [os.path.join(output_dir, d) for d in DEMO_SUBDIRS]
    return [os.path.join(d, name) for d in directories
            for name in (RESULTS_FILE, SUMMARY_FILE, PLOT_FILE, SETTINGS_FILE, EVAL_MARKER)]


def prepare_demo_dir(output_dir: str) -> None:
    """Makes `output_dir` ready for a fresh demo: a new or empty directory, or one a demo
    wrote before (it holds DEMO_MARKER), from which only the demo's own files are removed.
    Anything else is refused: a user's directory is never cleared."""
    from gkv_jax.evaluation import mark_evaluation_dir

    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise CommandError(f"--output-dir: {output_dir} is a file; give a directory")
    marker = os.path.join(output_dir, DEMO_MARKER)
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not os.path.isfile(marker):
        raise CommandError(
            f"--output-dir: {output_dir} is not empty and is not a previous demo's output "
            f"(no {DEMO_MARKER} file); the demo never deletes files it did not write: give a "
            f"new or empty directory")
    for path in demo_files(output_dir):
        if os.path.isfile(path):
            os.remove(path)
    for name in DEMO_SUBDIRS:
        subdir = os.path.join(output_dir, name)
        if os.path.isdir(subdir) and not os.listdir(subdir):
            os.rmdir(subdir)
    os.makedirs(output_dir, exist_ok=True)
    with open(marker, "w") as f:
        f.write("Written by `gkv-jax demo`: a demo run into this directory replaces the "
                "demo's own files here (results, summary, settings, plot) and nothing else.\n")
    mark_evaluation_dir(output_dir)  # the demo's evaluation writes here


def demo_policies(args: argparse.Namespace) -> list[str]:
    """The policies the demo compares: --policies, or every policy registered when it runs
    (so one a user registers before calling `main` is in it too)."""
    return list(POLICIES) if args.policies is None else args.policies


def check_demo_args(args: argparse.Namespace) -> None:
    """Everything the demo can check before it touches --output-dir or loads a model."""
    from gkv_jax.evaluation import eviction_configs
    from gkv_jax.loading import bundled_model_dir

    eviction_configs(demo_policies(args), [args.budget], args.window, args.divide_length)
    bundled_model_dir()
    if args.distilled:
        eviction_configs(("gkv",), [DISTILLED_BUDGET], args.window, args.divide_length)
        bundled_model_dir("distilled")


def _cmd_demo(args: argparse.Namespace) -> int:
    """Accuracy, cache memory and speed of every policy on the bundled model: held-out
    table-walk problems, one budget (a quarter of the sequence by default; a fresh run)."""
    from gkv_jax.evaluation import evaluate
    from gkv_jax.loading import bundled_model_dir

    check_demo_args(args)
    prepare_demo_dir(args.output_dir)
    model, tokenizer = load_checkpoint(bundled_model_dir(), "float32", flag="bundled model")
    print(f"bundled model: {model.config.num_parameters():,} parameters; "
          f"{args.num_problems} held-out problems (500-token traces); "
          f"budget {args.budget}, window {args.window}, divide_length {args.divide_length}")
    report = evaluate(model, tokenizer, "synthetic", policies=demo_policies(args),
                      budgets=[args.budget], window=args.window,
                      divide_length=args.divide_length, num_problems=args.num_problems,
                      batch_size=args.batch_size, output_dir=args.output_dir, progress=True,
                      model_name="bundled reasoner")
    full = [e for e in report.summary if e["policy"] == "full"]  # absent if --policies omits it
    print((f"full cache: {full[0]['pass@1']:.1%} exact answers; " if full else "")
          + f"see {report.plot_path}")
    if args.distilled:
        _demo_distilled(args, model, tokenizer, report)
    return 0


DISTILLED_BUDGET = 68  # the budget the bundled distilled model was trained for


def _demo_distilled(args: argparse.Namespace, model, tokenizer, report) -> None:
    """The bundled model beside its copy distilled for gkv at budget 68 (same problems)."""
    from gkv_jax.evaluation import evaluate
    from gkv_jax.loading import bundled_model_dir

    distilled, _ = load_checkpoint(bundled_model_dir("distilled"), "float32",
                                   flag="bundled distilled model")
    budgets = sorted({DISTILLED_BUDGET, args.budget})
    common = dict(window=args.window, divide_length=args.divide_length,
                  num_problems=args.num_problems, batch_size=args.batch_size, progress=True)
    # The bundled model's gkv rows the main run lacks (another budget, or --policies without
    # gkv); a full row it lacks shows as "-".
    ran = {e["name"] for e in report.summary}
    extra_budgets = [b for b in budgets if f"gkv@{b}" not in ran]
    extra = evaluate(model, tokenizer, "synthetic", policies=("gkv",), budgets=extra_budgets,
                     output_dir=os.path.join(args.output_dir, "bundled_extra"),
                     model_name="bundled reasoner", **common) if extra_budgets else None
    after = evaluate(distilled, tokenizer, "synthetic", policies=("full", "gkv"),
                     budgets=budgets, output_dir=os.path.join(args.output_dir, "distilled"),
                     model_name=f"bundled reasoner distilled for gkv@{DISTILLED_BUDGET}",
                     **common)
    before = {e["name"]: f"{e['pass@1']:.1%}"
              for e in report.summary + (extra.summary if extra else [])}
    print(f"\nbundled model vs the same model distilled for gkv@{DISTILLED_BUDGET} "
          f"(gkv-jax post-train distill; exact answers on the same {args.num_problems} "
          f"problems):")
    print(f"{'config':<10} {'bundled':>9} {'distilled':>10}")
    for entry in after.summary:
        print(f"{entry['name']:<10} {before.get(entry['name'], '-'):>9} "
              f"{entry['pass@1']:>10.1%}")


def _add_demo_parser(commands) -> None:
    about = "every eviction policy on the bundled reasoning model (the default job)"
    demo = commands.add_parser("demo", help=about, description=about,
                               formatter_class=HelpFormatter)
    demo.add_argument("--policies", type=comma_list(str), default=None,
                      help=f"comma-separated policies to compare, from {', '.join(POLICIES)} "
                           f"(default: every registered policy)")
    demo.add_argument("--num-problems", type=positive_int, default=64,
                      help="held-out table-walk problems")
    demo.add_argument("--budget", type=int, default=136,
                      help="kept tokens per layer and KV head of every evicting policy")
    demo.add_argument("--window", type=int, default=16,
                      help="observation window of snapkv, rkv and gkv")
    demo.add_argument("--divide-length", type=int, default=16,
                      help="new tokens between compressions")
    demo.add_argument("--batch-size", type=positive_int, default=32,
                      help="rows decoded together: the slot engine's slots")
    demo.add_argument("--output-dir", default="runs/demo",
                      help=f"a new or empty directory, or a previous demo's (marked by its "
                           f"{DEMO_MARKER} file), whose demo files are replaced; any other "
                           f"non-empty directory is refused, nothing else is deleted")
    demo.add_argument("--no-distilled", dest="distilled", action="store_false",
                      help="skip the side-by-side with the bundled distilled model")
    demo.set_defaults(func=_cmd_demo)


# --------------------------------------------------------------------------------------------
# smoke


SMOKE_PROMPT_LENGTHS = (24, 40)


def _same_weights(a, b) -> bool:
    import jax
    import numpy as np

    leaves_a, leaves_b = jax.tree.leaves(a.params()), jax.tree.leaves(b.params())
    return len(leaves_a) == len(leaves_b) and all(
        x.shape == y.shape and np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(leaves_a, leaves_b, strict=True))


def smoke_checks(outputs: dict, configs: dict, max_new_tokens: int, longest_prompt: int
                 ) -> list[tuple[str, bool]]:
    """(expectation, held) for the generations of `_cmd_smoke`, keyed by name like
    `configs`: "full", "gkv@64" (evicts) and "<policy>-roomy" (a budget above the final
    length, so it never evicts)."""
    checks = []
    full = outputs["full"]
    for name, out in outputs.items():
        config = configs[name]
        lengths = [len(t) for t in out.tokens]
        checks.append((f"{name}: {max_new_tokens} tokens per prompt (no EOS), got {lengths}",
                       all(n == max_new_tokens for n in lengths)))
        capacity = out.stats["capacity"]
        if config.evicts:
            checks.append((f"{name}: cache capacity budget + divide_length = {config.capacity}"
                           f", got {capacity}", capacity == config.capacity))
        else:
            needed = longest_prompt + max_new_tokens - 1
            checks.append((f"{name}: cache capacity >= {needed} (every token), got {capacity}",
                           capacity >= needed))
        if name.endswith("-roomy"):
            checks.append((f"{name}: budget {config.budget} >= prompt + generated tokens "
                           f"gives exactly the full cache's tokens", out.tokens == full.tokens))
            checks.append((f"{name}: no compressions, got {out.stats['compressions']}",
                           out.stats["compressions"] == 0))
    compressions = outputs["gkv@64"].stats["compressions"]
    if longest_prompt + max_new_tokens > configs["gkv@64"].capacity:
        checks.append((f"gkv@64: compresses (the sequence outgrows its cache), got "
                       f"{compressions} compressions", compressions > 0))
    return checks


def _cmd_smoke(args: argparse.Namespace) -> int:
    """A tiny random-weights model through the whole pipeline: save as a Hugging Face
    checkpoint, load it back with `gkv_jax.load`, generate with `full`, `gkv` and a budget
    above the final length; checks what has an expected value, exits 1 on a mismatch."""
    import jax.numpy as jnp
    from flax import nnx

    from gkv_jax.conversion import to_hf
    from gkv_jax.generation import generate
    from gkv_jax.models import ModelConfig, Transformer

    config = ModelConfig(family="qwen2", vocab_size=512, hidden_size=128, intermediate_size=384,
                         num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, qkv_bias=True,
                         max_position_embeddings=4096)
    saved = Transformer(config, dtype=jnp.float32, rngs=nnx.Rngs(args.seed))
    with tempfile.TemporaryDirectory() as directory:
        to_hf(saved, directory)
        model, _ = load_checkpoint(directory, "float32", flag="smoke checkpoint")
    prompts = [[1 + (7 * i + j) % 500 for j in range(n)]
               for i, n in enumerate(SMOKE_PROMPT_LENGTHS)]
    longest = max(SMOKE_PROMPT_LENGTHS)
    roomy = longest + args.max_new_tokens
    configs = {"full": EvictionConfig(policy="full"),
               "gkv@64": EvictionConfig(policy="gkv", budget=64, window=8, divide_length=32)}
    # A budget above the final length never evicts: exactly the full cache's tokens.
    roomy_policies = [p for p in POLICIES if get_policy(p).evicts] if args.all_policies else ["gkv"]
    configs.update({f"{p}-roomy": EvictionConfig(policy=p, budget=roomy, divide_length=32)
                    for p in roomy_policies})
    outputs = {}
    for name, eviction in configs.items():
        outputs[name] = generate(model, prompts, eviction=eviction,
                                 max_new_tokens=args.max_new_tokens, eos_token_id=[])
        print(f"--- {name}: {eviction.describe()}\n{format_stats(outputs[name].stats)}")
    checks = [("weights loaded back equal the weights saved", _same_weights(saved, model))]
    checks += smoke_checks(outputs, configs, args.max_new_tokens, longest)
    for expectation, held in checks:
        print(f"{'ok  ' if held else 'FAIL'} {expectation}")
    failed = [expectation for expectation, held in checks if not held]
    if failed:
        print(f"gkv-jax smoke: error: {len(failed)} of {len(checks)} checks failed: "
              f"{'; '.join(failed)}", file=sys.stderr)
        return 1
    gkv, full = outputs["gkv@64"].stats, outputs["full"].stats
    print(f"smoke: all {len(checks)} checks passed. cache: gkv@64 "
          f"{gkv['cache_bytes'] / 2**10:.0f} KiB vs a full cache's "
          f"{gkv['full_cache_bytes'] / 2**10:.0f} KiB at the final length; "
          f"tokens/s gkv {gkv['tokens_per_second']:.0f}, full {full['tokens_per_second']:.0f}")
    return 0


def _add_smoke_parser(commands) -> None:
    about = ("end-to-end self-check on a tiny random model (save, load, generate with full "
             "and gkv); exits 1 if a check fails")
    smoke = commands.add_parser("smoke", help=about, description=about,
                                formatter_class=HelpFormatter)
    smoke.add_argument("--max-new-tokens", type=positive_int, default=256,
                       help="generated tokens per prompt")
    smoke.add_argument("--seed", type=seed_value, default=0,
                       help="seed of the random weights")
    smoke.add_argument("--all-policies", action="store_true",
                       help="check every evicting policy (not only gkv) against the full "
                            "cache at a budget above the final length (a compile each)")
    smoke.set_defaults(func=_cmd_smoke)


# --------------------------------------------------------------------------------------------
# The parser and the boundary: known input errors become one line and exit 2.


def build_parser() -> argparse.ArgumentParser:
    from gkv_jax.plan_cli import add_plan_parser
    from gkv_jax.post_train_cli import add_post_train_parser

    parser = argparse.ArgumentParser(prog="gkv-jax", description=DESCRIPTION,
                                     formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     title="commands")
    _add_generate_parser(commands)
    _add_eval_parser(commands)
    _add_demo_parser(commands)
    _add_smoke_parser(commands)
    add_post_train_parser(commands)
    add_plan_parser(commands)
    return parser


# Library messages start with the parameter's Python name, or a config's field
# ("DistillConfig.steps must be ..."); `name_flag` puts the flag in front of (or in place of) it.
_PARAMETER = re.compile(r"^(?:[A-Z][A-Za-z]*Config\.)?([a-z][a-z0-9_]*)(?=[\s:\[.])")
_FLAG_OF = {"budget": "budgets", "policy": "policies", "prompts": "prompt"}  # eval's plurals
_NOT_FLAGS = ("command", "func", "method")


def name_flag(message: str, args: argparse.Namespace) -> str:
    """`message` with the --flag of the parameter it starts with in front, if any."""
    match = _PARAMETER.match(message)
    if match is None:
        return message
    names = {k for k in vars(args) if k not in _NOT_FLAGS}
    name = match.group(1)
    dest = name if name in names else _FLAG_OF.get(name)
    if dest not in names:
        return message
    flag = f"--{dest.replace('_', '-')}"
    if match.group(0) != name:  # a config's field: the flag replaces it
        return flag + message[match.end():]
    return f"{flag}: {message}"


def interrupted_note(args: argparse.Namespace) -> str:
    """Where the results so far are after Ctrl-C, and how to go on."""
    if args.command == "eval":
        return (f"the rows finished so far are in "
                f"{os.path.join(args.output_dir, 'results.jsonl')}; run the same command "
                f"again to resume (finished rows are not generated again)")
    if args.command == "demo":
        return (f"partial results are in {args.output_dir}; run the demo again to start it "
                f"afresh (it replaces only its own files there)")
    if args.command == "post-train":
        return (f"checkpoints so far are in {os.path.join(args.output_dir, 'run')}; run the "
                f"same command again to resume from the last one")
    return "nothing was saved"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    where = f"gkv-jax {args.command}"
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"\n{where}: interrupted; {interrupted_note(args)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except CommandError as err:
        print(f"{where}: error: {one_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ImportError as err:
        print(f"{where}: error: a package this command needs is missing: {one_line(err)}",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    except (ValueError, OSError) as err:
        print(f"{where}: error: {name_flag(one_line(err), args)}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
