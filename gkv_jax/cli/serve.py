"""`gkv-jax serve`: an OpenAI-compatible HTTP server on the slot engine.

    gkv-jax serve --model DIR_OR_HUB_ID --policy gkv --budget 2048 --slots 64 --port 8000

serves /v1/completions, /v1/chat/completions, /v1/models, /health and /metrics on
127.0.0.1 (unless --host says otherwise) until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import os

from gkv_jax.cli.args import (
    CommandError,
    HelpFormatter,
    _add_dtype_arg,
    _add_eviction_args,
    _add_mesh_arg,
    eviction_from_args,
    load_checkpoint,
    mesh_from_args,
    positive_int,
)


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        from gkv_jax.serve.server import build_app, serve
    except ImportError as err:
        raise CommandError(f"serve needs the serve extra: pip install 'gkv-jax[serve]' "
                           f"({err})") from err
    if not 0 <= args.port <= 65535:
        raise CommandError(f"--port must be in [0, 65535], got {args.port}")
    eviction = eviction_from_args(args)
    mesh = mesh_from_args(args)
    model, tokenizer = load_checkpoint(args.model, args.dtype, mesh=mesh)
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    app = build_app(model, tokenizer, eviction, slots=args.slots, max_tokens=args.max_tokens,
                    max_queue=args.max_queue, model_name=name,
                    max_prompt_length=args.max_prompt_length, mesh=mesh)
    print(f"serving {name!r} ({eviction.describe()}, {args.slots} slots) on "
          f"http://{args.host}:{args.port}/v1", flush=True)
    serve(app, host=args.host, port=args.port, shutdown_seconds=args.shutdown_timeout)
    return 0


def add_serve_parser(commands) -> None:
    about = "serve a model over an OpenAI-compatible HTTP API (needs the serve extra)"
    cmd = commands.add_parser("serve", help=about, description=about,
                              formatter_class=HelpFormatter)
    cmd.add_argument("--model", required=True,
                     help="checkpoint: a local Hugging Face directory or a hub id")
    cmd.add_argument("--served-model-name", default=None,
                     help="the model id clients send (default: the checkpoint's directory "
                          "name)")
    _add_dtype_arg(cmd)
    _add_mesh_arg(cmd)
    _add_eviction_args(cmd)
    cmd.add_argument("--slots", type=positive_int, default=16,
                     help="sequences decoded together (the batch; memory is fixed by it)")
    cmd.add_argument("--max-tokens", type=positive_int, default=1024,
                     help="the most tokens one request may generate (its default too)")
    cmd.add_argument("--max-prompt-length", type=positive_int, default=None,
                     help="the longest prompt in tokens (default: the context minus "
                          "--max-tokens)")
    cmd.add_argument("--max-queue", type=int, default=None,
                     help="samples that may wait for a slot; beyond, requests get 429 "
                          "(default: 4 x --slots)")
    cmd.add_argument("--host", default="127.0.0.1",
                     help="address to bind (0.0.0.0 exposes the server to the network)")
    cmd.add_argument("--port", type=int, default=8000, help="port to bind")
    cmd.add_argument("--shutdown-timeout", type=float, default=30.0,
                     help="seconds open requests get to finish after SIGINT / SIGTERM; "
                          "then they are cancelled")
    cmd.set_defaults(func=_cmd_serve)
