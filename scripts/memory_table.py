"""Prints a markdown table of which R1-Distill model fits which accelerator slice, from
`gkv_jax.sharding.memory.memory_plan` (shapes only: no device, no download):

    python scripts/memory_table.py [--batch 1 64] [--prompt-length 512] [--headroom 0.1]

Each cell is the predicted GB (10^9 bytes) per device of the weights, the KV cache and the
eviction temporaries, whether that fits the device with the headroom kept free, and the
`data x model` mesh chosen for it: of the meshes whose `data` axis is at most the batch, the
fitting one with the largest `data` (the least communication), else the smallest total.
"""

from __future__ import annotations

import argparse
import dataclasses

from gkv_jax.eviction import EvictionConfig
from gkv_jax.models.config import Llama3RopeScaling, ModelConfig
from gkv_jax.sharding.memory import MemoryPlan, memory_plan

GB = 10**9


def r1_distill(family: str, layers: int, hidden: int, mlp: int, heads: int, kv_heads: int,
               vocab: int) -> ModelConfig:
    """A DeepSeek-R1-Distill architecture (head dim 128, untied embeddings)."""
    llama = family == "llama"
    return ModelConfig(family=family, vocab_size=vocab, hidden_size=hidden,
                       intermediate_size=mlp, num_layers=layers, num_heads=heads,
                       num_kv_heads=kv_heads, head_dim=128, tie_word_embeddings=False,
                       qkv_bias=not llama, max_position_embeddings=131072,
                       rope_scaling=Llama3RopeScaling() if llama else None)


MODELS = {
    "R1-Distill-Qwen-1.5B": r1_distill("qwen2", 28, 1536, 8960, 12, 2, 151936),
    "R1-Distill-Qwen-7B": r1_distill("qwen2", 28, 3584, 18944, 28, 4, 152064),
    "R1-Distill-Llama-8B": r1_distill("llama", 32, 4096, 14336, 32, 8, 128256),
    "R1-Distill-Qwen-32B": r1_distill("qwen2", 64, 5120, 27648, 40, 8, 152064),
    "R1-Distill-Llama-70B": r1_distill("llama", 80, 8192, 28672, 64, 8, 128256),
}


@dataclasses.dataclass(frozen=True)
class Target:
    """An accelerator slice: `chips` devices of `memory_gb` GB each."""

    name: str
    chips: int
    memory_gb: float


# A TPU "v5p-8" slice counts TensorCores: it has 4 chips.
TARGETS = (Target("TPU v5e-8", 8, 16), Target("TPU v5p-8", 4, 95), Target("1x H100", 1, 80),
           Target("8x H100", 8, 80))
LENGTHS = (16384, 32768)  # generated tokens
BUDGET = 2048


def meshes(chips: int, batch: int) -> list[tuple[int, int]]:
    """Every (data, model) factorisation of `chips` with data <= batch (more data than
    sequences would only hold padding copies)."""
    return [(d, chips // d) for d in range(1, chips + 1) if chips % d == 0 and d <= batch]


def best_plan(config: ModelConfig, target: Target, batch: int, eviction, new_tokens: int,
              prompt_length: int, headroom: float) -> MemoryPlan:
    """The fitting plan with the largest `data` axis, else the smallest one."""
    plans = [memory_plan(config, mesh, batch, eviction, new_tokens, "bfloat16", prompt_length)
             for mesh in meshes(target.chips, batch)]
    fitting = [p for p in plans if p.fits(target.memory_gb * GB, headroom)]
    if fitting:
        return max(fitting, key=lambda p: p.data)
    return min(plans, key=lambda p: p.total)


def cell(plan: MemoryPlan, target: Target, headroom: float) -> str:
    mark = "✓" if plan.fits(target.memory_gb * GB, headroom) else "✗"
    return f"{plan.total / GB:.1f} {mark} {plan.data}×{plan.model}"


def table(batch: int, prompt_length: int, headroom: float) -> str:
    """One markdown table: a row per (model, target), a column per cache setting."""
    gkv = EvictionConfig(policy="gkv", budget=BUDGET)
    columns = [(f"gkv {BUDGET} (any length)", gkv, LENGTHS[-1])]
    columns += [(f"full {n // 1024}k", None, n) for n in LENGTHS]
    lines = [f"**batch {batch}** (GB per device, fits with {headroom:.0%} headroom, "
             "mesh data×model)", "",
             "| model | target | " + " | ".join(name for name, _, _ in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for model_name, config in MODELS.items():
        for target in TARGETS:
            cells = [cell(best_plan(config, target, batch, eviction, n, prompt_length,
                                    headroom), target, headroom)
                     for _, eviction, n in columns]
            lines.append(f"| {model_name} | {target.name} ({target.chips}× "
                         f"{target.memory_gb:g} GB) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--prompt-length", type=int, default=512)
    parser.add_argument("--headroom", type=float, default=0.1)
    args = parser.parse_args(argv)
    print(f"bfloat16 weights and cache, prompt {args.prompt_length} tokens; gkv: budget "
          f"{BUDGET}, divide_length 128, window 16, XLA reference scoring.\n")
    print("\n\n".join(table(b, args.prompt_length, args.headroom) for b in args.batch))


if __name__ == "__main__":
    main()
