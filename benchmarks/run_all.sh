#!/usr/bin/env bash
# Every workload of ../shared/BENCHMARKS.md that this machine can run, one process each, with
# trax 1.4.1 beside ours where a venv with it is given (PEER=/path/to/python).
# Records go to benchmarks/results/<series>.jsonl.  Usage: PEER=/tmp/trax-venv/bin/python
# bash benchmarks/run_all.sh [T|D|all]
set -u
cd "$(dirname "$0")/.."
out=benchmarks/results
mkdir -p "$out"
what=${1:-all}
peer=()
[ -n "${PEER:-}" ] && peer=(--peer "$PEER")
export TF_CPP_MIN_LOG_LEVEL=3

bench() {  # bench FILE ARGS...: one workload, its JSON record appended to FILE
  local file=$1; shift
  echo "== terraformer bench $*" >&2
  timeout "${TIMEOUT:-1800}" python -m terraformer.cli bench "$@" | grep '^{' | tail -1 \
    | tee -a "$file"
}

peer_bench() {  # peer_bench FILE ARGS...: the same workload on trax 1.4.1
  local file=$1; shift
  [ -n "${PEER:-}" ] || return 0
  echo "== trax $*" >&2
  timeout "${TIMEOUT:-1800}" "$PEER" ../shared/peer/bench_trax.py "$@" 2>/dev/null \
    | grep '^{' | tail -1 | tee -a "$file"
}

if [ "$what" = T ] || [ "$what" = all ]; then
  python benchmarks/run.py T-len --lengths 4096,16384,65536 "${peer[@]}" --out "$out/T.jsonl"
  python benchmarks/run.py T-full "${peer[@]}" --out "$out/T.jsonl"
  python benchmarks/run.py T-depth --out "$out/T.jsonl"
  for n in 262144 1048576; do
    bench "$out/T.jsonl" train --seq_len "$n" --attention lsh --repeats 1 --memory_efficient
  done
fi
if [ "$what" = D ] || [ "$what" = all ]; then
  for model in dense sparse lsh; do
    bench "$out/D.jsonl" decode --model "$model"
  done
  bench "$out/D.jsonl" decode --model sparse --dtype int8
  for p in 1024 16384; do
    bench "$out/D.jsonl" decode --model dense --prompt_len "$p" --new_tokens 4
    bench "$out/D.jsonl" decode --model sparse --prompt_len "$p" --new_tokens 4
  done
  peer_bench "$out/D.jsonl" decode --model dense
  peer_bench "$out/D.jsonl" decode --model sparse
fi
