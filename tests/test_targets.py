"""Compiling for accelerators that are not attached: the platform traced for decides every
platform choice, and `compile_for` runs the real XLA:TPU compiler (libtpu) on this host."""

from __future__ import annotations

import dataclasses
import importlib.util
import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from gkv_jax import decode
from gkv_jax.eviction import EvictionConfig
from gkv_jax.models import ModelConfig, Transformer
from gkv_jax.pallas_kernels import (
    Dispatch,
    resolve_implementation,
    target_platform,
    traced_platform,
)
from gkv_jax.pallas_kernels.topk_retention import keep_top

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason='needs libtpu: pip install -e ".[tpu]"')

TINY = ModelConfig(family="qwen2", vocab_size=128, hidden_size=64, intermediate_size=128,
                   num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=True,
                   max_position_embeddings=1024)
GKV = EvictionConfig("gkv", budget=64, window=16, divide_length=16, implementation="pallas")


def _kernel_calls(fn, *args) -> list[tuple[str, object]]:
    """(primitive, interpret mode) of every kernel call in the trace of a fresh function
    (jit caches traces by function, not by platform), nested jaxprs included: `pallas_call`
    (Mosaic TPU, or an interpreter) and `mpmd_map` (a Mosaic GPU kernel)."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in ("pallas_call", "mpmd_map"):
                found.append((eqn.primitive.name, eqn.params.get("interpret")))
            for value in eqn.params.values():
                for item in value if isinstance(value, tuple | list) else (value,):
                    inner = getattr(item, "jaxpr", item)
                    if hasattr(inner, "eqns"):
                        walk(inner)

    walk(jax.make_jaxpr(lambda *a: fn(*a))(*args).jaxpr)
    return found


def test_the_platform_traced_for_decides_every_platform_choice():
    params = Transformer(TINY, rngs=nnx.Rngs(0)).params()
    full = EvictionConfig("full")
    scores = jnp.zeros((1, 1, 300))
    valid = jnp.ones((1, 300), bool)
    assert traced_platform() == jax.default_backend() == "cpu"
    # The host: the TPU kernels in TPU interpret mode, per-layer weights, CPU blocks.
    assert resolve_implementation("pallas").interpret not in (False, None)
    assert isinstance(decode.decode_params(params)["layers"], tuple)
    assert decode.live_attention_block(full, 16447) == decode.MIN_LIVE_BLOCK * 3
    for platform, kernels, primitive in (("tpu", "tpu", "pallas_call"),
                                         ("gpu", "gpu", "mpmd_map")):
        with target_platform(platform):
            assert traced_platform() == platform
            assert resolve_implementation("pallas") == Dispatch(use_pallas=True,
                                                                interpret=False,
                                                                kernels=kernels)
            assert resolve_implementation(None) == Dispatch(use_pallas=False)  # not verified
            # The accelerators' weight layout (stacked, read in place) and attention blocks.
            assert isinstance(jax.eval_shape(decode.decode_params, params)["layers"], dict)
            assert decode.live_attention_block(full, 16447) == (
                2 * decode.ACCELERATOR_MIN_LIVE_BLOCK)  # at most 8 blocks of 2048 slots
            calls = _kernel_calls(
                lambda s, v: keep_top(s, None, v, 100, implementation="pallas"), scores, valid)
            # The platform's own kernel, compiled, not interpreted.
            assert calls and all(p == primitive and m in (False, None) for p, m in calls)
    assert traced_platform() == "cpu"  # restored on exit
    calls = _kernel_calls(
        lambda s, v: keep_top(s, None, v, 100, implementation="pallas"), scores, valid)
    assert calls and all(p == "pallas_call" and m not in (False, None) for p, m in calls)
    with pytest.raises(ValueError, match=r"platform must be one of \('cpu', 'gpu', 'tpu'\)"):
        with target_platform("npu"):
            pass


@needs_libtpu
def test_a_small_program_compiles_for_a_v5e_chip():
    from gkv_jax.targets import compile_for

    report = compile_for("v5e-1", TINY, batch=4, prompt_length=20, max_new_tokens=100,
                         eviction=GKV, program="decode_cycle", cost=False)
    assert report.compiled, report.error
    assert set(report.kernels) == {"compact_rows", "keep_top", "score_update",
                                   "similarity_summary"}
    assert 0 < report.total_bytes < report.hbm_bytes == 16 * 2**30 and report.fits
    cache = 2 * TINY.num_layers * 4 * TINY.num_kv_heads * GKV.capacity * TINY.head_dim * 2
    assert report.argument_bytes > cache  # the slots' keys and values, bf16, and the weights
    assert "fits with 10% headroom" in report.summary()


@needs_libtpu
def test_the_tpu_decode_cycle_reads_the_stacked_layer_weights_in_place():
    from gkv_jax.targets import compile_for, programs
    from gkv_jax.targets.chips import get_target
    from gkv_jax.targets.compile import _mesh

    # Weights of 2-8 MiB per layer: large enough that a copy would be one.
    config = dataclasses.replace(TINY, hidden_size=1024, intermediate_size=4096, num_heads=8,
                                 head_dim=128)
    weights = programs.layer_weight_slices(config, jnp.bfloat16, _mesh(get_target("v5e-1"),
                                                                        (1, 1)))
    assert ("bfloat16", (1024, 4096)) in weights and ("bfloat16", (4096, 1024)) in weights
    report = compile_for("v5e-1", config, batch=4, prompt_length=20, max_new_tokens=100,
                         eviction=GKV, program="decode_cycle", cost=False)
    # The decode loop scans the stacked layer weights: each step reads every layer's slice
    # where it lies (the slice is an operand fused into its product), never a copy.
    assert report.compiled and report.weight_copies == (), report.weight_copies
    assert "layer weights: read in place" in report.summary()


@needs_libtpu
def test_a_copied_weight_slice_is_found_in_the_tpu_hlo():
    from gkv_jax.targets import get_target, materialized, topology_devices

    device = topology_devices(get_target("v5e-1"))[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    weights = jax.ShapeDtypeStruct((3, 8192, 16384), jnp.bfloat16, sharding=sharding)
    x = jax.ShapeDtypeStruct((8, 8192), jnp.bfloat16, sharding=sharding)
    layer = jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding)
    slice_shape = [("bfloat16", (8192, 16384))]  # 256 MiB: more than on-chip memory

    def text(fn):
        return jax.jit(fn).lower(weights, x, layer).compile().as_text()

    in_place = text(lambda w, x, i: x @ w[i])
    copied = text(lambda w, x, i: x @ jax.lax.optimization_barrier(w[i]))  # forces a buffer
    assert materialized(in_place, slice_shape) == ()
    assert len(materialized(copied, slice_shape)) == 1


def test_compile_for_checks_its_arguments():
    from gkv_jax.targets import compile_for

    common = dict(batch=4, prompt_length=20, max_new_tokens=100, eviction=GKV)
    for kwargs, message in (
            (dict(target="v9-1"), "target must be one of v4-8, v5e-1"),
            (dict(program="train"), "program must be one of"),
            (dict(batch=0), "batch must be an integer >= 1"),
            (dict(mesh_shape=(2, 8)), "mesh_shape 2x8 needs 16 devices, v5e-8 has 8"),
            (dict(mesh_shape=(3, 1), batch=4), "batch must be a multiple of the mesh's data"),
            (dict(max_new_tokens=2000), "exceeds the model's context"),
            (dict(headroom=1.0), r"headroom must be a number in \[0, 1\)")):
        args = {"target": "v5e-8", "model_config": TINY, **common, **kwargs}
        with pytest.raises(ValueError, match=message):
            compile_for(**args)


def test_pallas_kernels_are_read_from_the_hlo():
    from gkv_jax.targets import pallas_kernels

    text = ('  %keep_top.1 = (s32[2]) custom-call(%a), custom_call_target="tpu_custom_call"\n'
            '  %compact_rows = f32[2] custom-call(%b), custom_call_target="tpu_custom_call"\n'
            '  %other = f32[2] custom-call(%c), custom_call_target="Sharding"\n')
    assert pallas_kernels(text) == ("compact_rows", "keep_top")


COLLECTIVES = re.compile(r"\b(all-gather|all-reduce|reduce-scatter|collective-permute|"
                         r"all-to-all|collective-broadcast)(-start|-done)?\b")


@pytest.mark.slow
@needs_libtpu
@pytest.mark.parametrize("target, mesh", [("v5e-4", (1, 4)), ("v5e-4", (2, 2)),
                                          ("v5e-8", (1, 8))])
def test_the_sharded_eviction_step_compiles_for_tpu_without_a_collective(target, mesh):
    """One compression of a cache sharded over the mesh, compiled by XLA:TPU with the
    kernels: every device compresses its own sequences and KV heads (as on CPU, where
    tests/test_sharding.py checks the same), so the program holds no collective."""
    from gkv_jax.targets import compile_for, programs
    from gkv_jax.targets.chips import get_target
    from gkv_jax.targets.compile import _compile, _mesh

    config = dataclasses.replace(TINY, num_heads=8, num_kv_heads=4)
    report = compile_for(target, config, batch=4, prompt_length=20, max_new_tokens=100,
                         eviction=GKV, mesh_shape=mesh, program="decode_cycle", cost=False)
    assert report.compiled and report.devices == mesh[0] * mesh[1], report.error
    compiled, _, error = _compile("evict", config, GKV, 4, 20, 100, jnp.bfloat16,
                                  _mesh(get_target(target), mesh))
    assert compiled is not None, error
    assert COLLECTIVES.search(compiled.as_text()) is None
    assert "evict" in programs.PARTS


@pytest.mark.slow
def test_generate_lowers_for_cuda_with_the_mosaic_gpu_kernels():
    """`jax.export` lowers the whole generate program for CUDA on this host, the eviction
    through the Mosaic GPU kernels (traced for "gpu"): it lowers; whether it compiles and
    fits needs a GPU (benchmarks/device_check.sh)."""
    from jax import export

    from gkv_jax.decode import generate_tokens
    from gkv_jax.sampling import SamplingParams

    params = jax.eval_shape(lambda: Transformer(TINY, dtype=jnp.bfloat16,
                                                rngs=nnx.Rngs(0)).params())
    tokens = jax.ShapeDtypeStruct((4, 32), jnp.int32)
    with target_platform("gpu"):
        exported = export.export(jax.jit(lambda p, t, q, s, k, e: generate_tokens(
            TINY, GKV, 64, p, t, q, s, k, e)), platforms=["cuda"])(
            params, tokens, tokens, SamplingParams.create(), jax.ShapeDtypeStruct(
                (4,), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32))
    text = exported.mlir_module()
    assert exported.platforms == ("cuda",)
    assert "mosaic_gpu" in text  # the eviction kernels, as Mosaic GPU custom calls


def test_plan_without_libtpu_says_how_to_install_it(monkeypatch, capsys):
    from jax.experimental import topologies

    from gkv_jax.cli import main
    from gkv_jax.targets import compile as target_compile

    def no_libtpu(**kwargs):
        raise RuntimeError("Unable to initialize backend 'tpu'")

    monkeypatch.setattr(topologies, "get_topology_desc", no_libtpu)
    monkeypatch.setattr(target_compile, "_libtpu_missing", lambda: True)
    assert main(["plan", "--target", "v5e-8", "--model", "deepseek-r1-distill-qwen-7b",
                 "--budget", "2048", "--batch", "8", "--mesh", "8x1"]) == 2
    err = capsys.readouterr().err
    assert 'needs libtpu, which is not installed: pip install "gkv-jax[tpu]"' in err, err


@pytest.mark.slow
@needs_libtpu
@pytest.mark.parametrize("target", ["v5e-1", "v6e-1", "v5p-8", "v4-8"])
def test_the_eviction_kernels_compile_for_every_chip_kind(target):
    """One layer's compression, the four Mosaic kernels, at Llama-8B's head layout (8 KV
    heads), batch 128: before the compaction kernel's block indices were flattened, its
    scalar prefetch overflowed SMEM here (benchmarks/kernel_matrix.py runs the matrix)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import kernel_matrix

    row = kernel_matrix.compile_cell(target, "llama-8b", 512, 128, "bfloat16")
    assert row["compiled"], row["error"]
    assert set(row["kernels"]) == {"compact_rows", "keep_top", "score_update",
                                   "similarity_summary"}


def _table_model(name: str) -> ModelConfig:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import memory_table

    return memory_table.MODELS[name]


@pytest.mark.slow
@needs_libtpu
@pytest.mark.parametrize("model, target, batch, policy, new_tokens, mesh", [
    ("R1-Distill-Qwen-1.5B", "v5e-8", 64, "gkv", 32768, (8, 1)),   # the keys' second layout
    ("R1-Distill-Qwen-1.5B", "v5e-8", 64, "full", 32768, (8, 1)),  # refused before the fixes
    ("R1-Distill-Qwen-1.5B", "v5e-8", 1, "gkv", 32768, (1, 8)),    # unaligned weight shards
    ("R1-Distill-Qwen-7B", "v5e-8", 1, "full", 16384, (1, 8)),     # and the query projection
])
def test_memory_plan_agrees_with_the_tpu_compiler(model, target, batch, policy, new_tokens,
                                                 mesh):
    """Memory-table cells (docs/guides/memory-planning.md): `memory_plan(platform="tpu")`
    within 15% of the compiled `generate`'s bytes per device (scripts/memory_table.py
    --compile checks every cell)."""
    from gkv_jax.sharding import memory_plan
    from gkv_jax.targets import compile_for

    config = _table_model(model)
    eviction = EvictionConfig("gkv", budget=2048) if policy == "gkv" else None
    plan = memory_plan(config, mesh, batch, eviction, new_tokens, prompt_length=512,
                       platform="tpu")
    report = compile_for(target, config, batch=batch, prompt_length=512,
                         max_new_tokens=new_tokens, eviction=eviction, mesh_shape=mesh,
                         cost=False)
    assert report.compiled, report.error
    assert abs(plan.total / report.total_bytes - 1) <= 0.15, (plan, report.summary())
    assert report.weight_copies == ()


@pytest.mark.slow
@needs_libtpu
def test_the_tpu_generate_program_reads_every_layer_weight_in_place():
    """The whole gkv `generate` at R1-Distill-Qwen-1.5B shapes with the Pallas kernels, for
    one v5e chip: no layer's weights (bf16 [1536, 8960] and the like) are copied by the
    decode loop, and the plan agrees with the compiler."""
    from gkv_jax.models import preset
    from gkv_jax.sharding import memory_plan
    from gkv_jax.targets import compile_for

    config = preset("deepseek-r1-distill-qwen-1.5b")
    eviction = EvictionConfig("gkv", budget=2048, implementation="pallas")
    report = compile_for("v5e-1", config, batch=8, prompt_length=512, max_new_tokens=4096,
                         eviction=eviction, cost=False)
    assert report.compiled, report.error
    assert set(report.kernels) == {"compact_rows", "keep_top", "score_update",
                                   "similarity_summary"}
    assert report.weight_copies == ()
    plan = memory_plan(config, (1, 1), 8, eviction, 4096, prompt_length=512, platform="tpu")
    assert abs(plan.total / report.total_bytes - 1) <= 0.15, (plan, report.summary())
