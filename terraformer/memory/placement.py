"""Placement of arrays in a device's memory kinds: device memory or pinned host memory.

JAX gives each device several memory spaces (`device.addressable_memories()`): its own
memory and, on CPU and GPU, `pinned_host`. An array's sharding names the space it lives in;
`jax.device_put` to a sharding of another kind moves it, outside `jax.jit` or inside it (where
it becomes a transfer the compiler schedules). Large, rarely touched arrays (optimizer slots,
the weights of layers not computing now) can then wait in host memory.

Where a backend has no `pinned_host` kind, `to_host` leaves arrays where they are and
`offload_reason` says why: the results are the same, only the placement differs.
"""

from __future__ import annotations

import jax

__all__ = [
    "device_memory_kind",
    "host_memory_kind",
    "memory_kinds",
    "offload_reason",
    "on_memory_kind",
    "to_device",
    "to_host",
]


def memory_kinds(device=None) -> tuple[str, ...]:
    """The memory kinds `device` (default: the first device) can address."""
    device = device or jax.devices()[0]
    try:
        return tuple(m.kind for m in device.addressable_memories())
    except Exception:  # noqa: BLE001 (a backend without the memories API)
        return ()


def host_memory_kind(device=None) -> str | None:
    """'pinned_host' where the device has it (CPU and GPU in jax 0.10), else None.

    Only pinned host memory is used: it is what device transfers (DMA) read and write
    directly. 'unpinned_host' alone is not taken: moving to and from it stages through a
    pinned buffer, which defeats the point.
    """
    return "pinned_host" if "pinned_host" in memory_kinds(device) else None


def device_memory_kind(device=None) -> str:
    """The kind of the device's own (default) memory, e.g. 'device'."""
    device = device or jax.devices()[0]
    return device.default_memory().kind


def offload_reason(device=None) -> str:
    """Why arrays will or will not be offloaded on `device`, in words."""
    device = device or jax.devices()[0]
    kinds = memory_kinds(device)
    if "pinned_host" in kinds:
        return f"{device.platform}: offloading to pinned_host (memory kinds {list(kinds)})"
    if not kinds:
        return (f"{device.platform}: the device reports no memory kinds (no "
                "addressable_memories); keeping everything in device memory")
    return (f"{device.platform}: no pinned_host memory kind (has {list(kinds)}); keeping "
            "everything in device memory")


def _sharding(kind: str, device=None):
    device = device or jax.devices()[0]
    return jax.sharding.SingleDeviceSharding(device, memory_kind=kind)


def to_host(tree, device=None):
    """`tree` with every array in pinned_host memory (unchanged without one).

    Without ``device``, each array keeps its layout (one device, or its shards over a mesh:
    each device's shard goes to that device's host memory) and only its memory kind changes;
    a host value goes to the first device's. With ``device``, everything goes to that one.
    Works outside and inside `jax.jit` (inside, it marks a transfer the compiler schedules).
    """
    kind = host_memory_kind(device)
    if kind is None:
        return tree
    if device is None:
        return jax.device_put(tree, jax.memory.Space.Host)
    return jax.device_put(tree, _sharding(kind, device))


def to_device(tree, device=None):
    """`tree` with every array in device (default) memory; the layout as in `to_host`."""
    if device is None:
        return jax.device_put(tree, jax.memory.Space.Device)
    return jax.device_put(tree, _sharding(device_memory_kind(device), device))


def on_memory_kind(tree, kind: str) -> bool:
    """Whether every array of `tree` lives in memory of kind `kind`."""
    return all(getattr(getattr(a, "sharding", None), "memory_kind", None) == kind
               for a in jax.tree.leaves(tree))
