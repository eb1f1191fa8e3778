"""Records what the bundled model generates under each evicting policy, as a reference that
`tests/test_refactor_identity.py` recomputes (a refactor of the eviction code must leave
generated tokens and kept positions identical).

Run it against the code the reference should pin, with that tree's gkv_jax installed:

    python scripts/record_eviction_reference.py --output tests/data/eviction_reference.json

The sweep: the bundled model in float32, the first `NUM_PROBLEMS` held-out synthetic problems
in one batch, greedy, budget 40, window 8 (the policies whose window is the observation
window), divide_length 8, 96 new tokens, `implementation="xla"`. For each policy the JSON keeps
the generated tokens and a sha256 of the final `kept_positions` ([L, B, K, capacity] int32).

Self-contained on purpose (no import from tests/ or the repository root): run from another
tree, it must import only that tree's installed gkv_jax.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys

import numpy as np

POLICIES = ("streaming", "snapkv", "rkv", "h2o", "gkv")
# The policies whose `window` is the observation window (the sweep's window applies to them;
# h2o's is the current query, streaming's the recent tail: both keep their defaults).
OBSERVATION_WINDOW_POLICIES = ("snapkv", "rkv", "gkv")
NUM_PROBLEMS = 3
BUDGET = 40
WINDOW = 8
DIVIDE_LENGTH = 8
MAX_NEW_TOKENS = 96


def eviction_config(policy: str):
    """The sweep's `EvictionConfig` for `policy`."""
    from gkv_jax.eviction import EvictionConfig

    knobs = dict(budget=BUDGET, divide_length=DIVIDE_LENGTH, implementation="xla")
    if policy in OBSERVATION_WINDOW_POLICIES:
        knobs["window"] = WINDOW
    return EvictionConfig(policy=policy, **knobs)


def kept_positions_digest(kept_positions: np.ndarray) -> str:
    """sha256 of the int32 [L, B, K, C] array's C-order bytes, prefixed by its shape."""
    array = np.ascontiguousarray(kept_positions, dtype=np.int32)
    digest = hashlib.sha256(repr(array.shape).encode() + array.tobytes()).hexdigest()
    return digest


def record() -> dict[str, dict]:
    """policy -> {"config": describe(), "tokens": [[int]] per problem, "kept_positions_sha256"}."""
    import gkv_jax
    from gkv_jax import synthetic
    from gkv_jax.generation import generate
    from gkv_jax.loading import bundled_model_dir

    model, tokenizer = gkv_jax.load(bundled_model_dir(), dtype="float32")
    prompts = [tokenizer(problem.prompt)["input_ids"]
               for problem in synthetic.problems(0, NUM_PROBLEMS)]
    results = {}
    for policy in POLICIES:
        config = eviction_config(policy)
        out = generate(model, prompts, eviction=config, max_new_tokens=MAX_NEW_TOKENS,
                       return_kept_positions=True)
        results[policy] = {"config": config.describe(),
                           "tokens": [list(map(int, row)) for row in out.tokens],
                           "kept_positions_sha256": kept_positions_digest(out.kept_positions)}
    return results


def source_commit() -> str:
    """The commit of the tree the imported gkv_jax comes from (+ "-dirty" if it has changes)."""
    import gkv_jax

    tree = os.path.dirname(os.path.dirname(os.path.abspath(gkv_jax.__file__)))
    commit = subprocess.run(["git", "-C", tree, "rev-parse", "HEAD"], check=True,
                            capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", tree, "status", "--porcelain", "--untracked-files=no"],
                           check=True, capture_output=True, text=True).stdout.strip()
    return commit + ("-dirty" if dirty else "")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="the JSON file to write")
    parser.add_argument("--command", default=None,
                        help="the command line to store (default: this process's)")
    args = parser.parse_args(argv)
    import jax

    payload = {
        "made_at_commit": source_commit(),
        "command": args.command or " ".join([os.path.basename(sys.executable), *sys.argv]),
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "sweep": {"num_problems": NUM_PROBLEMS, "budget": BUDGET, "window": WINDOW,
                  "divide_length": DIVIDE_LENGTH, "max_new_tokens": MAX_NEW_TOKENS,
                  "dtype": "float32", "implementation": "xla"},
        "policies": record(),
    }
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1)
        f.write("\n")
    print(f"{args.output}: {len(payload['policies'])} policies at {payload['made_at_commit']}")


if __name__ == "__main__":
    main()
