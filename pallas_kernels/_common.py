"""What the three eviction ops share: implementation dispatch, input validators, constants.

Every op folder (`score_update`, `redundancy`, `topk_retention`) has a `reference.py` (pure
jnp, float32, the specification), a `pallas.py` (Mosaic TPU
kernels written with `pl.pallas_call` and BlockSpecs), a `pallas_gpu.py` (Mosaic GPU kernels
for Hopper written with `plgpu.kernel`) and an `__init__.py` that validates the inputs once
(with the validators below) and dispatches on `implementation` (`resolve_implementation`):

  * "xla": the reference, on every backend.
  * "pallas": the Pallas kernels: Mosaic TPU on a TPU, Mosaic GPU on an NVIDIA GPU of compute
    capability >= 9.0 (Hopper; older GPUs raise), and on CPU the TPU kernels in TPU interpret
    mode (`pltpu.InterpretParams()`, exact but slow).
  * None (auto): the kernels on a backend listed in `VERIFIED_BACKENDS` (the backends on
    which they have passed the `gpu` / `tpu` tests on hardware; none yet), the reference
    elsewhere. On a verified "gpu" backend, a GPU older than Hopper gets the reference.

`interpret` (only read when the kernels run) picks the interpreter instead: "gpu" or an
`InterpretGPUParams` = the Mosaic GPU kernels in GPU interpret mode (any backend, the way the
GPU kernels are tested on CPU); True or a `pltpu.InterpretParams` = the TPU kernels in the
generic / TPU interpreter; False = compile for the backend.

Matrix-product precision (`matmul_dtype`): "float32" (the default) feeds float32 operands to
the matrix products at `Precision.HIGHEST`, so the kernels reproduce the float32
specification (kept sets equal on tie-free inputs). "bfloat16" rounds the operands of the
score matrix products (q.k and the key cosines) to bfloat16 and accumulates in float32, as
the reference G-KV implementation does; softmaxes, sums, normalisations and the selection
stay float32. Expect >= 99% of each head's kept set to agree with the float32 specification
on realistic keys (tested on clustered keys).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from gkv_jax.pallas_kernels import _gpu_common

IMPLEMENTATIONS = (None, "xla", "pallas")
PLATFORMS = ("cpu", "gpu", "tpu")

# The platform programs are traced for, when it is not the default backend's (compiling for a
# TPU or GPU from a CPU host): set by `target_platform`, read by `traced_platform`.
_TARGET_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "gkv_jax_target_platform", default=None)


@contextlib.contextmanager
def target_platform(platform: str | None):
    """Traces inside this block make every platform-dependent choice for `platform` ("cpu",
    "gpu" or "tpu"; None: the default backend) instead of `jax.default_backend()`: which
    kernels run and whether they are interpreted, the decode loop's weight layout and
    attention blocks. The one switch behind them all is `traced_platform()`.

    Trace a fresh function inside it: `jax.jit` caches traces by function and arguments, not
    by this setting.
    """
    if platform is not None and platform not in PLATFORMS:
        raise ValueError(f"platform must be one of {PLATFORMS} or None, got {platform!r}")
    token = _TARGET_PLATFORM.set(platform)
    try:
        yield
    finally:
        _TARGET_PLATFORM.reset(token)


def traced_platform() -> str:
    """The platform programs are being traced for: the innermost `target_platform`, else
    `jax.default_backend()`."""
    return _TARGET_PLATFORM.get() or jax.default_backend()
MATMUL_DTYPES = ("float32", "bfloat16")

# A finite stand-in for -inf in masked softmax logits (as in gkv_jax.models.layers): exp() of
# it is exactly 0 and (masked - max) never produces NaN.
MASKED_LOGIT = -1e30
# Added to key norms before the cosine similarity of the redundancy score.
KEY_NORM_EPS = 1e-6
# Lanes of a TPU vector register: the kernels lay per-slot scalars out as [rows, LANES].
LANES = 128


@dataclasses.dataclass(frozen=True)
class Dispatch:
    """A resolved implementation.

    Attributes:
      use_pallas: run the Pallas kernels (else the reference).
      interpret: the `interpret` argument of the kernels (False / None = compile; an
        `InterpretParams` or True = TPU interpreters; an `InterpretGPUParams` = GPU
        interpret mode).
      kernels: which kernels, "tpu" (`pallas.py`, Mosaic TPU) or "gpu" (`pallas_gpu.py`,
        Mosaic GPU).
    """

    use_pallas: bool
    interpret: Any = False
    kernels: str = "tpu"


# Hopper: Mosaic GPU (TMA, mbarriers) needs sm_90 or newer.
MIN_GPU_COMPUTE_CAPABILITY = 9.0


def gpu_compute_capability() -> float | None:
    """Compute capability of the first GPU (e.g. 9.0 for an H100), None when unknown."""
    try:
        capability = jax.devices("gpu")[0].compute_capability
        return float(capability)
    except (RuntimeError, AttributeError, TypeError, ValueError, IndexError):
        return None


def _gpu_kernels_supported() -> bool:
    """Whether the GPU traced for runs the Mosaic GPU kernels: the first GPU's compute
    capability, or, when tracing for "gpu" on a host without one, a Hopper target."""
    capability = gpu_compute_capability()
    if capability is None and _TARGET_PLATFORM.get() == "gpu":
        return True  # compiling for a GPU that is not attached: the kernels' target
    return capability is not None and capability >= MIN_GPU_COMPUTE_CAPABILITY


# The backends ("tpu", "gpu") on which the kernels have passed the accelerator tests on real
# hardware (`benchmarks/device_check.sh`); `implementation=None` runs them only there. Empty:
# so far they have only run in interpret mode on CPU. Add a backend once its device check passes.
VERIFIED_BACKENDS: frozenset[str] = frozenset()


def auto_uses_kernels(backend: str) -> bool:
    """Whether `implementation=None` runs the Pallas kernels on `backend`: only on a verified
    backend (and, on GPUs, one the Mosaic GPU kernels support)."""
    if backend not in VERIFIED_BACKENDS:
        return False
    return backend != "gpu" or _gpu_kernels_supported()


def resolve_implementation(implementation: str | None, interpret: Any = None) -> Dispatch:
    """Which code runs an op on the platform traced for (`traced_platform`: the default
    backend, or the one `target_platform` names).

    Args:
      implementation: "xla", "pallas" or None (auto: the kernels on a backend of
        `VERIFIED_BACKENDS`, see `auto_uses_kernels`; the reference elsewhere).
      interpret: overrides how the kernels run (ignored when the reference runs): None =
        automatic (compile on TPU / GPU, TPU interpret mode on CPU; the generic interpreter
        when traced under a mesh of several devices, see `_traced_on_several_devices`);
        "gpu" or an `InterpretGPUParams` = the Mosaic GPU kernels in GPU interpret mode;
        True = the TPU kernels in the generic Pallas interpreter (faster on CPU, no TPU
        memory model); a
        `pltpu.InterpretParams` = the TPU kernels in TPU interpret mode with those
        parameters; False = compile.

    Raises:
      ValueError: unknown implementation or interpret string.
      NotImplementedError: "pallas" compiled on a GPU older than Hopper (sm_90).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, "
                         f"got {implementation!r}")
    backend = traced_platform()
    if implementation == "xla":
        return Dispatch(use_pallas=False)
    if implementation is None and not auto_uses_kernels(backend):
        return Dispatch(use_pallas=False)
    if isinstance(interpret, str) and not _gpu_common.is_gpu_interpret(interpret):
        raise ValueError(f"interpret must be None, a bool, 'gpu' or interpret parameters, "
                         f"got {interpret!r}")
    if _gpu_common.is_gpu_interpret(interpret):
        return Dispatch(use_pallas=True, interpret=_gpu_common.interpret_params(interpret),
                        kernels="gpu")
    if interpret is not None and interpret is not False:
        return Dispatch(use_pallas=True, interpret=interpret)
    if backend == "gpu":
        if not _gpu_kernels_supported():
            raise NotImplementedError(
                f"implementation='pallas' on a GPU needs compute capability >= "
                f"{MIN_GPU_COMPUTE_CAPABILITY} (Mosaic GPU, Hopper), got "
                f"{gpu_compute_capability()}; use implementation='xla' or None")
        return Dispatch(use_pallas=True, interpret=False, kernels="gpu")
    if backend == "cpu" and interpret is None:
        if _traced_on_several_devices():
            return Dispatch(use_pallas=True, interpret=True)
        return Dispatch(use_pallas=True, interpret=pltpu.InterpretParams())
    return Dispatch(use_pallas=True, interpret=False)


def _traced_on_several_devices() -> bool:
    """Whether the caller is being traced under a mesh of more than one device
    (`jax.set_mesh`), where the kernels run per device inside `jax.shard_map`.

    There TPU interpret mode would simulate one multi-chip TPU: every kernel starts with a
    barrier that all shards must reach together, which needs one host thread per device at
    once; XLA:CPU runs the shards on a smaller pool and the program deadlocks (seen with 8
    host devices on 2 cores). The eviction kernels never communicate, so under a mesh they
    run in the generic Pallas interpreter, same kernel code, without that simulation.
    """
    mesh = jax.sharding.get_abstract_mesh()
    return mesh is not None and not mesh.empty and mesh.size > 1


def check_matmul_dtype(matmul_dtype: str) -> None:
    if matmul_dtype not in MATMUL_DTYPES:
        raise ValueError(f"matmul_dtype must be one of {MATMUL_DTYPES}, got {matmul_dtype!r}")


def matmul_operand_dtype(matmul_dtype: str):
    """The dtype the kernels cast matrix-product operands to."""
    return jnp.float32 if matmul_dtype == "float32" else jnp.bfloat16


def matmul_precision(matmul_dtype: str):
    """HIGHEST for float32 operands (no bf16 passes / TF32), DEFAULT for bfloat16 ones."""
    return jax.lax.Precision.HIGHEST if matmul_dtype == "float32" else jax.lax.Precision.DEFAULT


def fit_block(block: int, size: int) -> int:
    """A block of `block` rows, or the whole dimension when it is not larger (Mosaic accepts
    a block equal to the full dimension whatever its size)."""
    return size if size <= block else block


def check_block(name: str, value: int, multiple: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < multiple or (
            value % multiple):
        raise ValueError(f"{name} must be a positive multiple of {multiple}, got {value!r}")


def check_block_sizes(block_sizes, expected: type) -> None:
    """Raises TypeError unless `block_sizes` is None or an `expected` (the BlockSizes of the
    kernels that run: the TPU and GPU kernels have their own)."""
    if block_sizes is not None and not isinstance(block_sizes, expected):
        raise TypeError(f"these kernels take {expected.__module__}.{expected.__qualname__} "
                        f"block sizes, got {block_sizes!r}")


def round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


# --------------------------------------------------------------------------------------------
# Input validators: one per op, called once by each op's dispatcher (so the reference and the
# kernels accept exactly the same inputs). Shapes and dtypes only; values are not inspected.


def _describe(x) -> str:
    return "None" if x is None else f"{x.dtype}{list(x.shape)}"


def _is_float(x) -> bool:
    return x is not None and jnp.issubdtype(x.dtype, jnp.floating)


def validate_keys_valid(keys, valid) -> tuple[int, int, int, int]:
    """keys [B, K, S, H] floating, valid [B, S] bool; returns (B, K, S, H)."""
    if not _is_float(keys) or keys.ndim != 4:
        raise ValueError(f"keys must be a floating [B, K, S, H] array, got {_describe(keys)}")
    B, K, S, H = keys.shape
    if valid is None or valid.shape != (B, S) or valid.dtype != jnp.bool_:
        raise ValueError(f"valid must be a bool [B, S] = [{B}, {S}] array, got "
                         f"{_describe(valid)}")
    return B, K, S, H


def validate_score_update(queries, keys, valid, global_score, normalise: bool, smooth: str,
                          alpha: float) -> None:
    """Inputs of `score_update` (see its docstring)."""
    B, K, S, H = validate_keys_valid(keys, valid)
    if (not _is_float(queries) or queries.ndim != 4 or queries.shape[0] != B
            or queries.shape[3] != H or queries.shape[1] % K):
        raise ValueError(f"queries must be a floating [B={B}, N, W, H={H}] array with N a "
                         f"multiple of K={K}, got {_describe(queries)}")
    W = queries.shape[2]
    if not 1 <= W < S:
        raise ValueError(f"the window W={W} must be in [1, S={S})")
    if smooth not in ("max", "mean", "sum"):
        raise ValueError(f"smooth must be 'max', 'mean' or 'sum', got {smooth!r}")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise ValueError(f"alpha must be a number, got {alpha!r}")
    if global_score is None:
        return
    if not normalise:
        raise ValueError("global_score needs normalise=True (the global score is an update "
                         "of the normalised local score)")
    if (not _is_float(global_score) or global_score.ndim != 3
            or global_score.shape[:2] != (B, K) or global_score.shape[2] > S - W):
        raise ValueError(f"global_score must be a floating [B={B}, K={K}, C] array with "
                         f"C <= S - W = {S - W}, got {_describe(global_score)}")


def validate_redundancy(keys, valid, threshold: float) -> None:
    """Inputs of `redundancy`."""
    validate_keys_valid(keys, valid)
    if not isinstance(threshold, int | float) or isinstance(threshold, bool):
        raise ValueError(f"threshold must be a number, got {threshold!r}")


def validate_keep_top(scores, carried, candidate_valid, count: int) -> None:
    """Inputs of `keep_top`."""
    if not _is_float(scores) or scores.ndim != 3:
        raise ValueError(f"scores must be a floating [B, K, P] array, got {_describe(scores)}")
    B, K, P = scores.shape
    if carried is not None and (not _is_float(carried) or carried.shape != scores.shape):
        raise ValueError(f"carried must be None or a floating [B, K, P] = [{B}, {K}, {P}] "
                         f"array, got {_describe(carried)}")
    if (candidate_valid is None or candidate_valid.shape != (B, P)
            or candidate_valid.dtype != jnp.bool_):
        raise ValueError(f"candidate_valid must be a bool [B, P] = [{B}, {P}] array, got "
                         f"{_describe(candidate_valid)}")
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= P:
        raise ValueError(f"count must be an integer in [1, P={P}], got {count!r}")


def validate_compact(keys, values, positions, global_score, kept_index, window: int,
                     active, new_score, replace_score) -> None:
    """Inputs of `compact`."""
    if not _is_float(keys) or keys.ndim != 4:
        raise ValueError(f"keys must be a floating [B, K, S, H] array, got {_describe(keys)}")
    B, K, S, _ = keys.shape
    if values is None or values.shape[:3] != (B, K, S) or values.ndim != 4 or not _is_float(
            values):
        raise ValueError(f"values must be a floating [B={B}, K={K}, S={S}, H'] array, got "
                         f"{_describe(values)}")
    if positions is None or positions.shape != (B, K, S) or not jnp.issubdtype(
            positions.dtype, jnp.integer):
        raise ValueError(f"positions must be an integer [B, K, S] = [{B}, {K}, {S}] array, "
                         f"got {_describe(positions)}")
    if not _is_float(global_score) or global_score.shape != (B, K, S):
        raise ValueError(f"global_score must be a floating [B, K, S] = [{B}, {K}, {S}] array, "
                         f"got {_describe(global_score)}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"window must be an integer >= 0, got {window!r}")
    if (kept_index is None or kept_index.ndim != 3 or kept_index.shape[:2] != (B, K)
            or not jnp.issubdtype(kept_index.dtype, jnp.integer)
            or kept_index.shape[2] + window > S):
        raise ValueError(f"kept_index must be an integer [B={B}, K={K}, count] array with "
                         f"count + window <= S = {S}, got {_describe(kept_index)}")
    if active is not None and (active.shape != (B,) or active.dtype != jnp.bool_):
        raise ValueError(f"active must be None or a bool [B={B}] array, got "
                         f"{_describe(active)}")
    if new_score is not None and (not _is_float(new_score)
                                  or new_score.shape != kept_index.shape):
        raise ValueError(f"new_score must be None or a floating array shaped like kept_index "
                         f"{list(kept_index.shape)}, got {_describe(new_score)}")
    if replace_score is not None and (new_score is None or replace_score.shape != (B,)
                                      or replace_score.dtype != jnp.bool_):
        raise ValueError(f"replace_score needs new_score and must be a bool [B={B}] array, "
                         f"got {_describe(replace_score)}")
