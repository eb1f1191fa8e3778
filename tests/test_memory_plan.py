"""`gkv_jax.sharding.memory.memory_plan` against the bytes the devices really hold: a sharded
tiny model's weight shards, the decode loop's cache layout, `generate`'s reported cache bytes
(slow), and a hand count of R1-Distill-Qwen-7B on a 1 x 8 mesh."""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
import pytest
from flax import nnx

from gkv_jax import conversion, decode
from gkv_jax.cache import init_cache
from gkv_jax.eviction import EvictionConfig
from gkv_jax.models.config import ModelConfig
from gkv_jax.models.transformer import param_shapes
from gkv_jax.sharding import constrain_cache, make_mesh
from gkv_jax.sharding.memory import MemoryPlan, memory_plan
from gkv_jax.sharding.placement import shard_model, shard_params
from tests.helpers import TinySpec, tiny_hf_model

SPEC = TinySpec("shard-h8-kv4", "qwen2", heads=8, kv_heads=4, head_dim=16, tied=False,
                vocab=128)
# (2, 4) splits the 4 KV heads; (1, 8) cannot (8 does not divide 4: KV heads replicated on
# every device, the query heads, MLP and vocabulary still split); (8, 1) splits only the batch.
MESHES = ((2, 4), (1, 8), (8, 1))
GKV = EvictionConfig(policy="gkv", budget=16, divide_length=4, window=4)


CONFIG = ModelConfig.from_hf_config(SPEC.hf_config())


def host_params():
    """Zero float32 weights of every `param_shapes` entry, on the host (bytes depend on
    shapes only)."""
    return jax.tree.map(lambda shape: np.zeros(shape, np.float32), param_shapes(CONFIG),
                        is_leaf=lambda x: isinstance(x, tuple))


@functools.cache
def host_model():
    """The tiny float32 model on one device, for `generate` (tests shard their own clone)."""
    return conversion.from_hf(tiny_hf_model(SPEC))


def device0_bytes(tree) -> int:
    """Bytes of `tree`'s arrays held by the first device of each (its first shard)."""
    return sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda m: f"{m[0]}x{m[1]}")
def test_weights_match_sharded_params(mesh_shape):
    params = shard_params(CONFIG, host_params(), make_mesh(*mesh_shape))
    plan = memory_plan(CONFIG, mesh_shape, 3, None, 8, dtype="float32")
    assert plan.weights == pytest.approx(device0_bytes(params), rel=0.05)
    k_shard = params["layers"]["k_proj"].addressable_shards[0].data.shape[2]
    assert plan.kv_heads_per_device == k_shard
    assert plan.kv_heads_split == (k_shard < SPEC.kv_heads)


def decode_loop_cache(config, mesh, batch, capacity, window):
    """An empty float32 cache made inside a program traced under `mesh`, as `prefill` does."""
    build = functools.partial(init_cache, config, batch, capacity, window, "float32")
    with jax.set_mesh(mesh):
        return jax.jit(lambda: constrain_cache(build()))()


@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda m: f"{m[0]}x{m[1]}")
def test_cache_matches_the_decode_loops_layout(mesh_shape):
    """The cache as the decode loop builds it (`init_cache` pinned by `constrain_cache`
    inside a program traced under the mesh), sized by `decode.cache_capacity`."""
    config, mesh = CONFIG, make_mesh(*mesh_shape)
    batch, prompt_length, new = 3, 16, 8  # 3 rows: data = 2 and 8 pad the batch
    for eviction in (GKV, EvictionConfig(policy="full")):
        capacity = decode.cache_capacity(eviction, prompt_length, new)
        window = decode.query_window_size(eviction)
        padded = -(-batch // mesh_shape[0]) * mesh_shape[0]
        cache = decode_loop_cache(config, mesh, padded, capacity, window)
        plan = memory_plan(config, mesh_shape, batch, eviction, new, dtype="float32",
                           prompt_length=prompt_length)
        assert (plan.capacity, plan.window, plan.padded_batch) == (capacity, window, padded)
        assert plan.cache == pytest.approx(device0_bytes(cache), rel=0.05)


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda m: f"{m[0]}x{m[1]}")
def test_weights_and_cache_match_a_sharded_model_and_generate(mesh_shape):
    model = shard_model(nnx.clone(host_model()), make_mesh(*mesh_shape))
    plan = memory_plan(CONFIG, mesh_shape, 3, None, 8, dtype="float32")
    assert plan.weights == pytest.approx(device0_bytes(model.params()), rel=0.05)
    prompts = [[1, 2, 3, 4, 5], [6, 7, 8], [9, 10, 11, 12, 13, 14, 15]]
    for eviction in (GKV, None):
        out = generate_on(model, prompts, eviction, mesh_shape)
        plan = memory_plan(model.config, mesh_shape, len(prompts), eviction, 8,
                           dtype="float32", prompt_length=out.stats["prompt_bucket"])
        assert plan.capacity == out.stats["capacity"]
        assert plan.cache == pytest.approx(out.stats["cache_bytes_per_device"], rel=0.05)


def generate_on(model, prompts, eviction, mesh_shape):
    from gkv_jax import generate

    return generate(model, prompts, eviction=eviction, max_new_tokens=8,
                    mesh=make_mesh(*mesh_shape), eos_token_id=[])


def test_capacity_follows_decode():
    config = CONFIG
    cases = [(GKV, 16, 8), (GKV, 40, 3), (EvictionConfig(policy="full"), 16, 8),
             (EvictionConfig(policy="streaming", budget=16, divide_length=4), 5, 9),
             (EvictionConfig(policy="h2o", budget=12), 7, 2)]
    for eviction, prompt_length, new in cases:
        plan = memory_plan(config, (1, 1), 1, eviction, new, prompt_length=prompt_length)
        assert plan.capacity == decode.cache_capacity(eviction, prompt_length, new)
        assert plan.window == decode.query_window_size(eviction)
    none = memory_plan(config, (1, 1), 1, None, 8, prompt_length=16)
    assert none.capacity == decode.cache_capacity(EvictionConfig(policy="full"), 16, 8)
    assert none.eviction_temporaries == 0


def test_evicting_cache_is_independent_of_length_and_full_grows_with_it():
    config = CONFIG
    short, long = (memory_plan(config, (2, 4), 4, GKV, n) for n in (100, 500))
    assert short.cache == long.cache and short.eviction_temporaries > 0
    full = [memory_plan(config, (2, 4), 4, None, n, prompt_length=1).cache for n in (100, 200)]
    L, b, k, H = config.num_layers, 4 // 2, SPEC.kv_heads // 4, SPEC.head_dim
    per_slot = L * b * k * (2 * H * 2 + 4 + 4)  # keys, values in bf16; int32 position, score
    assert full[1] - full[0] == 100 * per_slot


def test_a_prompt_beyond_the_budget_adds_the_prefill_cache():
    config = CONFIG
    fits_budget = memory_plan(config, (1, 8), 2, GKV, 8, prompt_length=16)
    beyond = memory_plan(config, (1, 8), 2, GKV, 8, prompt_length=64)
    assert fits_budget.prefill_cache == 0 and beyond.cache == fits_budget.cache
    assert beyond.prefill_cache > fits_budget.cache
    assert beyond.total == (beyond.weights + beyond.cache + beyond.prefill_cache
                            + max(beyond.eviction_temporaries, beyond.prefill_activations))


def test_the_prefill_activations_count_when_they_exceed_the_compression():
    """All rows' prompts go through a layer at once: at hundreds of rows per device (and a
    wide MLP) the prefill's float32 activations, not the compression's temporaries, are the
    largest temporaries (checked against XLA:GPU by tests/test_targets_gpu.py). By hand: the larger
    of 2 x [rows, n, T, T] scores and [rows, T, I / model + D]."""
    config = dataclasses.replace(CONFIG, intermediate_size=4096)  # a wide MLP
    many = memory_plan(config, (1, 1), 512, GKV, 8, prompt_length=16)
    n, per_token = config.num_heads, config.intermediate_size + config.hidden_size
    assert many.prefill_activations == 512 * 16 * max(per_token, 2 * n * 16) * 4
    assert many.eviction_temporaries > 0
    assert many.prefill_activations > many.eviction_temporaries
    assert many.total == (many.weights + many.cache + many.prefill_activations)


def test_r1_distill_qwen_7b_on_1x8_by_hand():
    L, D, F, N, K, H, V = 28, 3584, 18944, 28, 4, 128, 152064
    config = ModelConfig(family="qwen2", vocab_size=V, hidden_size=D, intermediate_size=F,
                         num_layers=L, num_heads=N, num_kv_heads=K, head_dim=H, qkv_bias=True,
                         max_position_embeddings=131072)
    bf16, model = 2, 8
    # 8 divides neither the 28 query heads nor the 4 KV heads: attention is whole on every
    # device; the MLP width and the vocabulary (embedding, LM head) split 8 ways.
    attention = D * N * H + 2 * D * K * H + N * H * D + N * H + 2 * K * H
    per_layer = attention + 2 * D + 3 * D * F // model
    expected_weights = bf16 * (L * per_layer + 2 * V * D // model + D)
    eviction = EvictionConfig(policy="gkv", budget=2048)
    plan = memory_plan(config, (1, 8), 8, eviction, 32768)
    assert plan.weights == expected_weights
    total_weights = bf16 * config.num_parameters()
    assert 15.0e9 < total_weights < 15.5e9
    assert total_weights / model < plan.weights < total_weights / 2
    # The cache: 8 sequences on every device, all 4 KV heads (replicated), C = 2048 + 128.
    C, W = 2048 + 128, 16
    slots = L * 8 * K * C
    expected_cache = (slots * H * bf16 * 2 + slots * 4 * 2 + L * 8 * N * W * H * bf16 + 8 * 4)
    assert plan.cache == expected_cache
    assert not plan.kv_heads_split and plan.kv_heads_per_device == K
    # On 2 x 4 the heads split (4 divides 28 and 4) and the batch halves: 1/8 of the cache.
    split = memory_plan(config, (2, 4), 8, eviction, 32768)
    assert split.kv_heads_split
    assert split.cache == pytest.approx(plan.cache / 8, rel=1e-3)


def test_fits_keeps_the_headroom():
    plan = memory_plan(CONFIG, (1, 1), 1, None, 8)
    assert plan.fits(plan.total, headroom=0)
    assert not plan.fits(plan.total, headroom=0.1)
    assert plan.fits(plan.total / 0.9 + 1, headroom=0.1)
    with pytest.raises(ValueError, match="headroom"):
        plan.fits(1e9, headroom=1.0)
    with pytest.raises(ValueError, match="device_bytes"):
        plan.fits(0)


def test_mesh_shape_forms_agree():
    config = CONFIG
    plans = {memory_plan(config, shape, 3, GKV, 8) for shape in
             ((2, 4), [2, 4], {"data": 2, "model": 4}, make_mesh(2, 4),
              jax.sharding.AbstractMesh((2, 4), ("data", "model")))}
    assert len(plans) == 1 and isinstance(plans.pop(), MemoryPlan)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(mesh_shape=(2, 4, 1)), ValueError, "mesh_shape"),
    (dict(mesh_shape=(0, 8)), ValueError, "mesh_shape"),
    (dict(mesh_shape=(2.0, 4)), ValueError, "mesh_shape"),
    (dict(mesh_shape={"data": 2}), ValueError, "mesh_shape"),
    (dict(mesh_shape="2x4"), TypeError, "mesh_shape"),
    (dict(mesh_shape=jax.sharding.AbstractMesh((2, 4), ("model", "data"))), ValueError,
     "mesh_shape"),
    (dict(batch=0), ValueError, "batch"),
    (dict(batch=True), ValueError, "batch"),
    (dict(max_new_tokens=0), ValueError, "max_new_tokens"),
    (dict(prompt_length=-1), ValueError, "prompt_length"),
    (dict(max_new_tokens=10**7, prompt_length=512), ValueError,
     r"prompt_length 512 \+ max_new_tokens 10000000 = 10000512 exceeds the model's context"),
    (dict(max_new_tokens=CONFIG.max_position_embeddings), ValueError, "exceeds the model's"),
    (dict(dtype="int8"), ValueError, "dtype"),
    (dict(eviction="gkv"), TypeError, "eviction"),
    (dict(config={"num_layers": 2}), TypeError, "config"),
])
def test_bad_input_names_the_parameter(kwargs, error, match):
    args = dict(config=CONFIG, mesh_shape=(2, 4), batch=1, eviction=GKV,
                max_new_tokens=8)
    with pytest.raises(error, match=match):
        memory_plan(**{**args, **kwargs})


def test_the_tpu_plan_counts_what_xla_tpu_holds_twice():
    """`platform="tpu"` adds `tpu_layout_copy_bytes`, by hand at R1-Distill-Qwen-1.5B widths
    (MLP 8,960, vocabulary 151,936, 12 query and 2 KV heads; the compiler check of these
    cells is tests/test_targets.py, slow)."""
    from gkv_jax.models import preset

    config = preset("deepseek-r1-distill-qwen-1.5b")
    L, D, F, V = 28, 1536, 8960, 151936
    gkv = EvictionConfig(policy="gkv", budget=2048)

    def copies(mesh, batch, eviction):
        tpu = memory_plan(config, mesh, batch, eviction, 4096, prompt_length=512,
                          platform="tpu")
        plain = memory_plan(config, mesh, batch, eviction, 4096, prompt_length=512)
        assert plain.layout_copies == 0 and plain.platform is None
        assert tpu.total == plain.total + tpu.layout_copies
        return tpu.layout_copies

    keys_and_values = 2 * L * 8 * 2 * gkv.capacity * 128 * 2  # 8 rows per device, bf16
    assert copies((8, 1), 64, gkv) == keys_and_values
    assert copies((8, 1), 64, None) == 0  # nothing split, no eviction
    # Over 4 devices: gate and up [L, D, F/4] and the LM head [D, V/4] have unaligned last
    # axes (2,240 and 37,984 are not multiples of 128); the 12 query heads split evenly.
    assert copies((1, 4), 1, None) == 2 * (2 * L * D * F // 4 + D * V // 4)
    # Over 8: the same at F/8, V/8, and the query projection (8 does not divide 12 heads).
    assert copies((1, 8), 1, None) == 2 * (2 * L * D * F // 8 + D * V // 8 + L * D * 12 * 128)
    with pytest.raises(ValueError, match="platform must be None, 'tpu', 'gpu' or 'cpu'"):
        memory_plan(config, (1, 1), 1, None, 8, platform="TPU")


def test_the_documented_table_is_the_plan_beside_the_recorded_compiler():
    """The memory table of docs/guides/memory-planning.md is
    `python scripts/memory_table.py --compile --roofline`
    over the recorded compiler results (benchmarks/memory_table_tpu.json, nothing compiled
    here), and in every TPU cell the compiler accepted the plan is within 15% of it."""
    import json
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root / "scripts"))
    import memory_table

    results = json.loads(memory_table.RESULTS.read_text())
    results["offline"] = True  # a cell the plan now picks but nobody compiled: KeyError
    text = memory_table.render([1, 64], 512, 0.1, results, roofline=True)
    guide = root / "docs" / "guides" / "memory-planning.md"
    assert text in guide.read_text(), (
        "the memory table of docs/guides/memory-planning.md is stale: paste the output of "
        "python scripts/memory_table.py --compile --roofline")
    checked = 0
    for batch in (1, 64):
        for name, config in memory_table.MODELS.items():
            for target in memory_table.TARGETS:
                if target.name not in memory_table.COMPILE_TARGETS:
                    continue
                for _, eviction, new_tokens in memory_table.columns():
                    plan = memory_table.best_plan(config, target, batch, eviction, new_tokens,
                                                  512, 0.1)
                    compiled = memory_table.compile_cell(name, target, plan, batch, eviction,
                                                         new_tokens, 512, 0.1, results)
                    if compiled["compiled"]:
                        checked += 1
                        assert abs(plan.total / compiled["total_bytes"] - 1) <= 0.15, (
                            name, target.name, batch, new_tokens)
    assert checked >= 30
