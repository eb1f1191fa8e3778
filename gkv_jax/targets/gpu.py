"""Compiling for NVIDIA GPUs that are not attached: XLA:GPU describes a GPU from a target
description (a `GpuTargetConfig` text proto) instead of probing one, so the CUDA plugin can
compile for an H100 on a CPU host. The description is written here from NVIDIA's published
figures for the chip (`GPU_SPECS`), not taken from a probe of a device.

Needs the `cuda-compile` extra (`pip install "gkv-jax[cuda-compile]"`: the CUDA PJRT plugin
and `ptxas`). Without a GPU the plugin's start-up check of the CUDA runtime fails, so it is
skipped (`JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1`), which must happen before JAX starts its
backends: `gkv-jax plan` sets it itself; a Python program sets it before its first JAX call.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

from gkv_jax.targets.chips import CHIPS

SKIP_CHECK = "JAX_SKIP_CUDA_CONSTRAINTS_CHECK"
CUDA_EXTRA_HINT = 'pip install "gkv-jax[cuda-compile]"'


@dataclasses.dataclass(frozen=True)
class GpuSpec:
    """What XLA:GPU needs to know of a GPU to compile for it (published figures).

    Attributes:
      description: the device's name as the driver reports it.
      chip: the `CHIPS` key of its memory and bandwidth.
      compute_capability: (major, minor), e.g. (9, 0) for Hopper.
      multiprocessors: streaming multiprocessors (SMs).
      shared_memory_per_sm, shared_memory_per_block_optin: bytes.
      l2_cache_bytes: bytes. clock_ghz: boost clock.
    """

    description: str
    chip: str
    compute_capability: tuple[int, int]
    multiprocessors: int
    shared_memory_per_sm: int
    shared_memory_per_block_optin: int
    l2_cache_bytes: int
    clock_ghz: float


_HOPPER = dict(compute_capability=(9, 0), multiprocessors=132,
               shared_memory_per_sm=228 * 1024, shared_memory_per_block_optin=227 * 1024,
               l2_cache_bytes=50 * 2**20, clock_ghz=1.98)
GPU_SPECS = {
    "h100": GpuSpec("NVIDIA H100 80GB HBM3", "h100", **_HOPPER),
    "h200": GpuSpec("NVIDIA H200", "h200", **_HOPPER),
}


def target_config(spec: GpuSpec) -> str:
    """The `GpuTargetConfig` text proto that describes `spec` to XLA:GPU."""
    chip = CHIPS[spec.chip]
    major, minor = spec.compute_capability
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_block_optin: {spec.shared_memory_per_block_optin}
  shared_memory_per_core: {spec.shared_memory_per_sm}
  threads_per_core_limit: 2048
  core_count: {spec.multiprocessors}
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(chip.hbm_gbps * 1e9)}
  l2_cache_size: {spec.l2_cache_bytes}
  clock_rate_ghz: {spec.clock_ghz}
  device_memory_size: {chip.hbm_bytes}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  cuda_compute_capability {{ major: {major} minor: {minor} }}
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 1 patch: 0 }}
device_description_str: "{spec.description}"
"""


def cuda_plugin_installed() -> bool:
    """Whether JAX's CUDA plugin (the `cuda-compile` extra, or `jax[cuda12]`) is installed."""
    try:
        return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
    except ModuleNotFoundError:  # no jax_plugins package at all
        return False


def skip_cuda_runtime_check() -> None:
    """Lets the CUDA plugin start on a host without a GPU (call before JAX's first use)."""
    os.environ.setdefault(SKIP_CHECK, "1")


def gpu_devices(chip: str, topology: str) -> list:
    """The compile-only devices of `topology` ("1x1x8": one host with 8 GPUs) of `chip`.

    Raises:
      RuntimeError: the plugin is missing, or it did not start (the reason and the fix).
    """
    if not cuda_plugin_installed():
        raise RuntimeError(f"compiling for {chip.upper()} GPUs needs JAX's CUDA plugin and "
                           f"ptxas, which are not installed: {CUDA_EXTRA_HINT}")
    from jax.experimental import topologies

    skip_cuda_runtime_check()  # in time only if JAX has not started its backends yet
    try:
        description = topologies.get_topology_desc(
            platform="cuda", topology=topology, target_config=target_config(GPU_SPECS[chip]))
    except NotImplementedError as error:  # the plugin failed to start
        raise RuntimeError(
            f"JAX's CUDA plugin did not start on this host (no GPU): set {SKIP_CHECK}=1 "
            f"before JAX starts (gkv-jax plan does it itself)") from error
    return list(description.devices)
