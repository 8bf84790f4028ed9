"""Several processes (hosts) as one program, and arrays laid out across them.

`initialize` starts `jax.distributed` before anything touches a device: from the command line
(``terraformer train --coordinator HOST:PORT --num_processes N --process_id I``) or from the
environment jax reads (``JAX_COORDINATOR_ADDRESS``, with ``JAX_NUM_PROCESSES`` and
``JAX_PROCESS_ID``). On CPU the processes talk through gloo (jax's default CPU collectives).

Every process runs the same program on the same global arrays. `put` and `global_batch` build
those arrays from host values that each process has: a process hands over only the pieces
its own devices hold (`jax.make_array_from_callback`), so for a batch a process transfers its
rows only, the ones `process_rows` names.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from terraformer.checks import check_int

__all__ = ["distributed_settings", "global_batch", "initialize", "process_rows", "put"]

ENV_COORDINATOR, ENV_PROCESSES, ENV_PROCESS_ID = (
    "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def distributed_settings(coordinator: str | None = None, num_processes: int | None = None,
                         process_id: int | None = None, environ=None) -> dict | None:
    """The arguments of `jax.distributed.initialize` from the given values, the environment
    filling in what is None; None when neither names a coordinator (one process)."""
    environ = os.environ if environ is None else environ
    coordinator = coordinator or environ.get(ENV_COORDINATOR)
    if not coordinator:
        if num_processes is not None or process_id is not None:
            raise ValueError("--num_processes and --process_id need --coordinator HOST:PORT "
                             f"(or {ENV_COORDINATOR} in the environment)")
        return None
    if num_processes is None and environ.get(ENV_PROCESSES):
        num_processes = int(environ[ENV_PROCESSES])
    if process_id is None and environ.get(ENV_PROCESS_ID):
        process_id = int(environ[ENV_PROCESS_ID])
    if num_processes is None or process_id is None:
        raise ValueError(f"a coordinator ({coordinator}) needs --num_processes and --process_id "
                         f"(or {ENV_PROCESSES} and {ENV_PROCESS_ID} in the environment)")
    check_int("num_processes", num_processes, 1, "distributed")
    check_int("process_id", process_id, 0, "distributed", maximum=num_processes - 1)
    return {"coordinator_address": coordinator, "num_processes": num_processes,
            "process_id": process_id}


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """`jax.distributed.initialize` with `distributed_settings`; returns whether it ran (False:
    a single process). Call it before any JAX computation or device query."""
    settings = distributed_settings(coordinator, num_processes, process_id)
    if settings is None:
        return False
    jax.distributed.initialize(**settings)
    return True


def put(tree, shardings):
    """``tree`` (arrays every process holds the same values of) as global arrays with
    ``shardings``; each process transfers only the pieces its devices hold."""

    def one(x, sharding):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(one, tree, shardings)


def global_batch(batch, shardings):
    """A batch of host arrays (the same global batch on every process, as a deterministic
    stream gives it) as global arrays: each process sends only its rows to its devices."""
    return put(tuple(np.asarray(x) for x in batch), tuple(shardings))


def process_rows(sharding, shape: tuple[int, ...]) -> slice:
    """The rows of a ``[batch, ...]`` array with ``sharding`` that this process's devices
    hold (one contiguous block for the batch shardings of `parallel.sharding`)."""
    starts, stops = [], []
    for index in sharding.addressable_devices_indices_map(tuple(shape)).values():
        rows = index[0] if index else slice(None)
        start, stop, _ = rows.indices(shape[0])
        starts.append(start)
        stops.append(stop)
    return slice(min(starts), max(stops))
