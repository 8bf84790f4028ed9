"""`terraformer bench attention`: the Long Range Arena efficiency table, on this machine.

    terraformer bench attention [--lengths 1024,2048,3072,4096,16384,65536]
                                [--mechanisms full,lsh,performer] [--batch 8] [--steps 5]

For each mechanism (a name of `attention_types.ATTENTION_TYPES`) and length it times training
steps of one shared byte-level classifier (`models.classifier.Classifier`: 4 layers, d_model
256, 4 heads, d_ff 1024, mean pooling, 10 classes) at `--batch` sequences; beyond 4K tokens a
cell that runs out of memory is retried at half the batch, down to 1 (as LRA: "the largest
batch that fits"). Each cell runs in a fresh process (`python -m terraformer.bench_attention
cell ...`), so compiled code, caches and the peak memory of one cell never reach another; the
parent kills a cell whose resident memory passes `--max_memory_gib` (an OOM) or that runs past
`--timeout` seconds.

Output: one JSON record per cell as it finishes (fields: `mechanism`, `seq_len`, `batch`,
`status` ok|oom|error|timeout|skipped, `steps_per_s`, `step_s`, `compile_s`,
`sequences_per_s`, `peak_memory_gib`, `memory` rss|device, `params`, `loss`, `device`,
`error`), then the table in the paper's form: steps per second with the speed-up over `full`
in brackets (a ratio of sequences per second, so that cells run at a smaller batch compare
fairly), and peak memory in GiB (the process's maximum resident set on CPU, the device's peak
bytes in use on an accelerator). `terraformer plot FILE` draws a saved output.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from terraformer.arguments import ArgumentParser, integer, number
from terraformer.checks import ArgumentError

__all__ = ["DEFAULT_LENGTHS", "SHAPE", "add_parser", "main", "markdown_table", "plot_attention",
           "read_records", "run_cell", "run_table"]

DEFAULT_LENGTHS = (1024, 2048, 3072, 4096, 16384, 65536)
SHAPE = dict(vocab_size=256, n_classes=10, d_model=256, d_ff=1024, n_layers=4, n_heads=4)
FIXED_BATCH_UP_TO = 4096   # LRA's table runs its batch whole up to 4K; beyond, halve on OOM
BASELINE = "full"
FAILED = {"oom": "OOM", "error": "error", "timeout": "timeout", "skipped": "-"}
OOM_MARKERS = ("RESOURCE_EXHAUSTED", "Resource exhausted", "Out of memory", "out of memory",
               "OOM")


# -- one cell, in its own process --------------------------------------------------------------
def peak_memory() -> tuple[float, str]:
    """(peak GiB, 'device' | 'rss'): the accelerator's peak bytes in use, else the process's
    maximum resident set size."""
    import jax

    device = jax.devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            return stats["peak_bytes_in_use"] / 2**30, "device"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "rss"


def run_cell(mechanism: str, seq_len: int, batch: int, steps: int,
             dropout: float = 0.1) -> dict:
    """Times `steps` training steps of the shared classifier after a first (compiling) one;
    returns the cell's record (status 'ok')."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from terraformer.models.classifier import Classifier
    from terraformer.shapes import ShapeDtype
    from terraformer.training.step import make_train_step

    model = Classifier(attention_type=mechanism, max_len=seq_len, dropout=dropout, **SHAPE)
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, SHAPE["vocab_size"], size=(batch, seq_len)).astype(np.int32)
    labels = rng.integers(0, SHAPE["n_classes"], size=(batch,)).astype(np.int32)
    data = (jnp.asarray(tokens), jnp.asarray(labels), jnp.ones((batch,), jnp.float32))
    weights, state = model.init(ShapeDtype((batch, seq_len), jnp.int32), jax.random.PRNGKey(0))
    params = int(sum(np.prod(a.shape) for a in jax.tree.leaves(weights)))
    step = make_train_step(model, optax.adam(1e-3), donate=True)
    carry = {"w": weights, "s": state, "o": step.init_opt_state(weights)}

    def run(i: int) -> float:
        start = time.perf_counter()
        carry["w"], carry["s"], carry["o"], metrics = step(
            carry["w"], carry["s"], carry["o"], data, jax.random.PRNGKey(i))
        carry["loss"] = float(jax.block_until_ready(metrics["loss"]))
        return time.perf_counter() - start

    compile_s = run(0)
    step_s = float(np.median([run(i) for i in range(1, steps + 1)]))
    peak, kind = peak_memory()
    return dict(mechanism=mechanism, seq_len=seq_len, batch=batch, status="ok",
                steps_per_s=1.0 / step_s, step_s=step_s, compile_s=compile_s,
                sequences_per_s=batch / step_s, peak_memory_gib=peak, memory=kind,
                params=params, loss=carry["loss"], steps=steps,
                device=jax.devices()[0].platform)


def _cell_main(argv: list[str]) -> int:
    """`python -m terraformer.bench_attention cell --mechanism M --seq_len L --batch B
    --steps N`: one record as the last line of stdout, a failure included."""
    from terraformer.runtime import tune_cpu_runtime

    tune_cpu_runtime()  # before JAX's first computation, as `terraformer bench` does
    parser = argparse.ArgumentParser(prog="terraformer.bench_attention cell")
    parser.add_argument("--mechanism", required=True)
    parser.add_argument("--seq_len", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--dropout", type=float, default=0.1)
    args = parser.parse_args(argv)
    cell = dict(mechanism=args.mechanism, seq_len=args.seq_len, batch=args.batch)
    try:
        record = run_cell(args.mechanism, args.seq_len, args.batch, args.steps, args.dropout)
    except Exception as e:  # noqa: BLE001 - every failure is a cell of the table
        text = f"{type(e).__name__}: {e}"
        oom = isinstance(e, MemoryError) or any(m in text for m in OOM_MARKERS)
        record = dict(cell, status="oom" if oom else "error", error=_one_line(text))
    print(json.dumps(record), flush=True)
    return 0


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


# -- the parent: cells in subprocesses, the table ----------------------------------------------
def _rss_gib(pid: int) -> float:
    """Resident memory of process `pid` (Linux /proc; 0 where unreadable)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def available_memory_gib() -> float | None:
    """MemAvailable of the machine in GiB (Linux), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def _child_env() -> dict:
    """The environment of a cell: this process's, with this copy of the package first on the
    path (so a cell runs the code its parent runs)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def run_subprocess_cell(mechanism: str, seq_len: int, batch: int, steps: int, *,
                        timeout: float, max_memory_gib: float | None,
                        dropout: float = 0.1) -> dict:
    """One cell in a fresh Python process, watched for memory and time; its record."""
    cell = dict(mechanism=mechanism, seq_len=seq_len, batch=batch)
    command = [sys.executable, "-m", "terraformer.bench_attention", "cell",
               "--mechanism", mechanism, "--seq_len", str(seq_len), "--batch", str(batch),
               "--steps", str(steps), "--dropout", str(dropout)]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(command, stdout=out, stderr=err, env=_child_env())
        start, killed = time.monotonic(), None
        while proc.poll() is None:
            if max_memory_gib is not None and _rss_gib(proc.pid) > max_memory_gib:
                killed = "oom"
            elif time.monotonic() - start > timeout:
                killed = "timeout"
            if killed:
                proc.kill()
                proc.wait()
                break
            time.sleep(0.1)
        out.seek(0)
        err.seek(0)
        lines = [line for line in out.read().splitlines() if line.startswith("{")]
        err_tail = err.read().strip().splitlines()[-1:]
    if killed == "oom":
        return dict(cell, status="oom",
                    error=f"resident memory passed --max_memory_gib {max_memory_gib:.1f}")
    if killed == "timeout":
        return dict(cell, status="timeout", error=f"ran past --timeout {timeout:g} s")
    if lines:
        return json.loads(lines[-1])
    if proc.returncode == -9:  # the kernel's OOM killer
        return dict(cell, status="oom", error="killed (SIGKILL): out of host memory")
    return dict(cell, status="error", error=_one_line(
        f"exit status {proc.returncode}: {err_tail[0] if err_tail else 'no output'}"))


def run_table(mechanisms, lengths, batch: int, steps: int, *, timeout: float = 600.0,
              max_memory_gib: float | None = None, dropout: float = 0.1, log=print,
              cell_runner=run_subprocess_cell) -> list[dict]:
    """Every (mechanism, length) cell, lengths in increasing order; `log` gets each record's
    JSON as it finishes. Beyond `FIXED_BATCH_UP_TO` tokens an OOM halves the batch (starting
    from the last batch that fitted the mechanism); once a mechanism runs out of memory or
    time at its smallest batch, its longer lengths are 'skipped'."""
    records = []
    for mechanism in mechanisms:
        start_batch, stopped = batch, None
        for seq_len in sorted(lengths):
            if stopped:
                record = dict(mechanism=mechanism, seq_len=seq_len, batch=start_batch,
                              status="skipped", error=f"{stopped} at a shorter length")
            else:
                b = start_batch if seq_len > FIXED_BATCH_UP_TO else batch
                while True:
                    record = cell_runner(mechanism, seq_len, b, steps, timeout=timeout,
                                         max_memory_gib=max_memory_gib, dropout=dropout)
                    if record["status"] == "oom" and seq_len > FIXED_BATCH_UP_TO and b > 1:
                        b //= 2
                        continue
                    break
                if record["status"] == "ok":
                    start_batch = b
                elif record["status"] in ("oom", "timeout"):
                    stopped = record["status"]
            records.append(record)
            log(json.dumps(record))
    return records


def _length_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def markdown_table(records: list[dict], requested_batch: int | None = None) -> str:
    """The LRA efficiency table: a row per mechanism, steps/s per length with the speed-up
    over `full` in brackets, then peak memory (GiB) per length. A cell run at a smaller batch
    than `requested_batch` says so (`b4`); a failed one says how it failed."""
    lengths = sorted({r["seq_len"] for r in records})
    mechanisms = list(dict.fromkeys(r["mechanism"] for r in records))
    cells = {(r["mechanism"], r["seq_len"]): r for r in records}
    if requested_batch is None:
        requested_batch = max((r["batch"] for r in records), default=1)

    def speed(rec):
        if rec is None:
            return ""
        if rec["status"] != "ok":
            return FAILED.get(rec["status"], rec["status"])
        text = f"{rec['steps_per_s']:.3g}"
        base = cells.get((BASELINE, rec["seq_len"]))
        if rec["mechanism"] != BASELINE and base is not None and base["status"] == "ok":
            text += f" ({rec['sequences_per_s'] / base['sequences_per_s']:.2f}x)"
        if rec["batch"] < requested_batch:
            text += f" b{rec['batch']}"
        return text

    def memory(rec):
        if rec is None:
            return ""
        if rec["status"] != "ok":
            return FAILED.get(rec["status"], rec["status"])
        return f"{rec['peak_memory_gib']:.2f}"

    labels = [_length_label(n) for n in lengths]
    header = (["mechanism"] + [f"steps/s {x}" for x in labels]
              + [f"peak GiB {x}" for x in labels])
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m in mechanisms:
        row = ([m] + [speed(cells.get((m, n))) for n in lengths]
               + [memory(cells.get((m, n))) for n in lengths])
        rows.append("| " + " | ".join(row) + " |")
    return "\n".join(rows)


def read_records(path) -> list[dict]:
    """The cell records in a saved `bench attention` output (other lines are skipped)."""
    records = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and {"mechanism", "seq_len", "status"} <= set(record):
            records.append(record)
    return records


def plot_attention(path, out=None) -> Path:
    """Draws a saved `bench attention` output: sequences per second and peak memory against
    length, one line per mechanism, log axes; failed cells are left out. Returns the PNG's
    path (default: `path` with the suffix .png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_records(path) if r["status"] == "ok"]
    if not records:
        raise ValueError(f"'{path}' holds no successful `bench attention` cell records")
    out = Path(out) if out is not None else Path(path).with_suffix(".png")
    fig, (ax_speed, ax_memory) = plt.subplots(1, 2, figsize=(12, 4.5))
    for mechanism in dict.fromkeys(r["mechanism"] for r in records):
        mine = sorted((r for r in records if r["mechanism"] == mechanism),
                      key=lambda r: r["seq_len"])
        lengths = [r["seq_len"] for r in mine]
        ax_speed.plot(lengths, [r["sequences_per_s"] for r in mine], "o-", label=mechanism)
        ax_memory.plot(lengths, [r["peak_memory_gib"] for r in mine], "o-", label=mechanism)
    lengths = sorted({r["seq_len"] for r in records})
    for ax, title in ((ax_speed, "training speed (sequences / s)"),
                      (ax_memory, "peak memory (GiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(lengths, [_length_label(n) for n in lengths])
        ax.minorticks_off()
        ax.set_xlabel("sequence length (tokens)")
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# -- the command line --------------------------------------------------------------------------
def _int_list(text: str) -> list[int]:
    parse = integer(1)
    values = [parse(part) for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"must be a comma-separated list of ints, got {text!r}")
    return values


def _mechanism_list(text: str) -> list[str]:
    from terraformer.layers.attention_types import ATTENTION_TYPES

    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in ATTENTION_TYPES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"must be names among {', '.join(ATTENTION_TYPES)}, got {text!r}")
    return names


def add_parser(subparsers) -> ArgumentParser:
    """Adds the `attention` subcommand to `terraformer bench`'s subparsers."""
    p = subparsers.add_parser("attention", help="the LRA efficiency table: training steps of "
                              "one classifier per attention mechanism and length",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=_int_list, default=list(DEFAULT_LENGTHS))
    p.add_argument("--mechanisms", type=_mechanism_list, default=None,
                   help="comma-separated names (default: every registered mechanism)")
    p.add_argument("--batch", type=integer(1), default=8)
    p.add_argument("--steps", type=integer(1), default=5,
                   help="timed steps per cell after the compiling one (the median is kept)")
    p.add_argument("--timeout", type=number(0.0, allow_minimum=False), default=600.0,
                   help="seconds a cell may run, compile included")
    p.add_argument("--max_memory_gib", type=number(0.0, allow_minimum=False), default=None,
                   help="host memory a cell may hold (default: 80%% of the memory available "
                        "at the start)")
    p.add_argument("--dropout", type=number(0.0, 1.0, allow_maximum=False), default=0.1)
    p.add_argument("--output", default=None, metavar="FILE.jsonl",
                   help="also write the records there (for `terraformer plot FILE.jsonl`)")
    return p


def main(args) -> int:
    """Runs the table for parsed `bench attention` arguments; prints records, then the table."""
    from terraformer.layers.attention_types import ATTENTION_TYPES

    # (by default not 'ring': on one device it is 'full'; it differs only on a sequence axis)
    mechanisms = args.mechanisms or [name for name in ATTENTION_TYPES if name != "ring"]
    max_memory = args.max_memory_gib
    if max_memory is None:
        available = available_memory_gib()
        max_memory = 0.8 * available if available else None
    records = run_table(mechanisms, args.lengths, args.batch, args.steps,
                        timeout=args.timeout, max_memory_gib=max_memory, dropout=args.dropout)
    if args.output:
        Path(args.output).write_text("".join(json.dumps(r) + "\n" for r in records))
    print()
    print(markdown_table(records, args.batch), flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] != ["cell"]:
        raise SystemExit(ArgumentError("usage: python -m terraformer.bench_attention cell ..."))
    sys.exit(_cell_main(sys.argv[2:]))
