"""The device mesh: four named axes, sizes from gin or the command line.

::

    mesh = make_mesh(data=2, model=2)          # gin: mesh.data = 2, mesh.model = 2
    mesh = make_mesh(**parse_mesh_spec("data=2,fsdp=-1"))

Axes (`AXES`): ``data`` (the batch), ``fsdp`` (the batch too, and each weight's largest
dimension: fully sharded data parallel), ``model`` (heads and d_ff: tensor parallel) and
``sequence`` (the length of one document). Each is a size, or -1 for the devices the others
leave. The default is one device: a mesh of size 1, on which every program runs as before.
"""

from __future__ import annotations

import contextlib
import math

import gin
import jax
import numpy as np
from jax.sharding import Mesh

from terraformer.checks import ArgumentError, check_int

__all__ = ["AXES", "make_mesh", "mesh", "mesh_context", "mesh_sizes", "parse_mesh_spec"]

AXES = ("data", "fsdp", "model", "sequence")


def mesh_sizes(n_devices: int, data: int = 1, fsdp: int = 1, model: int = 1,
               sequence: int = 1, who: str = "mesh") -> dict[str, int]:
    """The size of each axis, -1 resolved against ``n_devices`` (at most one -1).

    Raises ArgumentError when a size is neither -1 nor >= 1, when the product exceeds the
    devices, or when the devices left do not divide evenly for the -1 axis.
    """
    sizes = {"data": data, "fsdp": fsdp, "model": model, "sequence": sequence}
    for name, size in sizes.items():
        if size != -1:
            check_int(name, size, 1, who)
    rest = [name for name, size in sizes.items() if size == -1]
    if len(rest) > 1:
        raise ArgumentError(f"{who}: at most one axis may be -1 (the rest), got {rest}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if rest:
        if n_devices % fixed:
            raise ArgumentError(
                f"{who}: {rest[0]}=-1 takes the devices the other axes leave, but "
                f"{n_devices} devices are not a multiple of {fixed}")
        sizes[rest[0]] = n_devices // fixed
    total = math.prod(sizes.values())
    if total > n_devices:
        raise ArgumentError(
            f"{who}: the axes {sizes} need {total} devices, only {n_devices} are there "
            "(simulate more on CPU with XLA_FLAGS=--xla_force_host_platform_device_count=N)")
    return sizes


def make_mesh(data: int = 1, fsdp: int = 1, model: int = 1, sequence: int = 1,
              devices=None) -> Mesh:
    """A `jax.sharding.Mesh` with axes ``AXES`` of these sizes (see `mesh_sizes`).

    Args:
      devices: the devices to lay out (default ``jax.devices()``, every process's); the first
        ``data * fsdp * model * sequence`` are used, so the default mesh is the first device.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_sizes(len(devices), data, fsdp, model, sequence)
    shape = tuple(sizes[a] for a in AXES)
    n = math.prod(shape)
    if n == len(devices):
        # jax's layout: on accelerators the axes that talk most get the fastest links
        return jax.make_mesh(shape, AXES, devices=devices,
                             axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))
    return Mesh(np.asarray(devices[:n]).reshape(shape), AXES)


@gin.configurable(module="terraformer")
def mesh(data: int = 1, fsdp: int = 1, model: int = 1, sequence: int = 1) -> Mesh:
    """The run's mesh as gin binds it (``mesh.data = 2``, ``mesh.fsdp = -1``, ...)."""
    return make_mesh(data, fsdp, model, sequence)


def parse_mesh_spec(text: str) -> dict[str, int]:
    """``'data=2,model=2'`` as ``{'data': 2, 'model': 2}`` (for `make_mesh`); '' is {}."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in AXES:
            raise ArgumentError(
                f"mesh: each item must be AXIS=SIZE with AXIS one of {', '.join(AXES)}, got "
                f"{part!r}")
        try:
            out[name] = int(value)
        except ValueError:
            raise ArgumentError(f"mesh: {name} must be an int, got {value.strip()!r}") from None
    return out


def mesh_context(mesh):
    """``jax.set_mesh(mesh)``: the mesh in effect while a step traces and runs, which layers
    read (`layers.attention.SelfAttention` splits its sequence over its ``sequence`` axis);
    nothing for None."""
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)
