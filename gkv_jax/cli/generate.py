"""`gkv-jax generate`: text from a Hugging Face checkpoint with an evicted KV cache.

    gkv-jax generate --model DIR --prompt TEXT --policy gkv --budget 512 --max-new-tokens 1024

prints each completion, the eviction config and the generation's statistics (and, with
--json, all of it as one JSON line).
"""

from __future__ import annotations

import argparse
import json

from gkv_jax.cli.args import (
    HelpFormatter,
    _add_dtype_arg,
    _add_eviction_args,
    _add_mesh_arg,
    _add_sampling_args,
    check_sampling,
    eviction_from_args,
    format_stats,
    load_checkpoint,
    mesh_from_args,
    positive_int,
    require_tokenizer,
)
from gkv_jax.evaluation import R1_SYSTEM_PROMPT


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


def add_generate_parser(commands) -> None:
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
    _add_eviction_args(gen)
    gen.add_argument("--max-new-tokens", type=positive_int, default=256,
                     help="generated tokens per prompt, EOS included")
    _add_sampling_args(gen)
    gen.set_defaults(func=_cmd_generate)
