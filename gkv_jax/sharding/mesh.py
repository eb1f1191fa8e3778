"""The device mesh: two named axes, `data` (the batch) and `model` (heads, MLP width, vocab).

Everything sharded in this library lives on a `jax.sharding.Mesh` with exactly these axis
names; JAX's partitioner (GSPMD) and `jax.shard_map` do all the communication.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

DATA = "data"
MODEL = "model"
AXES = (DATA, MODEL)


def _size(name: str, value) -> int | None:
    if value is None:
        return None
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"make_mesh: {name} must be an integer >= 1 (or None), got {value!r}")
    return int(value)


def make_mesh(data: int | None = None, model: int | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `data` x `model` mesh over `devices` (default: every device of `jax.devices()`).

    Give either size, both, or neither: a missing one takes the rest of the devices (neither:
    all devices on `data`, i.e. pure data parallelism, which needs no communication at all).
    Devices are laid out with `jax.make_mesh`, which keeps a `model` group on neighbouring
    chips of the interconnect.

    Raises:
      ValueError: a size that is not a positive integer, or sizes whose product is not the
        number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    count = len(devices)
    data, model = _size("data", data), _size("model", model)
    if data is None and model is None:
        data, model = count, 1
    elif data is None:
        if count % model:
            raise ValueError(f"make_mesh: model={model} does not divide the {count} devices")
        data = count // model
    elif model is None:
        if count % data:
            raise ValueError(f"make_mesh: data={data} does not divide the {count} devices")
        model = count // data
    if data * model != count:
        raise ValueError(f"make_mesh: data={data} x model={model} = {data * model}, but "
                         f"there are {count} devices (pass devices= to use a subset)")
    # Auto axes: JAX's partitioner propagates shardings from the weights and inputs.
    return jax.make_mesh((data, model), AXES, axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=devices)


def check_mesh(mesh) -> Mesh:
    """`mesh` itself if it is a `jax.sharding.Mesh` with axes ("data", "model").

    Raises:
      TypeError / ValueError: naming what is wrong and how to build one (`make_mesh`).
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh (gkv_jax.sharding.make_mesh(...)), "
                        f"got {type(mesh).__name__}")
    if tuple(mesh.axis_names) != AXES:
        raise ValueError(f"mesh must have the axes {AXES} in that order, got axis names "
                         f"{tuple(mesh.axis_names)}; build it with "
                         "gkv_jax.sharding.make_mesh(data=..., model=...)")
    return mesh


def axis_size(mesh, axis: str) -> int:
    """The number of devices along `axis` of a concrete or abstract mesh."""
    return int(dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))[axis])


def same_mesh(a: Mesh, b: Mesh) -> bool:
    """The two meshes have the same axes over the same devices in the same order."""
    return (tuple(a.axis_names) == tuple(b.axis_names)
            and np.array_equal(np.vectorize(lambda d: d.id)(a.devices),
                               np.vectorize(lambda d: d.id)(b.devices)))


def mesh_of(tree) -> Mesh | None:
    """The mesh the arrays of `tree` are sharded over, or None when they are not on one.

    Raises:
      ValueError: the arrays are on two different meshes.
    """
    found = None
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        mesh = getattr(sharding, "mesh", None)
        if not isinstance(mesh, Mesh):
            continue
        if found is None:
            found = mesh
        elif not same_mesh(found, mesh):
            raise ValueError("the model's weights are spread over two different meshes")
    return found


def active_mesh():
    """The mesh set with `jax.set_mesh` while tracing (an abstract mesh with our axes), or None.

    The decode loop reads it to constrain the cache and to run the eviction on local blocks;
    without a mesh it is None and nothing changes.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or tuple(mesh.axis_names) != AXES:
        return None
    return mesh
