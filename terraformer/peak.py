"""The machine's floor: its float32 matmul rate and memory-read bandwidth, measured once.

    record = load_or_measure()      # the cached record, or a fresh measurement (then cached)
    record["flops_per_s"], record["read_bytes_per_s"]

`measure()` times, through `jax.jit` on the default device, float32 matmuls of the shapes the
benchmark models multiply by ([tokens, d_model] x [d_model, d_ff] of the T and D workloads)
and takes the best rate of any (best of `repeats` calls each, after a compiling call); and a
matrix-vector product reading a 1 GiB float32 matrix (what a decoding step is: every weight
read once for one token), bytes read over the best time. A floor fraction is then achieved
FLOP/s over `flops_per_s`, or a floor time FLOPs / `flops_per_s` and bytes / `read_bytes_per_s`.

The record is cached as JSON (default `$XDG_CACHE_HOME/terraformer/peak.json`, else
`~/.cache/terraformer/peak.json`) with the machine it was measured on (platform, device kind,
CPU count, jax version); `load_or_measure` measures again when the cached machine differs.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

# [M, K] x [K, N]: a T-workload feed-forward at 16K tokens (d_model 256, 4 x d_model) and a
# D-workload one on a prefill chunk of 1,024 tokens (d_model 1,024, d_ff 4,096).
MATMUL_SHAPES = ((16384, 256, 1024), (1024, 1024, 4096))
READ_BYTES = 1 << 30
READ_ROW = 1024


def machine() -> dict:
    """What a cached record is valid for."""
    device = jax.devices()[0]
    return {"platform": device.platform, "device_kind": device.device_kind,
            "cpu_count": os.cpu_count(), "jax": jax.__version__, "node": platform.node()}


def best_time(fn, *args, repeats: int) -> float:
    """Best wall time of `repeats` calls of fn(*args), after one call that compiles it."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def matmul_flops_per_s(m: int, k: int, n: int, repeats: int = 5) -> float:
    """2 m k n / the best time of a jitted float32 [m, k] x [k, n] matmul."""
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((m, k), np.float32))
    b = jnp.asarray(rng.standard_normal((k, n), np.float32))
    return 2 * m * k * n / best_time(jax.jit(jnp.matmul), a, b, repeats=repeats)


def read_bytes_per_s(n_bytes: int = READ_BYTES, repeats: int = 5) -> float:
    """Bytes of a float32 [n_bytes / 4 / READ_ROW, READ_ROW] matrix over the best time of a
    jitted matrix-vector product with it (each entry read once, two FLOPs per 4 bytes)."""
    rows = max(1, n_bytes // (4 * READ_ROW))
    matrix = jnp.asarray(np.ones((rows, READ_ROW), np.float32))
    vector = jnp.asarray(np.ones((READ_ROW,), np.float32))
    seconds = best_time(jax.jit(jnp.matmul), matrix, vector, repeats=repeats)
    return matrix.nbytes / seconds


def measure(matmul_shapes=MATMUL_SHAPES, read_bytes: int = READ_BYTES,
            repeats: int = 5) -> dict:
    """A fresh peak record: `flops_per_s` (the best matmul), `read_bytes_per_s`, each
    matmul's rate under `matmuls`, and `machine()`."""
    rates = [{"shape": [m, k, n], "flops_per_s": matmul_flops_per_s(m, k, n, repeats)}
             for m, k, n in matmul_shapes]
    return {"flops_per_s": max(r["flops_per_s"] for r in rates),
            "read_bytes_per_s": read_bytes_per_s(read_bytes, repeats),
            "matmuls": rates, "read_stream_bytes": read_bytes, "repeats": repeats,
            "machine": machine(), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                               time.gmtime())}


def default_path() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "terraformer" / "peak.json"


def save(record: dict, path: str | Path | None = None) -> Path:
    path = Path(path) if path is not None else default_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def load(path: str | Path | None = None) -> dict | None:
    """The cached record at `path` if it exists and was measured on this machine, else None."""
    path = Path(path) if path is not None else default_path()
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    for key in ("flops_per_s", "read_bytes_per_s", "machine"):
        if key not in record:
            raise ValueError(f"peak record {path} lacks {key!r}; measure it again with "
                             f"`terraformer bench peak --peak_file {path}`")
    return record if record["machine"] == machine() else None


def load_or_measure(path: str | Path | None = None) -> dict:
    """The cached record of this machine, or a fresh measurement, then cached at `path`."""
    record = load(path)
    if record is None:
        record = measure()
        save(record, path)
    return record
