"""The `gkv-jax` command line: generate, eval, demo, smoke and post-train.

    gkv-jax generate --model DIR --prompt TEXT --policy gkv --budget 512 --max-new-tokens 1024
    gkv-jax eval --model DIR --dataset aime24 --policies full,gkv --budgets 512,1024
    gkv-jax demo
    gkv-jax smoke
    gkv-jax post-train distill --model DIR --policy gkv --budget 68 --steps 40 --output-dir OUT
    gkv-jax plan --target v5e-8 --model deepseek-r1-distill-qwen-7b --budget 2048
    gkv-jax serve --model DIR --policy gkv --budget 2048 --slots 64 --port 8000

Bad arguments and unreadable inputs exit with status 2 and one `error:` line naming the
flag or file; Ctrl-C exits with status 130 and says where the results so far are. Each
command has its module (`generate`, `evaluate`, `demo`, `smoke`, `post_train`, `plan`), the
flags and checks they share are in `args`; this one builds the parser and is the boundary.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from gkv_jax.cli.args import CommandError, HelpFormatter, one_line
from gkv_jax.cli.demo import add_demo_parser
from gkv_jax.cli.evaluate import add_eval_parser
from gkv_jax.cli.generate import add_generate_parser
from gkv_jax.cli.plan import add_plan_parser
from gkv_jax.cli.post_train import add_post_train_parser
from gkv_jax.cli.serve import add_serve_parser
from gkv_jax.cli.smoke import add_smoke_parser

DESCRIPTION = (
    "Inference with an evicted, fixed-size KV cache. Commands: generate (text from a "
    "Hugging Face checkpoint), eval (accuracy of eviction policies and budgets on a dataset; "
    "resumable), demo (every policy on the bundled reasoning model), smoke (a self-check on "
    "a tiny random model), post-train (distillation or GRPO under eviction), plan (will it "
    "fit on a TPU slice: compiled without one), serve (an OpenAI-compatible HTTP server).")
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # the shell's convention for SIGINT


# --------------------------------------------------------------------------------------------
# The parser and the boundary: known input errors become one line and exit 2.


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gkv-jax", description=DESCRIPTION,
                                     formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     title="commands")
    add_generate_parser(commands)
    add_eval_parser(commands)
    add_demo_parser(commands)
    add_smoke_parser(commands)
    add_post_train_parser(commands)
    add_plan_parser(commands)
    add_serve_parser(commands)
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


__all__ = ["build_parser", "interrupted_note", "main", "name_flag"]
