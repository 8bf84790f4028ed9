"""What a step costs each device of a mesh: the per-device peak XLA plans for the compiled
SPMD program (every device runs the same program on its shards), and on accelerators the
peak bytes each device reports having used."""

from __future__ import annotations

import jax

__all__ = ["batch_rows", "mesh_memory"]

GIB = 2**30


def batch_rows(mesh) -> int:
    """Rows of a batch that puts one sequence on each device of ``data`` x ``fsdp`` (1
    without a mesh)."""
    return 1 if mesh is None else int(mesh.shape["data"] * mesh.shape["fsdp"])


def mesh_memory(compiled, mesh) -> dict:
    """Per-device figures of a compiled step: ``compiled_peak_gib`` (arguments + outputs +
    temporaries - donated aliases, from XLA's memory analysis of the per-device program) and,
    where devices report it, ``device_peak_gib`` (the largest peak_bytes_in_use among the
    mesh's devices)."""
    devices = list(mesh.devices.flat) if mesh is not None else jax.devices()[:1]
    record = {"mesh": dict(mesh.shape) if mesh is not None else None,
              "n_devices": len(devices)}
    analysis = compiled.memory_analysis()
    if analysis is not None:
        peak = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)
        record["compiled_peak_gib"] = peak / GIB
        record["compiled_temp_gib"] = analysis.temp_size_in_bytes / GIB
    stats = [d.memory_stats() or {} for d in devices if d.platform != "cpu"]
    peaks = [s["peak_bytes_in_use"] for s in stats if "peak_bytes_in_use" in s]
    if peaks:
        record["device_peak_gib"] = max(peaks) / GIB
    return record
