"""Running on several hosts: one Python process per host (or per GPU), all running the same
program on the same inputs (SPMD), over one mesh that spans every process's devices.

    gkv_jax.distributed.initialize("10.0.0.1:1234", num_processes=2, process_id=rank)
    mesh = gkv_jax.sharding.make_mesh(model=8)        # all devices of all processes
    out = gkv_jax.generate(model, prompts, mesh=mesh)  # every process gets every output

`initialize` must run before anything else touches JAX's devices. Afterwards
`jax.devices()` lists the devices of every process; `generate` and `evaluate` take a mesh over
them as they take a one-host mesh. Every process passes the same full prompt list; each feeds
the rows its own devices hold and receives every row back. `evaluate` writes its files from
process 0 only.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

# The arguments of the `initialize` call that started this process's job (None before).
_STARTED: dict[str, Any] | None = None
_CPU_COLLECTIVES = "jax_cpu_collectives_implementation"


def _check_address(address) -> None:
    if address is None:
        return
    host, sep, port = address.rpartition(":") if isinstance(address, str) else ("", "", "")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"coordinator_address must be 'host:port' with a port in [1, 65535] "
                         f"(the address of process 0), got {address!r}")


def _check_count(name: str, value, low: int, high: int | None = None) -> None:
    if value is None:
        return
    bad = not isinstance(value, numbers.Integral) or isinstance(value, bool)
    if bad or value < low or (high is not None and value >= high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high})"
        raise ValueError(f"{name} must be an integer {allowed}, got {value!r}")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None,
               local_device_ids: int | Sequence[int] | None = None, **kwargs) -> None:
    """Joins this process to a multi-process JAX job (`jax.distributed.initialize`).

    Call it first, before any JAX computation, in every process of the job. On TPU pods and
    under SLURM or Open MPI every argument may be None: JAX reads them from the environment.
    Elsewhere pass all three of coordinator_address (host:port of process 0, reachable by
    every process), num_processes and process_id. CPU processes exchange data with Gloo
    collectives (set here when no implementation is configured).

    Calling it again with the same arguments does nothing (so a library and its caller may
    both call it); with other arguments, or after JAX was initialized by someone else, it
    raises.

    Args:
      coordinator_address: "host:port" of the coordinator (process 0), or None.
      num_processes: number of processes of the job (>= 1), or None.
      process_id: this process's rank in [0, num_processes), or None.
      local_device_ids: the local devices this process uses (default: all), or None.
      **kwargs: passed to `jax.distributed.initialize` (e.g. initialization_timeout).

    Raises:
      ValueError: an address that is not host:port, num_processes < 1, a process_id outside
        [0, num_processes), or only some of the three given.
      RuntimeError: already initialized with other arguments, or JAX already started its
        backends (JAX's own message).
    """
    global _STARTED
    _check_address(coordinator_address)
    _check_count("num_processes", num_processes, 1)
    _check_count("process_id", process_id, 0, num_processes)
    given = [name for name, value in (("coordinator_address", coordinator_address),
                                      ("num_processes", num_processes),
                                      ("process_id", process_id)) if value is not None]
    if given and len(given) != 3:
        missing = sorted({"coordinator_address", "num_processes", "process_id"} - set(given))
        raise ValueError(f"initialize: {', '.join(given)} given without "
                         f"{', '.join(missing)}; pass all three, or none of them to let JAX "
                         "detect the cluster (TPU pods, SLURM, Open MPI)")
    if isinstance(local_device_ids, numbers.Integral):
        local_device_ids = [local_device_ids]
    arguments = {"coordinator_address": coordinator_address, "num_processes": num_processes,
                 "process_id": process_id,
                 "local_device_ids": None if local_device_ids is None
                 else [int(i) for i in local_device_ids], **kwargs}
    if _STARTED is not None:
        if arguments == _STARTED:
            return
        raise RuntimeError(f"gkv_jax.distributed.initialize was already called with other "
                           f"arguments ({_STARTED}); a process joins one job only")
    if jax.distributed.is_initialized():
        raise RuntimeError("jax.distributed is already initialized (by a direct call to "
                           "jax.distributed.initialize); do not initialize it twice")
    if getattr(jax.config, _CPU_COLLECTIVES, "gloo") in (None, "none"):
        # Without an implementation, XLA:CPU programs that span processes cannot run.
        jax.config.update(_CPU_COLLECTIVES, "gloo")
    jax.distributed.initialize(**arguments)
    _STARTED = arguments


def process_count() -> int:
    """The number of processes in the job (1 without `initialize`)."""
    return jax.process_count()


def process_index() -> int:
    """This process's rank (0 without `initialize`)."""
    return jax.process_index()


def is_main_process() -> bool:
    """Whether this is process 0, the one that writes files and prints."""
    return jax.process_index() == 0


def global_array(value, sharding) -> jax.Array:
    """`value`, a host array every process holds in full, as one array with `sharding`.

    Each process hands JAX only the blocks its own devices hold
    (`jax.make_array_from_process_local_data`): along a split axis the blocks of its shards,
    in order; along a replicated axis the whole axis. With one process, `jax.device_put`.
    """
    value = np.asarray(value)
    if sharding.is_fully_addressable:
        return jax.device_put(value, sharding)
    indices = list(sharding.addressable_devices_indices_map(value.shape).values())
    local = []
    for axis, size in enumerate(value.shape):
        blocks = sorted({index[axis].indices(size)[:2] for index in indices})
        local.append(np.concatenate([np.arange(start, stop) for start, stop in blocks]))
    return jax.make_array_from_process_local_data(sharding, value[np.ix_(*local)],
                                                  value.shape)


def broadcast_bytes(data: bytes | None) -> bytes | None:
    """Process 0's `data` (bytes, or None) on every process; the others pass anything.

    With one process, `data` itself. Every process must call it, in the same order: it is a
    collective over all devices.
    """
    if jax.process_count() == 1:
        return data
    from jax.experimental import multihost_utils

    main = is_main_process()
    length = -1 if not main or data is None else len(data)
    length = int(multihost_utils.broadcast_one_to_all(np.asarray(length, np.int32)))
    if length < 0:
        return None
    # Padded to a power of two, so that a few compiled broadcast programs serve every size.
    buffer = np.zeros(max(1024, 1 << (length - 1).bit_length()), np.uint8)
    if main:
        buffer[:length] = np.frombuffer(data, np.uint8)
    return np.asarray(multihost_utils.broadcast_one_to_all(buffer))[:length].tobytes()
