"""`gkv-jax demo`: every eviction policy on the bundled reasoning model, and the bundled
model beside its copy distilled for gkv at budget 68.

    gkv-jax demo --output-dir runs/demo

Writes only into a new or empty --output-dir or one a previous demo wrote (marked by
DEMO_MARKER); from that one it removes only the demo's own files, never a user's.
"""

from __future__ import annotations

import argparse
import os

from gkv_jax.cli.args import CommandError, HelpFormatter, comma_list, load_checkpoint, positive_int
from gkv_jax.eviction import POLICIES

DEMO_MARKER = ".gkv-jax-demo"  # written by `demo` into its --output-dir
DEMO_SUBDIRS = ("bundled_extra", "distilled")
DISTILLED_BUDGET = 68  # the budget the bundled distilled model was trained for


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


def add_demo_parser(commands) -> None:
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
