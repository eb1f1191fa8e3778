"""One process of the multi-process test (`tests/test_distributed.py`), and the runs it compares.

    python -m tests.distributed_worker OUT.json OUTPUT_DIR CHECKPOINT [COORDINATOR NUM_PROCESSES
        PROCESS_ID]

With a coordinator it joins the job with `gkv_jax.distributed.initialize` (every process runs
the same calls with the same full prompt lists, SPMD style); without one it runs alone.
`run_cases` generates on each mesh of `MESHES`, evaluates on the first into OUTPUT_DIR and
resumes that evaluation with one problem more, then loads CHECKPOINT (safetensors) onto
`LOAD_MESH`; OUT.json gets what this process got back. The
test process imports `run_cases` to compute the single-process reference (no mesh).
"""

from __future__ import annotations

import json
import sys

# Meshes over the 8 global devices: data x model.
MESHES = ((2, 4), (8, 1))
PROMPT_LENGTHS = (5, 23, 9, 17, 30)  # ragged; 5 rows: data=2 and data=8 pad the batch
MAX_NEW_TOKENS = 16
# Then resumed with one more. Batches of 4 rows, which data=2 divides: no padding rows, so the
# rows' per-sequence cache bytes are one process's.
EVAL_PROBLEMS = 4
EVAL_RUN = dict(policies=("full", "gkv"), budgets=(16,), window=4, divide_length=4,
                max_new_tokens=12, batch_size=EVAL_PROBLEMS, progress=False)


def tiny_model():
    """The 8-head, 4-KV-head model, the same on every process (seeded weights)."""
    from gkv_jax.conversion import from_hf
    from tests.helpers import TinySpec, tiny_hf_model

    spec = TinySpec("shard-h8-kv4", "qwen2", heads=8, kv_heads=4, head_dim=16, tied=False,
                    vocab=128)
    return from_hf(tiny_hf_model(spec))


def eval_model():
    """The evaluation tests' random 2-layer model over the synthetic vocabulary, and its
    tokenizer (`tests.test_evaluation.tiny`)."""
    from tests.test_evaluation import tiny

    return tiny()


def prompts() -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(0)
    return [rng.integers(1, 128, size=n).tolist() for n in PROMPT_LENGTHS]


def _generated(model, mesh) -> dict:
    from gkv_jax import generate
    from gkv_jax.eviction import EvictionConfig

    out = generate(model, prompts(), eviction=EvictionConfig(policy="gkv", budget=16,
                                                             divide_length=4, window=4),
                   max_new_tokens=MAX_NEW_TOKENS, eos_token_id=[], mesh=mesh,
                   return_kept_positions=True, return_logprobs=True,
                   return_eviction_record=True)
    return {"tokens": out.tokens, "logprobs": out.logprobs,
            "kept_positions": out.kept_positions.tolist(),
            "visible_until": out.eviction_record.visible_until.tolist(),
            "compressions": out.stats["compressions"], "devices": out.stats["devices"],
            "cache_bytes_per_device": out.stats["cache_bytes_per_device"]}


def _mesh(shape):
    from gkv_jax.sharding import make_mesh

    return None if shape is None else make_mesh(data=shape[0], model=shape[1])


# The load case: the model axis spans both processes, so each holds (and reads) half of every
# split weight; the 4 KV heads are not split 8 ways, so both read those whole.
LOAD_MESH = (1, 8)


def loaded(checkpoint: str, shape=LOAD_MESH) -> dict:
    """`convert_weights` of `checkpoint` onto a mesh: the bytes this process copied out of
    the checkpoint, and (index, sum, sum of squares) of each of its shards by weight."""
    import numpy as np

    from gkv_jax.conversion import convert_weights
    from gkv_jax.conversion.source import _open_source

    config, tensors = _open_source(checkpoint)
    weights = convert_weights(config, tensors, dtype="float32", mesh=_mesh(shape))
    flat = {**{k: v for k, v in weights.items() if k != "layers"}, **weights["layers"]}
    shards = {name: sorted([[[s.start, s.stop] for s in shard.index],
                            float(np.asarray(shard.data, np.float64).sum()),
                            float((np.asarray(shard.data, np.float64) ** 2).sum())]
                           for shard in array.addressable_shards)
              for name, array in flat.items()}
    return {"bytes_copied": tensors.bytes_copied, "shards": shards}


def run_cases(output_dir: str, meshes=MESHES, checkpoint: str | None = None) -> dict:
    """Generation on each mesh of `meshes` (None: no mesh), then an evaluation into
    `output_dir` on the first, and its resumption with one problem more."""
    import jax

    from gkv_jax import evaluate

    results = {"process_index": jax.process_index(), "process_count": jax.process_count(),
               "generate": {}, "evaluate": []}
    for shape in meshes:
        name = "none" if shape is None else f"{shape[0]}x{shape[1]}"
        results["generate"][name] = _generated(tiny_model(), _mesh(shape))
    model, tokenizer = eval_model()
    for num_problems in (EVAL_PROBLEMS, EVAL_PROBLEMS + 1):
        report = evaluate(model, tokenizer, "synthetic", output_dir=output_dir,
                          mesh=_mesh(meshes[0]), num_problems=num_problems, **EVAL_RUN)
        results["evaluate"].append({"rows": report.rows, "summary": report.summary})
    if checkpoint is not None:
        results["load"] = loaded(checkpoint)
    return results


def main(argv: list[str]) -> None:
    out_path, output_dir, checkpoint, *job = argv
    if job:
        from gkv_jax import distributed

        coordinator, num_processes, process_id = job
        distributed.initialize(coordinator, int(num_processes), int(process_id))
    results = run_cases(output_dir, checkpoint=checkpoint)
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1:])
