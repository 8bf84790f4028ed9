"""`terraformer bench`: one workload of BENCHMARKS.md in this process, one JSON record.

    terraformer bench train --seq_len 16384 [--attention lsh|full|local] [--n_layers 2]

The record is printed as the last line of output. Timings: compile (first call) on its own,
then the median of `--repeats` timed calls, each ending in `block_until_ready`. Peak memory is
the process's maximum resident set size (CPU) or the device's peak bytes in use (GPU).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from terraformer.layers.attention import SelfAttention
from terraformer.layers.losses import cross_entropy
from terraformer.layers.lsh import LSHSelfAttention
from terraformer.models.reformer import ReformerLM
from terraformer.models.transformer import TransformerLM
from terraformer.shapes import ShapeDtype

LSH_CHUNK_LEN = 128


def peak_memory_gib() -> float:
    """Peak device bytes in use on an accelerator, else the process's max RSS, in GiB."""
    device = jax.devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            return stats["peak_bytes_in_use"] / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def lsh_n_buckets(seq_len: int, chunk_len: int = LSH_CHUNK_LEN):
    """L / chunk_len rounded to 2^k; factored as (2^⌊k/2⌋, 2^⌈k/2⌉) above 512 buckets."""
    k = max(1, round(math.log2(seq_len / chunk_len)))
    return 2**k if k <= 9 else (2 ** (k // 2), 2 ** (k - k // 2))


def axial_shape(seq_len: int) -> tuple[int, int]:
    a = 2 ** (int(math.log2(seq_len)) // 2)
    return a, seq_len // a


def t_workload_model(seq_len: int, n_layers: int, attention: str, mode: str = "train"):
    """The model of the T workloads (vocab 256, d_model 256, d_ff 512, 4 heads of 64)."""
    common = dict(vocab_size=256, d_model=256, d_ff=512, n_layers=n_layers, n_heads=4,
                  dropout=0.0, mode=mode)
    if attention == "full":
        return TransformerLM(max_len=seq_len, **common)
    if attention == "lsh":
        attn = functools.partial(
            LSHSelfAttention, chunk_len=LSH_CHUNK_LEN, n_hashes=2,
            n_buckets=lsh_n_buckets(seq_len), n_chunks_before=1, n_chunks_after=0,
            attention_dropout=0.0)
    elif attention == "local":
        attn = functools.partial(SelfAttention, chunk_len=LSH_CHUNK_LEN, n_chunks_before=1)
    else:
        raise ValueError(f"--attention must be lsh, full or local, got {attention!r}")
    return ReformerLM(d_attention_key=64, d_attention_value=64, attention_type=attn,
                      max_len=seq_len, pos_type="axial", pos_axial_shape=axial_shape(seq_len),
                      pos_d_axial_embs=(128, 128), ff_chunk_size=0, **common)


def count_params(weights) -> int:
    return int(sum(np.prod(a.shape) for a in jax.tree.leaves(weights)))


def make_train_step(model, optimizer):
    """A jitted (weights, opt_state, batch, rng) -> (weights, opt_state, loss) Adam step."""

    def loss_fn(weights, state, batch, rng):
        inputs, targets, mask = batch
        log_probs, _ = model.apply(inputs, weights, state, rng)
        return cross_entropy(log_probs, targets, mask)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(weights, opt_state, state, batch, rng):
        loss, grads = jax.value_and_grad(loss_fn)(weights, state, batch, rng)
        updates, opt_state = optimizer.update(grads, opt_state, weights)
        return optax.apply_updates(weights, updates), opt_state, loss

    return step


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def bench_train(args) -> dict:
    length = args.seq_len
    model = t_workload_model(length, args.n_layers, args.attention)
    tokens = np.random.default_rng(0).integers(1, 256, size=(1, length)).astype(np.int32)
    batch = (jnp.asarray(tokens), jnp.asarray(tokens), jnp.ones((1, length), jnp.float32))
    weights, state = model.init(ShapeDtype((1, length), jnp.int32), jax.random.PRNGKey(0))
    params = count_params(weights)
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(weights)
    step = make_train_step(model, optimizer)
    rng = jax.random.PRNGKey(1)
    carry = {"w": weights, "o": opt_state}

    def run():
        carry["w"], carry["o"], loss = step(carry["w"], carry["o"], state, batch, rng)
        jax.block_until_ready(loss)
        carry["loss"] = float(loss)

    start = time.perf_counter()
    run()
    compile_s = time.perf_counter() - start
    step_s = timed(run, args.repeats)
    workload = {"lsh": "T-len", "full": "T-full"}.get(args.attention, f"T-{args.attention}")
    return dict(workload=workload, impl="terraformer", device=jax.devices()[0].platform,
                seq_len=length, n_layers=args.n_layers, attention=args.attention,
                compile_s=compile_s, step_s=step_s, tokens_per_s=length / step_s,
                peak_rss_gib=peak_memory_gib(), params=params, loss=carry["loss"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="terraformer bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="workload", required=True)
    train = sub.add_parser("train", help="T workloads: a training step on one sequence")
    train.add_argument("--seq_len", type=int, default=16384)
    train.add_argument("--n_layers", type=int, default=2)
    train.add_argument("--attention", default="lsh", choices=["lsh", "full", "local"])
    train.add_argument("--repeats", type=int, default=3)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.workload == "train":
        record = bench_train(args)
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
