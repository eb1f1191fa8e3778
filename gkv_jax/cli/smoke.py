"""`gkv-jax smoke`: an end-to-end self-check on a tiny random model (save, load, generate
with full, gkv and a never-evicting budget); exits 1 naming each check that failed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

from gkv_jax.cli.args import HelpFormatter, format_stats, load_checkpoint, positive_int, seed_value
from gkv_jax.eviction import POLICIES, EvictionConfig, get_policy

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


def add_smoke_parser(commands) -> None:
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
