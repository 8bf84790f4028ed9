"""Runs workloads of ../shared/BENCHMARKS.md, one process each, and appends JSON records.

    python benchmarks/run.py T-len T-full T-depth [--peer /tmp/trax-venv/bin/python]
    python benchmarks/run.py T-len --lengths 4096,16384 --out benchmarks/results/t.jsonl
    python benchmarks/run.py D-prompt-dense D-prompt-lsh D-prompt-sparse --lengths 128,1024
    python benchmarks/run.py --table benchmarks/results/t.jsonl     # the table of past records

Each workload is `terraformer bench ...` in a fresh process (so peak RSS is its own); the last
line it prints is its record. With `--peer PYTHON`, the same workload also runs on trax 1.4.1
through ../shared/peer/bench_trax.py under that interpreter, right after ours, so the two are
measured in one run. A length that fails (out of memory, over the time limit) ends that series.

At the end, a table on stderr sets each workload's records side by side with their floors
(`terraformer bench peak`'s record, measured once and cached): the step's model FLOPs, the
FLOP/s achieved and their fraction of the peak (`floor_fraction`); for decoding, the prefill
against its FLOP floor and the time to the first token. trax's records carry no FLOP count:
its model is the same as ours when workload, length, depth and parameter count agree, and its
fraction is then our `model_flops` over its step time and our peak; otherwise '-'.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEER = ROOT.parent / "shared" / "peer" / "bench_trax.py"

SERIES = {
    "T-len": [("train", {"seq_len": n, "attention": "lsh"})
              for n in (4096, 16384, 65536, 262144, 1048576)],
    "T-full": [("train", {"seq_len": n, "attention": "full"}) for n in (4096, 16384, 65536)],
    "T-depth": [("train", {"seq_len": 16384, "attention": "lsh", "n_layers": k})
                for k in (2, 4, 8, 16)],
    # Long documents (issue 22): time to first token, prefill against its FLOP floor and the
    # per-token latency after prompts of growing length; a series per model, so that a
    # length one model cannot reach ends only its own series.
    **{f"D-prompt-{model}": [("decode", {"model": model, "prompt_len": n, "new_tokens": 32})
                             for n in (128, 1024, 16384, 65536)]
       for model in ("dense", "lsh", "sparse")},
}


def _flags(params: dict) -> list[str]:
    out = []
    for key, value in params.items():
        out += [f"--{key}", str(value)]
    return out


def run_one(cmd: list[str], timeout: float) -> dict | None:
    """Runs `cmd`; returns the JSON record on its last line, or None with the reason printed."""
    start = time.time()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        print(f"  timed out after {timeout:.0f}s: {' '.join(cmd)}", file=sys.stderr)
        return None
    lines = [line for line in proc.stdout.strip().splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        print(f"  failed (rc={proc.returncode}, {time.time() - start:.0f}s): {' '.join(cmd)}\n"
              + "\n".join("    " + t for t in tail), file=sys.stderr)
        return None
    return json.loads(lines[-1])


SAME_MODEL = ("workload", "seq_len", "n_layers", "params")
COLUMNS = (  # (heading, field, format)
    ("workload", "workload", "{}"), ("impl", "impl", "{}"), ("L", "seq_len", "{}"),
    ("prompt", "prompt_len", "{}"), ("layers", "n_layers", "{}"),
    ("compile_s", "compile_s", "{:.3g}"), ("step_s", "step_s", "{:.3g}"),
    ("tokens/s", "tokens_per_s", "{:.4g}"), ("GFLOP", "model_flops", "{:.4g}"),
    ("GFLOP/s", "flops_per_s", "{:.4g}"), ("floor_fraction", "floor_fraction", "{:.3f}"),
    ("prefill_s", "prefill_s", "{:.3g}"), ("prefill_floor_s", "prefill_floor_s", "{:.3g}"),
    ("prefill_tok/s", "prefill_tokens_per_s", "{:.4g}"),
    ("floor_tok/s", "prefill_floor_tokens_per_s", "{:.4g}"),
    ("first_token_s", "first_token_s", "{:.3g}"), ("s/token", "s_per_token", "{:.3g}"),
    ("floor_s/token", "floor_s_per_token", "{:.3g}"), ("peak_GiB", "peak_rss_gib", "{:.3g}"),
)
GIGA = {"model_flops", "flops_per_s"}


def with_floors(records: list[dict]) -> list[dict]:
    """The records, a peer's (no `model_flops`) completed from ours of the same model."""
    ours = {tuple(r.get(k) for k in SAME_MODEL): r for r in records if "model_flops" in r}
    out = []
    for record in records:
        mine = ours.get(tuple(record.get(k) for k in SAME_MODEL))
        if "model_flops" not in record and "step_s" in record and mine is not None:
            flops = mine["model_flops"]
            record = dict(record, model_flops=flops, flops_per_s=flops / record["step_s"],
                          floor_fraction=flops / record["step_s"] / mine["peak_flops_per_s"])
        out.append(record)
    return out


def table(records: list[dict]) -> str:
    """Records as aligned text columns; a field a record lacks is '-'; columns no record has
    are left out."""
    records = with_floors(records)
    columns = [c for c in COLUMNS if any(c[1] in r for r in records)]

    def cell(record, field, fmt):
        if record.get(field) is None:
            return "-"
        value = record[field] / 1e9 if field in GIGA else record[field]
        return fmt.format(value)

    rows = [[h for h, _, _ in columns]] + [[cell(r, f, fmt) for _, f, fmt in columns]
                                           for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("series", nargs="*", help=f"one or more of {', '.join(sorted(SERIES))}")
    parser.add_argument("--table", help="print the table of the records in this JSONL file "
                                        "and run nothing")
    parser.add_argument("--lengths", help="comma-separated seq_len (decode: prompt_len) filter")
    parser.add_argument("--peer", help="python of a venv with trax 1.4.1 to run the reference")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per workload")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "results.jsonl"))
    args = parser.parse_args(argv)
    if args.table:
        lines = Path(args.table).read_text().splitlines()
        print(table([json.loads(line) for line in lines if line.startswith("{")]))
        return 0
    if not args.series or set(args.series) - set(SERIES):
        parser.error(f"series must be one or more of {', '.join(sorted(SERIES))} (or use "
                     f"--table FILE), got {args.series}")
    keep = {int(n) for n in args.lengths.split(",")} if args.lengths else None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = []
    for name in args.series:
        for what, params in SERIES[name]:
            if keep and params.get("seq_len", params.get("prompt_len")) not in keep:
                continue
            ours = [sys.executable, "-m", "terraformer.cli", "bench", what, *_flags(params)]
            impls = [("terraformer", ours)]
            if args.peer and what == "train" and params.get("attention") in ("lsh", "full"):
                impls.append(("trax", [args.peer, str(PEER), what, *_flags(params)]))
            failed = False
            for impl, cmd in impls:
                print(f"{name} {impl} {params}", file=sys.stderr, flush=True)
                record = run_one(cmd, args.timeout)
                if record is None:
                    failed = failed or impl == "terraformer"
                    continue
                record["series"] = name
                done.append(record)
                print(json.dumps(record), flush=True)
                with out.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            if failed:
                break
    if done:
        print(table(done), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
