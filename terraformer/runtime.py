"""Process settings that make XLA:CPU fast on this library's workloads.

They change the whole process, so a library must not apply them on import: the programs call
``tune_cpu_runtime()`` explicitly (``terraformer`` on the command line and ``terraformer bench``
before JAX creates its backend, the benchmark scripts, the notebooks' first cell).

Four measured problems, four settings (see benchmarks/RESULTS.md for the figures):

- XLA:CPU in jax 0.10 routes dots and reductions through YNNPACK fusions by default; on the
  batched chunk-by-chunk products of chunked and LSH attention those ran slower than XLA's own
  kernels. `--xla_cpu_experimental_ynn_fusion_type=` (an empty list) turns them off.
- XLA:CPU's default copy insertion copies a buffer that a computation both reads and updates
  in place, even when every read can come first: each decoding step then copied every layer's
  key/value cache twice, a cost that grows with the context.
  `--xla_cpu_copy_insertion_use_region_analysis=true` (the analysis XLA:GPU uses) orders the
  reads before the update instead.
- glibc's malloc hands buffers above 32 MiB back to the kernel when XLA frees them, so every
  step page-faults its large temporaries in again. Raising the mmap and trim thresholds
  (`mallopt`) keeps that memory in the process for the next step.

- XLA:CPU aborts the process (SIGABRT, nothing on stdout) when a device waits at a collective
  for more than 20 + 40 seconds for the others. The simulated devices of
  `--xla_force_host_platform_device_count` share the machine's cores, so on a loaded machine one
  device can lag that far behind in a long step (`terraformer bench train --mesh data=4` at
  4,096 tokens died so). `--xla_cpu_collective_call_terminate_timeout_seconds` gives them an
  hour, and the "stuck" warning comes after ten minutes instead of twenty seconds.

None is applied when the environment sets `TERRAFORMER_CPU_TUNING=0`, and a flag already
present in `XLA_FLAGS` is left as it is. The XLA flags take effect only if set before JAX
creates its CPU backend (the first array op).
"""

from __future__ import annotations

import ctypes
import os
import sys

_XLA_FLAGS = {
    "--xla_cpu_experimental_ynn_fusion_type": "",
    "--xla_cpu_copy_insertion_use_region_analysis": "true",
    "--xla_cpu_collective_call_warn_stuck_timeout_seconds": "600",
    "--xla_cpu_collective_call_terminate_timeout_seconds": "3600",
}
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_BYTES = 1 << 30


def tune_cpu_runtime() -> dict:
    """Applies the settings above (idempotent); returns what was applied."""
    applied = {}
    if os.environ.get("TERRAFORMER_CPU_TUNING", "1") == "0":
        return applied
    flags = os.environ.get("XLA_FLAGS", "")
    missing = [f"{flag}={value}" for flag, value in _XLA_FLAGS.items() if flag not in flags]
    if missing:
        os.environ["XLA_FLAGS"] = " ".join([flags, *missing]).strip()
        applied["XLA_FLAGS"] = os.environ["XLA_FLAGS"]
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6")
            ok = libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(_KEEP_BYTES))
            ok &= libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(2 * _KEEP_BYTES - 1))
            applied["mallopt"] = bool(ok)
        except (OSError, AttributeError):  # not glibc (musl, ...): leave malloc alone
            pass
    return applied
