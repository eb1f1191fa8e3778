"""Shared pytest configuration: `gpu`/`tpu`-marked tests run only on that backend."""

from __future__ import annotations

import os

# Tests are bound by XLA:CPU compilation, not by running the programs: LLVM's optimisation
# level 0 compiles about 30% faster and computes the same values (no fast-math either way).
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_backend_optimization_level=0").strip()

# Eight CPU host devices, so that the sharding tests can build 1x8, 2x4, 4x2 and 8x1 meshes in
# the same process. A program that is not sharded runs on device 0 as before (measured: the
# same compile and run times).
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

# Programs sharded over those devices synchronise them at every collective. XLA:CPU aborts the
# process when a participant waits longer than its default limit, which a 2-core machine
# running 8 device threads can reach under load; give the waits room (a real deadlock still
# ends the run, later).
for _flag in ("--xla_cpu_collective_call_terminate_timeout_seconds=900",
              "--xla_cpu_collective_timeout_seconds=900"):
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

# With libtpu installed (the `tpu` extra, for compiling for TPU targets on this host), JAX
# probes for a TPU when it starts; naming the host keeps that probe quiet and quick, and
# several test processes (pytest-xdist's workers, CLI subprocesses) may each load libtpu to
# compile for a target (libtpu otherwise takes a lock for one process per host).
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402  (after XLA_FLAGS, which the backend reads when it starts)
import pytest  # noqa: E402

# JAX's persistent compilation cache: programs compiled again after `_release_compiled_programs`
# (below), or by a CLI subprocess, are read back instead of recompiled; a second run of the
# suite starts warm. The directory is JAX_COMPILATION_CACHE_DIR when set (subprocesses inherit
# it), else one under .pytest_cache.
_CACHE_DIR = os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache",
                 "jax-compilation-cache"))
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)


def pytest_collection_modifyitems(config, items):
    """Skip tests marked `gpu` / `tpu` unless JAX's default backend is that accelerator."""
    backend = jax.default_backend()
    for marker in ("gpu", "tpu"):
        if backend == marker:
            continue
        skip = pytest.mark.skip(reason=f"needs a {marker.upper()} backend "
                                       f"(jax.default_backend() == {marker!r})")
        for item in items:
            if item.get_closest_marker(marker) is not None:
                item.add_marker(skip)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops every compiled program after each test module. A long single-process run
    otherwise accumulates hundreds of XLA:CPU executables, and the suite hit a segfault
    inside XLA's compiler near its end that no module shows when run alone."""
    yield
    from gkv_jax import generation

    generation._COMPILED.clear()
    jax.clear_caches()
