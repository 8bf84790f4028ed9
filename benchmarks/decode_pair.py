"""D workloads side by side: per-token latency of several decoders measured interleaved.

    python benchmarks/decode_pair.py --models dense,sparse:int8 [--block_size 16] [--rounds 3]

Each model in `--models` is `kind[:output_dtype]` (kind: dense, sparse or lsh; output_dtype
float32, bf16 or int8 for the output layer only, default float32). All are built in one
process, prefilled with the same 128-token prompt, then generate greedily in turns: one
block of `--block_size` tokens of the first, one of the second, ... so that a busy or
throttled machine slows all of them alike and their ratio is measured in the same run.
`--block_size` defaults to STREAM_BLOCK, the tokens per call `terraformer decode` streams.
`--rounds` repeats the whole workload (fresh prefill each time) to pool more blocks.
Prints one JSON record: per model the median and 10th-percentile seconds per token (over
the blocks of all rounds, each round's first left out) and the weight bytes a token reads;
the ratio of the first model's median to each other's, overall and per round.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from terraformer import tune_cpu_runtime
from terraformer.bench import (
    D_FF_SPARSITY,
    D_SHAPE,
    bytes_read_per_token,
    d_workload_decoder,
    measure_bandwidth_gib_s,
)
from terraformer.decoding import STREAM_BLOCK, Sampling


def main(argv=None) -> int:
    tune_cpu_runtime()  # before JAX's first computation
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="dense,sparse:int8")
    parser.add_argument("--n_layers", type=int, default=12)
    parser.add_argument("--prompt_len", type=int, default=128)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--block_size", type=int, default=STREAM_BLOCK)
    parser.add_argument("--rounds", type=int, default=1,
                        help="times the whole workload (prefill, then new_tokens) is repeated; "
                             "medians pool the blocks of all rounds")
    args = parser.parse_args(argv)
    if args.rounds < 1 or not 1 <= args.block_size <= args.new_tokens:
        parser.error("--rounds must be >= 1 and --block_size in [1, --new_tokens]")
    specs = args.models.split(",")
    max_len = args.prompt_len + args.new_tokens + 8
    prompt = np.random.default_rng(0).integers(1, D_SHAPE["vocab_size"],
                                               size=(1, args.prompt_len)).astype(np.int32)
    runs = {}
    for spec in specs:
        kind, _, output_dtype = spec.partition(":")
        decoder, _ = d_workload_decoder(kind, args.n_layers, max_len,
                                        output_dtype=output_dtype or None)
        read = bytes_read_per_token(decoder.weights, D_SHAPE["vocab_size"],
                                    D_FF_SPARSITY if kind == "sparse" else 1)
        runs[spec] = dict(decoder=decoder, loop=decoder._loop(args.block_size, Sampling(), ()),
                          times=[], round_medians=[], read=read)
    for _ in range(args.rounds):
        for run in runs.values():
            log_probs, state = run["decoder"].prefill(prompt)
            run["carry"] = (state, log_probs, jax.random.PRNGKey(0), jnp.zeros((1,), bool))
            run["this_round"] = []
        for _ in range(args.new_tokens // args.block_size):
            for run in runs.values():
                state, log_probs, rng, done = run["carry"]
                start = time.perf_counter()
                out, _, state, log_probs, rng, done = run["loop"](
                    run["decoder"].weights, state, log_probs, rng, done, None)
                jax.block_until_ready(out)
                run["this_round"].append((time.perf_counter() - start) / args.block_size)
                run["carry"] = (state, log_probs, rng, done)
        for run in runs.values():  # each round's first block is a warm-up
            kept = run["this_round"][1:] or run["this_round"]
            run["times"] += kept
            run["round_medians"].append(float(np.median(kept)))
    bandwidth = measure_bandwidth_gib_s()
    record = dict(workload="D-pair", n_layers=args.n_layers, prompt_len=args.prompt_len,
                  new_tokens=args.new_tokens, block_size=args.block_size, rounds=args.rounds,
                  device=jax.devices()[0].platform, bandwidth_gib_s=bandwidth, models={})
    first = None
    for spec, run in runs.items():
        times = np.asarray(run["times"])
        median = float(np.median(times))
        if first is None:
            first, first_rounds = median, np.asarray(run["round_medians"])
        record["models"][spec] = dict(
            s_per_token=median, p10_s_per_token=float(np.percentile(times, 10)),
            weight_bytes_per_token=run["read"],
            floor_s_per_token=run["read"] / (bandwidth * 2**30),
            speedup_vs_first=first / median,
            speedup_vs_first_per_round=[round(float(r), 3) for r in
                                        first_rounds / np.asarray(run["round_medians"])])
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
