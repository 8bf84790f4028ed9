"""Runs workloads of ../shared/BENCHMARKS.md, one process each, and appends JSON records.

    python benchmarks/run.py T-len T-full T-depth [--peer /tmp/trax-venv/bin/python]
    python benchmarks/run.py T-len --lengths 4096,16384 --out benchmarks/results/t.jsonl

Each workload is `terraformer bench ...` in a fresh process (so peak RSS is its own); the last
line it prints is its record. With `--peer PYTHON`, the same workload also runs on trax 1.4.1
through ../shared/peer/bench_trax.py under that interpreter, right after ours, so the two are
measured in one run. A length that fails (out of memory, over the time limit) ends that series.
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("series", nargs="+", choices=sorted(SERIES))
    parser.add_argument("--lengths", help="comma-separated seq_len filter")
    parser.add_argument("--peer", help="python of a venv with trax 1.4.1 to run the reference")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per workload")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "results.jsonl"))
    args = parser.parse_args(argv)
    keep = {int(n) for n in args.lengths.split(",")} if args.lengths else None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.series:
        for what, params in SERIES[name]:
            if keep and params.get("seq_len") not in keep:
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
                print(json.dumps(record), flush=True)
                with out.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            if failed:
                break
    return 0


if __name__ == "__main__":
    sys.exit(main())
