"""`compile_for`: compiles a program of ours for a TPU slice that is not attached, with the
real XLA:TPU compiler and Mosaic (libtpu on the host), or for an NVIDIA GPU host with XLA:GPU
(the CUDA plugin on the host, `targets.gpu`), and reports what the compiler says:
whether it compiled, the bytes each device holds, whether they fit, the Pallas kernels in
the program, and from the compiler's cost analysis a roofline *estimate* of the decode step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from gkv_jax.eviction import EvictionConfig
from gkv_jax.models import ModelConfig
from gkv_jax.models.transformer import resolve_dtype
from gkv_jax.pallas_kernels import target_platform
from gkv_jax.sharding.mesh import AXES
from gkv_jax.targets import gpu, programs
from gkv_jax.targets.chips import Target, get_target
from gkv_jax.targets.hlo import materialized, pallas_kernels
from gkv_jax.token_ids import is_int

DEFAULT_HEADROOM = 0.1  # share of HBM left free for what the program does not count
# On GPUs JAX preallocates 75% of the memory by default (XLA_PYTHON_CLIENT_MEM_FRACTION), and
# XLA:GPU schedules for about as much: a program must fit in that share.
GPU_DEFAULT_HEADROOM = 0.25
TPU_EXTRA_HINT = 'pip install "gkv-jax[tpu]" (or pip install "jax[tpu]")'


class TargetUnavailable(RuntimeError):
    """libtpu (the CUDA plugin, for a GPU target) is missing, or cannot describe the target."""


@dataclasses.dataclass
class CompileReport:
    """What the compiler said about one program on one target. Byte counts are per device.

    Attributes:
      target, chip, program, devices (of the mesh), mesh_shape, batch, prompt_length,
        max_new_tokens, eviction (its description), dtype: what was compiled.
      compiled: whether the compiler accepted it; error: its own message when it did not.
      argument_bytes, output_bytes, temp_bytes, code_bytes, alias_bytes: from the compiled
        program's memory analysis (aliased bytes are counted once).
      hbm_bytes: the device's HBM (published figure); headroom: the share kept free.
      kernels: the Pallas (Mosaic) kernels in the program, by name.
      weight_copies: the instructions that write one layer's weight (a slice of a stacked
        weight, on a device) to memory outside a fusion; empty when every layer's weights
        are read in place, where the stacked weights lie (`targets.hlo.materialized`).
      compile_seconds: the compiler's time on this host.
      cycle_bytes, cycle_flops: one decode cycle (divide_length steps and one compression)
        from the compiler's cost analysis: a step with its layers unrolled times
        divide_length, plus one layer's compression times L (XLA counts a loop body once).
        Its bytes count every fused operation's operands and results, so they exceed what
        must cross HBM.
      step_bytes: what one decode step must read at least once, the compiled step's
        argument bytes on a device (its weights and the whole cache).
      step_seconds_floor, tokens_per_second_ceiling: ESTIMATES, `step_bytes` over the
        device's HBM bandwidth, and the batch's tokens per second that floor allows per chip.
    """

    target: str
    chip: str
    program: str
    devices: int
    mesh_shape: tuple[int, int]
    batch: int
    prompt_length: int
    max_new_tokens: int
    eviction: str
    dtype: str
    compiled: bool = False
    error: str | None = None
    argument_bytes: int = 0
    output_bytes: int = 0
    temp_bytes: int = 0
    code_bytes: int = 0
    alias_bytes: int = 0
    hbm_bytes: int = 0
    headroom: float = DEFAULT_HEADROOM
    kernels: tuple[str, ...] = ()
    weight_copies: tuple[str, ...] = ()
    compile_seconds: float = 0.0
    cycle_bytes: float | None = None
    cycle_flops: float | None = None
    step_bytes: int | None = None
    step_seconds_floor: float | None = None
    tokens_per_second_ceiling: float | None = None

    @property
    def total_bytes(self) -> int:
        """What one device holds while the program runs: arguments, outputs and temporaries
        (buffers an output reuses counted once) and the generated code."""
        return (self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes
                + self.code_bytes)

    @property
    def fits(self) -> bool:
        """Compiled, and the total within the HBM less the headroom."""
        return self.compiled and self.total_bytes <= self.hbm_bytes * (1 - self.headroom)

    def summary(self) -> str:
        """A few lines for a terminal."""
        gib = 2**30
        head = (f"{self.program} on {self.target} ({self.chip}, mesh {self.mesh_shape[0]}x"
                f"{self.mesh_shape[1]}): batch {self.batch}, prompt {self.prompt_length}, "
                f"{self.max_new_tokens} new tokens, {self.eviction}, {self.dtype}")
        if not self.compiled:
            return f"{head}\n  did not compile: {self.error}"
        capacity = (f"of {self.hbm_bytes / gib:.2f} GiB HBM ("
                    f"{'fits' if self.fits else 'does NOT fit'} with {self.headroom:.0%} "
                    f"headroom)" if self.hbm_bytes else "(the device's memory is unknown)")
        lines = [head,
                 f"  per device: {self.total_bytes / gib:.2f} GiB {capacity}: arguments "
                 f"{self.argument_bytes / gib:.2f}, "
                 f"outputs {self.output_bytes / gib:.2f}, temporaries "
                 f"{self.temp_bytes / gib:.2f}, code {self.code_bytes / gib:.3f} GiB",
                 f"  Pallas kernels: {', '.join(self.kernels) or 'none'}; compiled in "
                 f"{self.compile_seconds:.1f} s",
                 "  layer weights: " + ("read in place" if not self.weight_copies else
                                        f"COPIED by {len(self.weight_copies)} instructions "
                                        f"({', '.join(self.weight_copies[:3])}...)")]
        if self.step_seconds_floor:
            lines.append(f"  ESTIMATE (a step's {self.step_bytes / gib:.2f} GiB of weights and "
                         f"cache / HBM bandwidth): decode step >= "
                         f"{self.step_seconds_floor * 1e3:.3f} ms, <= "
                         f"{self.tokens_per_second_ceiling:,.0f} tokens/s per chip")
        if self.cycle_bytes:
            lines.append(f"  cost analysis of one cycle: {self.cycle_flops:.3g} flops, "
                         f"{self.cycle_bytes:.3g} bytes accessed (every fused operation's "
                         f"operands: more than crosses HBM)")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "total_bytes": self.total_bytes, "fits": self.fits}


def compile_for(target: str, model_config: ModelConfig, *, batch: int, prompt_length: int,
                max_new_tokens: int, eviction: EvictionConfig | None = None,
                mesh_shape: tuple[int, int] = (1, 1), dtype="bfloat16",
                program: str = "generate", headroom: float | None = None,
                cost: bool = True) -> CompileReport:
    """Compiles `program` for `target` (a name of `TARGETS`) from shapes alone and reports
    what the compiler says; no chip and no weights are needed.

    Args:
      target: "v4-8", "v5e-1", "v5e-4", "v5e-8", "v5p-8", "v6e-1", "v6e-4", "v6e-8" or
        "tpu7x-8" (compiled by libtpu on this host); "h100-1", "h100-8", "h200-1" or
        "h200-8" (one host with 1 or 8 GPUs, compiled by XLA:GPU on this host from the
        chip's description, `targets.gpu`; the cuda-compile extra); or "attached": the devices this
        process drives, with their own compiler (a GPU, a TPU VM's chips, the CPU), whose
        report a measurement on them can be compared with (`chips.attached_target`).
      model_config: the architecture (`gkv_jax.models.preset(...)` or a loaded model's).
      batch, prompt_length, max_new_tokens: the call's shapes (prompts are padded to
        their bucket, as `generate` pads them).
      eviction: an `EvictionConfig` (None: the full cache). Its `implementation` decides
        the kernels as on the chip: "pallas" compiles the Mosaic TPU kernels.
      mesh_shape: (data, model) over the target's first data x model devices.
      dtype: the weights' dtype. program: one of `PROGRAMS`.
      headroom: the share of HBM `fits` keeps free (None: `DEFAULT_HEADROOM`, 10%, on a
        TPU; `GPU_DEFAULT_HEADROOM`, 25%, on a GPU, the share JAX leaves unallocated by
        default). cost: also compile one decode step and
        one compression for the cost analysis and the roofline estimate.

    Returns:
      A `CompileReport`; a program the compiler refuses (out of HBM, a kernel over VMEM) is
      reported with `compiled=False` and the compiler's own message.

    Raises:
      ValueError: naming the argument, for an unknown target or program, or bad shapes.
      TargetUnavailable: libtpu (or for a GPU target, the CUDA plugin) is missing or did
        not start (with how to install it or make it start).
    """
    chosen = get_target(target)
    if headroom is None:
        headroom = GPU_DEFAULT_HEADROOM if chosen.platform == "gpu" else DEFAULT_HEADROOM
    eviction = EvictionConfig(policy="full") if eviction is None else eviction
    _check(model_config, batch, prompt_length, max_new_tokens, eviction, mesh_shape, program,
           headroom, chosen)
    dtype = resolve_dtype(dtype)
    mesh = _mesh(chosen, mesh_shape)
    figures = chosen.figures
    report = CompileReport(
        target=chosen.name, chip=figures.kind, program=program, devices=mesh.size,
        mesh_shape=tuple(mesh_shape), batch=batch, prompt_length=prompt_length,
        max_new_tokens=max_new_tokens, eviction=eviction.describe(), dtype=dtype.name,
        hbm_bytes=figures.device_hbm_bytes, headroom=headroom)
    with _persistent_cache(chosen.attached):
        compiled, seconds, error = _compile(program, model_config, eviction, batch,
                                            prompt_length, max_new_tokens, dtype, mesh)
    report.compile_seconds = seconds
    if compiled is None:
        report.error = error
        return report
    memory = compiled.memory_analysis()
    report.compiled = True
    report.argument_bytes = int(memory.argument_size_in_bytes)
    report.output_bytes = int(memory.output_size_in_bytes)
    report.temp_bytes = int(memory.temp_size_in_bytes)
    report.code_bytes = int(memory.generated_code_size_in_bytes)
    report.alias_bytes = int(memory.alias_size_in_bytes)
    text = compiled.as_text()
    report.kernels = pallas_kernels(text)
    report.weight_copies = materialized(text, programs.layer_weight_slices(model_config,
                                                                           dtype, mesh))
    if cost:
        with _persistent_cache(chosen.attached):
            _add_cycle_cost(report, model_config, eviction, batch, prompt_length,
                            max_new_tokens, dtype, mesh, figures.device_gbps,
                            figures.devices_per_chip)
    return report


@contextlib.contextmanager
def _persistent_cache(enabled: bool):
    """JAX's persistent compilation cache on or off: off for a target that is not attached,
    whose executables cannot be loaded back here (reading them back only warns)."""
    before = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", enabled and before)
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", before)


def _compile(program, config, eviction, batch, prompt_length, max_new_tokens, dtype, mesh):
    """(compiled or None, seconds, the compiler's message or None)."""
    start = time.perf_counter()
    try:
        with jax.set_mesh(mesh), target_platform(platform_of(mesh)):
            fn, args = programs.build(program, config, eviction, batch, prompt_length,
                                      max_new_tokens, dtype, mesh)
            # A fresh function: jit caches traces by function, not by the target platform.
            compiled = jax.jit(lambda *a: fn(*a)).lower(*args).compile()
    except Exception as error:  # the compiler's refusal is the report's answer
        return None, time.perf_counter() - start, _first_lines(str(error))
    return compiled, time.perf_counter() - start, None


def platform_of(mesh: Mesh) -> str:
    """The platform a mesh's devices compile for: "tpu" for a described TPU topology."""
    return mesh.devices.flat[0].platform


def _add_cycle_cost(report, config, eviction, batch, prompt_length, max_new_tokens, dtype,
                    mesh, device_gbps, devices_per_chip) -> None:
    step, _, _ = _compile("decode_step", config, eviction, batch, prompt_length,
                          max_new_tokens, dtype, mesh)
    if step is None:
        return
    step_cost = step.cost_analysis() or {}  # XLA:GPU without a device gives none
    if step_cost:
        report.cycle_bytes = float(step_cost.get("bytes accessed", 0.0)) * eviction.divide_length
        report.cycle_flops = float(step_cost.get("flops", 0.0)) * eviction.divide_length
    if step_cost and eviction.evicts:
        evict, _, _ = _compile("evict", config, eviction, batch, prompt_length,
                               max_new_tokens, dtype, mesh)
        if evict is not None:
            evict_cost = evict.cost_analysis() or {}
            report.cycle_bytes += float(evict_cost.get("bytes accessed", 0.0)) * config.num_layers
            report.cycle_flops += float(evict_cost.get("flops", 0.0)) * config.num_layers
    report.step_bytes = int(step.memory_analysis().argument_size_in_bytes)
    if report.step_bytes > 0 and device_gbps > 0:  # no published bandwidth: no estimate
        report.step_seconds_floor = report.step_bytes / (device_gbps * 1e9)
        rows_per_device = batch / mesh.shape["data"]
        report.tokens_per_second_ceiling = (rows_per_device / report.step_seconds_floor
                                            * devices_per_chip)


def topology_devices(target: Target) -> list:
    """The compile-only devices of `target` (libtpu, or the CUDA plugin for a GPU target,
    describes the topology on this host)."""
    if target.attached:
        return jax.devices()
    if target.platform == "gpu":
        try:
            return gpu.gpu_devices(target.chip, target.topology)
        except RuntimeError as error:
            raise TargetUnavailable(str(error)) from error
    try:
        from jax.experimental import topologies
    except ImportError as error:  # pragma: no cover - part of jax
        raise TargetUnavailable(str(error)) from error
    # No TPU is attached: name the host (silences libtpu's probe), and let another process
    # hold libtpu too (it takes a per-host lock meant for processes that drive the chips).
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        topology = topologies.get_topology_desc(
            platform="tpu", topology_name=target.topology, **dict(target.options))
    except Exception as error:
        if _libtpu_missing():
            raise TargetUnavailable(
                f"compiling for {target.name} needs libtpu, which is not installed: "
                f"{TPU_EXTRA_HINT}") from error
        raise TargetUnavailable(f"libtpu could not describe {target.name} "
                                f"({target.topology}): {_first_lines(str(error))}") from error
    return list(topology.devices)


def _libtpu_missing() -> bool:
    import importlib.util
    return importlib.util.find_spec("libtpu") is None


def _mesh(target: Target, mesh_shape) -> Mesh:
    devices = topology_devices(target)
    data, model = mesh_shape
    return Mesh(np.asarray(devices[:data * model]).reshape(data, model), AXES)


def _check(config, batch, prompt_length, max_new_tokens, eviction, mesh_shape, program,
           headroom, target: Target) -> None:
    if not isinstance(config, ModelConfig):
        raise TypeError(f"model_config must be a gkv_jax ModelConfig, got "
                        f"{type(config).__name__}")
    for name, value in (("batch", batch), ("prompt_length", prompt_length),
                        ("max_new_tokens", max_new_tokens)):
        if not is_int(value) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if prompt_length + max_new_tokens > config.max_position_embeddings:
        raise ValueError(f"max_new_tokens: prompt_length {prompt_length} + max_new_tokens "
                         f"{max_new_tokens} exceeds the model's context "
                         f"(max_position_embeddings={config.max_position_embeddings})")
    if not isinstance(eviction, EvictionConfig):
        raise TypeError(f"eviction must be an EvictionConfig or None, got "
                        f"{type(eviction).__name__}")
    if program not in programs.PROGRAMS + programs.PARTS:
        raise ValueError(f"program must be one of {programs.PROGRAMS}, got {program!r}")
    if (not isinstance(mesh_shape, tuple | list) or len(mesh_shape) != 2
            or not all(is_int(s) and s >= 1 for s in mesh_shape)):
        raise ValueError(f"mesh_shape must be (data, model) with two integers >= 1, got "
                         f"{mesh_shape!r}")
    if mesh_shape[0] * mesh_shape[1] > target.devices:
        raise ValueError(f"mesh_shape {mesh_shape[0]}x{mesh_shape[1]} needs "
                         f"{mesh_shape[0] * mesh_shape[1]} devices, {target.name} has "
                         f"{target.devices}")
    if batch % mesh_shape[0]:
        raise ValueError(f"batch must be a multiple of the mesh's data size ({mesh_shape[0]}),"
                         f" got {batch}")
    if not isinstance(headroom, int | float) or not 0 <= headroom < 1:
        raise ValueError(f"headroom must be a number in [0, 1), got {headroom!r}")


def _first_lines(text: str, count: int = 6) -> str:
    return " ".join(text.strip().splitlines()[:count])[:2000]
