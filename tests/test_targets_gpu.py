"""Compiling for NVIDIA GPU hosts that are not attached: XLA:GPU compiles our programs on this
CPU host from the chip's description (`gkv_jax.targets.gpu`), with the CUDA plugin of the
cuda-compile extra. Without the plugin, `compile_for` and `gkv-jax plan` say how to install it.

The plugin must start without a GPU: JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 before JAX starts
(`.ci/run` sets it for this file). GKV_REQUIRE_CUDA_COMPILE=1 turns the skips into failures,
so that CI cannot pass by skipping."""

from __future__ import annotations

import dataclasses
import os

import jax
import pytest

from gkv_jax.eviction import EvictionConfig
from gkv_jax.models import ModelConfig, preset
from gkv_jax.targets import TARGETS, TargetUnavailable, compile_for, gpu

TINY = ModelConfig(family="qwen2", vocab_size=128, hidden_size=64, intermediate_size=128,
                   num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=True,
                   max_position_embeddings=1024)
MID = dataclasses.replace(TINY, vocab_size=1024, hidden_size=256, intermediate_size=512,
                          num_heads=8, num_kv_heads=4, head_dim=32)  # heads split 4 ways
GKV = EvictionConfig("gkv", budget=64, window=16, divide_length=16, implementation="pallas")


def _cuda_compile_available() -> str | None:
    """None when GPU targets can compile here, else why not."""
    if not gpu.cuda_plugin_installed():
        return 'needs the CUDA plugin: pip install -e ".[cuda-compile]"'
    if os.environ.get(gpu.SKIP_CHECK) != "1":
        return f"needs {gpu.SKIP_CHECK}=1 set before JAX starts"
    return None


_WHY_NOT = _cuda_compile_available()
if _WHY_NOT and os.environ.get("GKV_REQUIRE_CUDA_COMPILE") == "1":
    raise RuntimeError(f"GKV_REQUIRE_CUDA_COMPILE=1 but GPU targets cannot compile: {_WHY_NOT}")
needs_cuda_compile = pytest.mark.skipif(_WHY_NOT is not None, reason=_WHY_NOT or "")


def test_the_gpu_targets_describe_their_chips():
    """Each GPU target's description carries its chip's published memory and bandwidth."""
    for name in ("h100-1", "h100-8", "h200-1", "h200-8"):
        target = TARGETS[name]
        assert target.platform == "gpu"
        text = gpu.target_config(gpu.GPU_SPECS[target.chip])
        assert f"device_memory_size: {target.figures.hbm_bytes}\n" in text
        assert f"memory_bandwidth: {int(target.figures.hbm_gbps * 1e9)}\n" in text
        assert "major: 9 minor: 0" in text  # Hopper: the Mosaic GPU kernels' target
    assert TARGETS["h100-8"].devices == 8 and TARGETS["h100-8"].topology == "1x1x8"


def test_without_the_cuda_plugin_compile_for_and_plan_say_how_to_install_it(monkeypatch,
                                                                            capsys):
    from gkv_jax.cli import main

    monkeypatch.setattr(gpu, "cuda_plugin_installed", lambda: False)
    with pytest.raises(TargetUnavailable, match=r'pip install "gkv-jax\[cuda-compile\]"'):
        compile_for("h100-1", TINY, batch=2, prompt_length=16, max_new_tokens=16)
    assert main(["plan", "--target", "h100-8", "--model", "deepseek-r1-distill-qwen-7b",
                 "--budget", "2048", "--batch", "8", "--mesh", "8x1"]) == 2
    err = capsys.readouterr().err
    assert "--target h100-8" in err and 'pip install "gkv-jax[cuda-compile]"' in err, err


@needs_cuda_compile
def test_a_small_generate_compiles_for_an_h100_with_the_mosaic_gpu_kernels():
    report = compile_for("h100-1", TINY, batch=4, prompt_length=32, max_new_tokens=64,
                         eviction=GKV)
    assert report.compiled, report.error
    assert report.chip == "H100 SXM" and report.hbm_bytes == 80 * 10**9
    assert report.argument_bytes > 0 and report.fits
    assert report.headroom == 0.25  # JAX preallocates 75% of a GPU's memory by default
    assert report.kernels  # the eviction ops, compiled as Mosaic GPU kernels
    # XLA:GPU has no cost analysis for a deviceless compile; the roofline floor comes from
    # the compiled step's arguments.
    assert report.step_bytes > 0 and report.step_seconds_floor > 0


@needs_cuda_compile
@pytest.mark.parametrize("target, mesh", [("h100-1", (1, 1)), ("h100-8", (2, 4))])
def test_a_decode_cycle_holds_the_planned_shards_on_h100s(target, mesh):
    """On one H100 and over a 2x4 mesh of the 8-GPU host, each device's arguments are the
    weights and cache `memory_plan` gives it (the model split 4 ways, half the batch)."""
    from gkv_jax.sharding import memory_plan

    report = compile_for(target, MID, batch=8, prompt_length=32, max_new_tokens=64,
                         eviction=GKV, program="decode_cycle", mesh_shape=mesh, cost=False)
    assert report.compiled, report.error
    assert report.devices == mesh[0] * mesh[1]
    plan = memory_plan(MID, mesh, 8, GKV, 64, "bfloat16", 32, platform="gpu")
    assert report.argument_bytes == pytest.approx(plan.weights + plan.cache, rel=0.02)


@pytest.mark.slow
@needs_cuda_compile
@pytest.mark.parametrize("batch", [8, 256])
def test_r1_distill_qwen_1_5b_generate_fits_one_h100_as_planned(batch):
    """The whole gkv `generate` at R1-Distill-Qwen-1.5B shapes (prompt 512, 4,096 new
    tokens, budget 2,048, bfloat16) compiles for one H100, and the compiler's total is within
    10% of `memory_plan(..., platform="gpu")`: at batch 8 the weights dominate, at batch 256
    the cache and the prefill's activations (all 256 prompts through a layer at once)."""
    from gkv_jax.sharding import memory_plan

    config = preset("deepseek-r1-distill-qwen-1.5b")
    eviction = EvictionConfig("gkv", budget=2048, implementation="pallas")
    report = compile_for("h100-1", config, batch=batch, prompt_length=512,
                         max_new_tokens=4096, eviction=eviction, cost=False)
    assert report.compiled and report.fits, report.error
    plan = memory_plan(config, (1, 1), batch, eviction, 4096, "bfloat16", 512, platform="gpu")
    assert abs(report.total_bytes - plan.total) <= 0.10 * report.total_bytes, (
        report.total_bytes, plan.total)
    if batch == 256:
        assert plan.prefill_activations > plan.eviction_temporaries
    assert jax.default_backend() == "cpu"  # compiled on this host, nothing attached
