"""Compiling for accelerators that are not attached: a compiler-checked plan per target.

`compile_for(target, model_config, batch=..., prompt_length=..., max_new_tokens=...,
eviction=..., mesh_shape=..., program=...)` compiles one of our programs (`PROGRAMS`) for a
TPU slice (`TARGETS`) with the real XLA:TPU compiler and Mosaic, which libtpu runs on a CPU
host, from shapes alone, and returns a `CompileReport`: compiled or the compiler's error, the
bytes per device and whether they fit, the Pallas kernels in the program, the compile time,
and a roofline estimate of the decode step from the compiler's cost analysis.

GPU targets ("h100-1", "h100-8", "h200-1", "h200-8") are compiled the same way by XLA:GPU
from a description of the chip (`gpu`; the cuda-compile extra).

* `chips`: the targets and the published per-chip figures (`TARGETS`, `CHIPS`).
* `gpu`: the GPU description XLA:GPU compiles for, and starting the CUDA plugin without a GPU.
* `programs`: the programs built from shapes on a mesh of compile-only devices.
* `compile`: `compile_for` and `CompileReport`.
* `hlo`: reading the compiled HLO (the Pallas kernels, the arrays written outside fusions).

The platform programs are traced for is `gkv_jax.pallas_kernels.target_platform`: inside
`compile_for` every choice the library makes by platform (kernels, weight layout, attention
blocks) is made for the target's platform, not for the host.
"""

from gkv_jax.targets.chips import CHIPS, TARGETS, Chip, Target, get_target
from gkv_jax.targets.compile import (
    DEFAULT_HEADROOM,
    GPU_DEFAULT_HEADROOM,
    CompileReport,
    TargetUnavailable,
    compile_for,
    topology_devices,
)
from gkv_jax.targets.hlo import materialized, pallas_kernels
from gkv_jax.targets.programs import PROGRAMS

__all__ = ["CHIPS", "DEFAULT_HEADROOM", "GPU_DEFAULT_HEADROOM", "PROGRAMS", "TARGETS", "Chip",
           "CompileReport", "Target", "TargetUnavailable", "compile_for", "get_target",
           "materialized", "pallas_kernels", "topology_devices"]
