"""The mesh tables of issue 20, in one command, on simulated CPU devices.

    nice -n 10 python benchmarks/mesh_table.py                       # 1, 2, 4 devices, 4,096 tokens
    python benchmarks/mesh_table.py --devices 1,4 --budget_gib 0.5 --out results/mesh.jsonl
    python benchmarks/mesh_table.py --skip_search      # the first table only
    python benchmarks/mesh_table.py --skip_table       # the longest-sequence search only

1. **Each kind of parallelism** on the T workload (../shared/BENCHMARKS.md: the T-len model,
   `--seq_len` tokens): for every device count N of `--devices`, a fresh process started with
   ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` runs ``terraformer bench train
   --mesh M`` for M = data=N and fsdp=N (a batch of N sequences, one per device), model=N and
   sequence=N (one sequence; sequence parallelism with ring attention and with chunked local
   attention's halo exchange, `layers/ring.py`), ``--memory_efficient`` rows (the per-block
   trainer; on N > 1 devices over fsdp=N), and on the most devices LSH over sequence=N (as
   XLA partitions it: LSH has no sequence-parallel form). One device runs LSH, ring (= full)
   and local attention, the references of the rows above. Each row
   gives the step time (median of `--repeats` steps after a compiling one), tokens per second,
   the per-device peak (XLA's memory analysis of the compiled per-device SPMD program:
   arguments + outputs + temporaries - donated aliases, as `bench train --mesh` reports it; the
   memory-efficient step is several compiled pieces and has none: its row gives the process's
   peak RSS, all N simulated devices and the host copies together) and the loss.
2. **The longest sequence** that sequence parallelism trains on `--search_devices` simulated
   devices (``sequence=N``) against one device, at the same per-device budget: for each
   attention of `--search_attention`, the T model's training step at 2^k tokens is lowered and
   compiled (never run) for k = log2(`--search_start`), ... until its compiled per-device peak
   exceeds `--budget_gib` (or `--search_max` is reached); the last length under the budget is
   the answer.

Step times of simulated devices share this machine's cores (the N devices of a process run on
the same CPUs, and collectives are in-process copies): they are indicative only, and say nothing
about N real devices. The memory figures are XLA's plan for one device's program and do not
depend on the load.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20


def _env(n_devices: int) -> dict:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n_devices}"])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def _last_json(text: str):
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{") or line.startswith("["):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def _run(cmd: list[str], n_devices: int, timeout: float) -> tuple[dict | None, str]:
    """(the last JSON line of ``cmd`` run with ``n_devices`` simulated devices, or None; why
    not)."""
    try:
        out = subprocess.run(cmd, env=_env(n_devices), capture_output=True, text=True,
                             timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return None, f"over the {timeout:.0f} s limit"
    record = _last_json(out.stdout) if out.returncode == 0 else None
    if record is None:
        tail = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
        return None, f"exit {out.returncode}: {tail[:200]}"
    return record, ""


def _append(path, record: dict):
    """Appends ``record`` to the JSONL file at ``path`` (if any) as soon as it is measured."""
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def table_rows(devices, seq_len: int) -> list[dict]:
    """The rows of table 1: device count, the kind of parallelism, bench arguments."""
    rows = []
    for n in devices:
        if n == 1:
            rows += [dict(n=1, kind="one device", mesh="data=1", attention=a)
                     for a in ("lsh", "ring", "local")]
            rows.append(dict(n=1, kind="memory-efficient", mesh="", attention="lsh",
                             memory_efficient=True))
            continue
        rows += [dict(n=n, kind="data", mesh=f"data={n}", attention="lsh"),
                 dict(n=n, kind="fsdp", mesh=f"fsdp={n}", attention="lsh"),
                 dict(n=n, kind="model", mesh=f"model={n}", attention="lsh"),
                 dict(n=n, kind="sequence (ring)", mesh=f"sequence={n}", attention="ring"),
                 dict(n=n, kind="sequence (local: halo)", mesh=f"sequence={n}",
                      attention="local"),
                 dict(n=n, kind="memory-efficient fsdp", mesh=f"fsdp={n}", attention="lsh",
                      memory_efficient=True)]
        if n == max(devices):  # LSH has no sequence-parallel form: as XLA partitions it
            rows.append(dict(n=n, kind="sequence (lsh: XLA-partitioned)",
                             mesh=f"sequence={n}", attention="lsh"))
    for row in rows:
        row["seq_len"] = seq_len
        row["batch"] = math.prod(int(part.split("=")[1]) for part in row["mesh"].split(",")
                                 if part.split("=")[0] in ("data", "fsdp")) if row["mesh"] \
            else 1
    return rows


def run_table(args) -> list[dict]:
    records = []
    rows = table_rows(args.devices, args.seq_len)
    if args.kinds:
        rows = [r for r in rows if any(k in r["kind"] for k in args.kinds)]
    for row in rows:
        cmd = [sys.executable, "-m", "terraformer.cli", "bench", "train", "--seq_len",
               str(row["seq_len"]), "--attention", row["attention"], "--n_layers",
               str(args.n_layers), "--repeats", str(args.repeats)]
        if row["mesh"]:
            cmd += ["--mesh", row["mesh"]]
        if row.get("memory_efficient"):
            cmd.append("--memory_efficient")
        start = time.perf_counter()
        record, why = _run(cmd, row["n"], args.timeout)
        # (the record's own 'mesh' is the axis sizes: kept as 'mesh_shape')
        row.update({("mesh_shape" if k == "mesh" else k): v for k, v in (record or {}).items()},
                   failed=why, wall_s=time.perf_counter() - start, command=" ".join(cmd[1:]))
        records.append(row)
        _append(args.out, row)
        print(f"# {row['n']} device(s) {row['kind']} {row['mesh']} {row['attention']}: "
              f"{'ok' if record else why} ({row['wall_s']:.0f} s)", file=sys.stderr, flush=True)
    return records


def _fmt(value, scale=1.0, digits=3):
    return "-" if value is None else f"{value * scale:.{digits}g}"


def print_table(records: list[dict], seq_len: int):
    print(f"\n## Each kind of parallelism: T workload at {seq_len:,} tokens "
          "(simulated CPU devices)\n")
    print("| devices | parallelism | mesh | attention | batch | step s | tokens/s | "
          "per-device peak MiB | peak RSS GiB | loss |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in records:
        if r.get("failed"):
            print(f"| {r['n']} | {r['kind']} | {r['mesh'] or '-'} | {r['attention']} | "
                  f"{r['batch']} | failed: {r['failed']} | | | | |")
            continue
        peak = r.get("compiled_peak_gib")
        print(f"| {r['n']} | {r['kind']} | {r['mesh'] or '-'} | {r['attention']} | "
              f"{r['batch']} | {_fmt(r.get('step_s'))} | {_fmt(r.get('tokens_per_s'), 1, 4)} "
              f"| {_fmt(None if peak is None else peak * 1024, 1, 4)} | "
              f"{_fmt(r.get('peak_rss_gib'))} | {_fmt(r.get('loss'), 1, 6)} |")


# -- the longest sequence under a per-device budget (compiled, not run) ----------------------

def search(attention: str, mesh_text: str, budget_gib: float, start: int, stop: int,
           n_layers: int) -> list[dict]:
    """In this process (its device count already set): the compiled per-device peak of the T
    model's training step at start, 2 x start, ... tokens, until it exceeds ``budget_gib``."""
    from terraformer.runtime import tune_cpu_runtime

    tune_cpu_runtime()
    import jax
    import jax.numpy as jnp
    import optax

    from terraformer.bench import t_workload_model
    from terraformer.parallel.measure import batch_rows, mesh_memory
    from terraformer.parallel.mesh import make_mesh, parse_mesh_spec
    from terraformer.shapes import ShapeDtype
    from terraformer.training.step import make_train_step

    mesh = make_mesh(**parse_mesh_spec(mesh_text)) if mesh_text else None
    rows = batch_rows(mesh)
    out = []
    length = start
    while length <= stop:
        model = t_workload_model(length, n_layers, attention)
        weights, state = jax.eval_shape(
            lambda model=model, length=length: model.init(
                ShapeDtype((rows, length), jnp.int32), jax.random.PRNGKey(0)))
        optimizer = optax.adam(1e-3)
        opt_state = jax.eval_shape(optimizer.init, weights)
        tokens = jax.ShapeDtypeStruct((rows, length), jnp.int32)
        batch = (tokens, tokens, jax.ShapeDtypeStruct((rows, length), jnp.float32))
        rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
        step = make_train_step(model, optimizer, donate=True, mesh=mesh)
        began = time.perf_counter()
        try:
            compiled = step.lower(weights, state, opt_state, batch, rng).compile()
        except Exception as error:  # noqa: BLE001 (a length that cannot compile ends it)
            out.append({"seq_len": length, "error": f"{type(error).__name__}: {error}"[:300]})
            break
        record = mesh_memory(compiled, mesh)
        record.update(seq_len=length, attention=attention, mesh_text=mesh_text or "one device",
                      compile_s=time.perf_counter() - began)
        out.append(record)
        print(json.dumps(record), file=sys.stderr, flush=True)
        if record.get("compiled_peak_gib", 0.0) > budget_gib:
            break
        length *= 2
    return out


def run_search(args) -> list[dict]:
    results = []
    for attention in args.search_attention:
        for n in (1, args.search_devices):
            mesh_text = "" if n == 1 else f"sequence={n}"
            cmd = [sys.executable, str(Path(__file__).resolve()), "_search", attention,
                   mesh_text, str(args.budget_gib), str(args.search_start),
                   str(args.search_max), str(args.n_layers)]
            start = time.perf_counter()
            steps, why = _run(cmd, n, args.timeout)
            fits = [s for s in steps or [] if s.get("compiled_peak_gib", math.inf)
                    <= args.budget_gib]
            results.append({"attention": attention, "n": n, "mesh": mesh_text or "-",
                            "steps": steps or [], "failed": why,
                            "longest": max((s["seq_len"] for s in fits), default=None),
                            "wall_s": time.perf_counter() - start})
            _append(args.out, results[-1])
            print(f"# search {attention} on {n} device(s): "
                  f"{results[-1]['longest'] or why} ({results[-1]['wall_s']:.0f} s)",
                  file=sys.stderr, flush=True)
    return results


def print_search(results: list[dict], budget_gib: float, search_max: int):
    print(f"\n## The longest power-of-two sequence under {budget_gib:g} GiB per device "
          "(compiled per-device peak of the T model's training step, batch 1)\n")
    print("| attention | devices | mesh | longest sequence | its per-device peak MiB | "
          "next length: peak MiB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        peaks = {s["seq_len"]: s.get("compiled_peak_gib") for s in r["steps"]}
        longest = r["longest"]
        over = [s for s in r["steps"] if s["seq_len"] > (longest or 0)]
        nxt = "-" if not over else (
            f"{over[0]['seq_len']:,}: {over[0]['compiled_peak_gib'] * 1024:.4g}"
            if "compiled_peak_gib" in over[0] else f"{over[0]['seq_len']:,}: "
            f"{over[0].get('error', '?')[:60]}")
        if longest is not None and longest * 2 > search_max and not over:
            nxt = f"(search stopped at --search_max {search_max:,})"
        print(f"| {r['attention']} | {r['n']} | {r['mesh']} | "
              f"{'-' if longest is None else f'{longest:,}'} | "
              f"{'-' if longest is None else f'{peaks[longest] * 1024:.4g}'} | "
              f"{nxt if not r['failed'] else 'failed: ' + r['failed']} |")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_search":  # the child process of `run_search`
        attention, mesh_text, budget, start, stop, n_layers = argv[1:]
        print(json.dumps(search(attention, mesh_text, float(budget), int(start), int(stop),
                                int(n_layers))), flush=True)
        return 0
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    parser.add_argument("--devices", type=ints, default=[1, 2, 4])
    parser.add_argument("--seq_len", type=int, default=4096)
    parser.add_argument("--n_layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--kinds", type=lambda t: [k for k in t.split(",") if k],
                        default=[], help="only the table rows whose kind contains one of "
                        "these words, comma-separated (e.g. 'sequence,one device')")
    parser.add_argument("--budget_gib", type=float, default=1.0)
    parser.add_argument("--search_devices", type=int, default=4)
    parser.add_argument("--search_attention", type=lambda t: t.split(","), default=["ring"],
                        help="attention types to search, comma-separated (ring, local, ...)")
    parser.add_argument("--search_start", type=int, default=4096)
    parser.add_argument("--search_max", type=int, default=1 << 20)
    parser.add_argument("--timeout", type=float, default=3600.0,
                        help="seconds each process may take")
    parser.add_argument("--skip_table", action="store_true")
    parser.add_argument("--skip_search", action="store_true")
    parser.add_argument("--out", default=None,
                        help="append each record to this JSONL file as it is measured")
    args = parser.parse_args(argv)
    print(f"# python benchmarks/mesh_table.py {' '.join(argv)}".rstrip())
    records = [] if args.skip_table else run_table(args)
    results = [] if args.skip_search else run_search(args)
    if records:
        print_table(records, args.seq_len)
    if results:
        print_search(results, args.budget_gib, args.search_max)
    print("\nStep times: simulated devices share this machine's cores; indicative only. "
          "Memory: XLA's compiled per-device plan (independent of the load).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
