"""`terraformer bench`: one benchmark workload in this process, one JSON record.

    terraformer bench peak  [--peak_file PATH]
    terraformer bench train --seq_len 16384 [--attention lsh|full|local] [--n_layers 2]
    terraformer bench decode --model dense|sparse|lsh [--prompt_len 128] [--new_tokens 128]

The record is printed as the last line of output. Timings: compile (first call) on its own,
then the median of `--repeats` timed calls, each ending in `block_until_ready`. Peak memory is
the process's maximum resident set size (CPU) or the device's peak bytes in use (GPU).

Floors: `bench peak` measures the machine's float32 matmul rate and memory-read bandwidth
(terraformer/peak.py) and caches the record; `train` and `decode` read it from the cache (or
measure it once if absent). A train record adds `model_flops` (the step's model FLOPs,
terraformer/flops.py: 3 x the forward pass, attention included, recomputation not),
`flops_per_s` and `floor_fraction` (achieved over the peak); a decode record adds
`prefill_flops`, `prefill_floor_s` and `first_token_s` beside its bytes-per-token floor.
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

from terraformer import bench_attention, flops, peak
from terraformer.arguments import ArgumentParser, integer
from terraformer.checks import check_int
from terraformer.decoding import STREAM_BLOCK, Decoder, time_per_token
from terraformer.layers.attention import CausalAttention, SelfAttention
from terraformer.layers.attention_types import ATTENTION_TYPES, attention_constructor
from terraformer.layers.blockwise import BlockwiseAttention
from terraformer.layers.core import Dense
from terraformer.layers.lsh import LSHSelfAttention
from terraformer.models.reformer import ReformerLM
from terraformer.models.terraformer import TerraformerLM
from terraformer.models.transformer import TransformerLM
from terraformer.parallel.measure import batch_rows, mesh_memory
from terraformer.parallel.mesh import make_mesh, parse_mesh_spec
from terraformer.runtime import tune_cpu_runtime
from terraformer.shapes import ShapeDtype
from terraformer.training.step import make_train_step

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


def default_ff_chunk_size(seq_len: int) -> int:
    """Feed-forward chunking of the T model: none up to 64K tokens (as the trax peer runs it);
    above, 32K positions at a time, so that the [length, d_ff] hidden activations of the
    reversible backward (2 GiB each at 1M tokens) never exist whole."""
    return 0 if seq_len <= 65536 else 32768


def t_workload_model(seq_len: int, n_layers: int, attention: str, mode: str = "train",
                     ff_chunk_size: int | None = None, dense_attention: bool = False):
    """The model of the T workloads (vocab 256, d_model 256, d_ff 512, 4 heads of 64).

    `dense_attention`: 'full' and 'blockwise' build their full attention with the whole
    length x length scores (the same function and weights; for counting FLOPs)."""
    if dense_attention and attention == "full":
        attention = "dense"
    if ff_chunk_size is None:
        ff_chunk_size = default_ff_chunk_size(seq_len)
    common = dict(vocab_size=256, d_model=256, d_ff=512, n_layers=n_layers, n_heads=4,
                  dropout=0.0, mode=mode)
    if attention == "full":
        return TransformerLM(max_len=seq_len, **common)
    if attention == "dense":   # full attention that never runs blockwise: its L x L scores
        return TransformerLM(max_len=seq_len, **common, attention_type=functools.partial(
            CausalAttention, blockwise_min_len=None))
    if attention == "lsh":
        attn = functools.partial(
            LSHSelfAttention, chunk_len=LSH_CHUNK_LEN, n_hashes=2,
            n_buckets=lsh_n_buckets(seq_len), n_chunks_before=1, n_chunks_after=0,
            attention_dropout=0.0)
    elif attention == "local":
        attn = functools.partial(SelfAttention, chunk_len=LSH_CHUNK_LEN, n_chunks_before=1)
    elif attention == "blockwise":
        attn = (functools.partial(SelfAttention, blockwise_min_len=None)
                if dense_attention else BlockwiseAttention)
    else:
        attn = attention_constructor(attention)
    return ReformerLM(d_attention_key=64, d_attention_value=64, attention_type=attn,
                      max_len=seq_len, pos_type="axial", pos_axial_shape=axial_shape(seq_len),
                      pos_d_axial_embs=(128, 128), ff_chunk_size=ff_chunk_size, **common)


def count_params(weights) -> int:
    return int(sum(np.prod(a.shape) for a in jax.tree.leaves(weights)))


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def bench_train(args) -> dict:
    length = args.seq_len
    ff_chunk_size = (default_ff_chunk_size(length) if args.ff_chunk_size is None
                     else args.ff_chunk_size)
    model = t_workload_model(length, args.n_layers, args.attention,
                             ff_chunk_size=ff_chunk_size)
    # --mesh: one sequence per device of data x fsdp (make_mesh; parallel/measure.py)
    mesh = make_mesh(**parse_mesh_spec(args.mesh)) if args.mesh else None
    rows = batch_rows(mesh)
    tokens = np.random.default_rng(0).integers(1, 256, size=(rows, length)).astype(np.int32)
    batch = (jnp.asarray(tokens), jnp.asarray(tokens), jnp.ones((rows, length), jnp.float32))
    weights, state = model.init(ShapeDtype((rows, length), jnp.int32), jax.random.PRNGKey(0))
    params = count_params(weights)
    # The weights and slots are donated (updated in place) on every backend, CPU included:
    # the peak memory measured is that of a step that needs no second copy of them.
    step = make_train_step(model, optax.adam(1e-3), memory_efficient=args.memory_efficient,
                           donate=True, mesh=mesh)
    opt_state = step.init_opt_state(weights)
    weights, state, opt_state = step.place(weights, state, opt_state)
    per_device = ({} if args.memory_efficient or not args.mesh else mesh_memory(
        step.lower(weights, state, opt_state, batch, jax.random.PRNGKey(1)).compile(), mesh))
    rng = jax.random.PRNGKey(1)
    # Traced, not run. Blockwise attention's causal key loop has a trip count per query block
    # that jaxpr_flops cannot read; its model FLOPs are those of the same attention with the
    # whole L x L scores (flops.py counts full attention whole), so count that twin.
    flops_model = (t_workload_model(length, args.n_layers, args.attention,
                                    ff_chunk_size=ff_chunk_size, dense_attention=True)
                   if args.attention in ("full", "blockwise") else model)
    model_flops = flops.train_flops(flops_model, batch[0], weights, state, rng)
    carry = {"w": weights, "s": state, "o": opt_state}

    def run():
        carry["w"], carry["s"], carry["o"], metrics = step(carry["w"], carry["s"], carry["o"],
                                                           batch, rng)
        jax.block_until_ready(metrics["loss"])
        carry["loss"] = float(metrics["loss"])

    start = time.perf_counter()
    run()
    compile_s = time.perf_counter() - start
    step_s = timed(run, args.repeats)
    workload = {"lsh": "T-len", "full": "T-full"}.get(args.attention, f"T-{args.attention}")
    peak_rss_gib = peak_memory_gib()
    # After the peak RSS is read: measuring the machine's peak allocates a 1 GiB stream.
    peak_flops = peak.load_or_measure(args.peak_file)["flops_per_s"]
    return dict(workload=workload, impl="terraformer", device=jax.devices()[0].platform,
                seq_len=length, n_layers=args.n_layers, attention=args.attention,
                ff_chunk_size=ff_chunk_size, memory_efficient=args.memory_efficient,
                compile_s=compile_s, step_s=step_s,
                tokens_per_s=rows * length / step_s,
                peak_rss_gib=peak_rss_gib, params=params, loss=carry["loss"],
                model_flops=model_flops, flops_per_s=model_flops / step_s,
                peak_flops_per_s=peak_flops, floor_fraction=model_flops / step_s / peak_flops,
                **per_device)


D_SHAPE = dict(vocab_size=32000, d_model=1024, d_ff=4096, n_heads=16)
D_FF_SPARSITY = 64


def d_workload_model(kind: str, n_layers: int, max_len: int, mode: str = "predict"):
    """The models of the D workloads: dense, Terraformer (sparse) and LSH, same shape."""
    common = dict(D_SHAPE, n_layers=n_layers, max_len=max_len, dropout=0.0, mode=mode)
    if kind == "dense":
        return TransformerLM(**common)
    if kind == "sparse":
        return TerraformerLM(attention_sparsity=16, length_kernel_size=3,
                             ff_sparsity=D_FF_SPARSITY, **common)
    if kind == "lsh":
        attn = functools.partial(
            LSHSelfAttention, chunk_len=LSH_CHUNK_LEN, n_hashes=2,
            n_buckets=lsh_n_buckets(max_len), n_chunks_before=1, predict_mem_len=max_len,
            predict_drop_len=0)
        return ReformerLM(d_attention_key=64, d_attention_value=64, attention_type=attn,
                          **common)
    raise ValueError(f"--model must be dense, sparse or lsh, got {kind!r}")


def measure_bandwidth_gib_s(n_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Memory bandwidth from a large array copy: (read + write bytes) / time, best of n."""
    src = np.ones(n_bytes // 4, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * n_bytes / best / 2**30


def bytes_read_per_token(weights, vocab_size: int, ff_sparsity: int) -> int:
    """Weight bytes one decoding step must read.

    The embedding table contributes one row; a sparse feed-forward's w1/b1/w2 (or w12, the
    two packed as one table) one unit in `ff_sparsity`; everything else (PackedKernels and
    int8/bf16 kernels at their stored size) is read whole.
    """
    from terraformer.layers.core import PackedKernel

    total = 0

    def visit(tree):
        nonlocal total
        if isinstance(tree, dict):
            sparse = "m1" in tree and ({"w1", "w2"} <= set(tree) or "w12" in tree)
            for key, value in tree.items():
                if sparse and key in ("w1", "b1", "w2", "w12"):
                    total += value.nbytes // ff_sparsity
                else:
                    visit(value)
        elif isinstance(tree, (tuple, list)):
            for item in tree:
                visit(item)
        elif isinstance(tree, PackedKernel):
            total += tree.nbytes
        elif hasattr(tree, "nbytes"):
            is_table = tree.ndim == 2 and tree.shape[0] == vocab_size
            total += tree.nbytes // vocab_size if is_table else tree.nbytes

    visit(weights)
    return total


def d_workload_decoder(kind: str, n_layers: int, max_len: int, prefill_chunk: int | None = None,
                       weight_dtype: str = "float32", output_dtype: str | None = None):
    """(a batch-1 Decoder of a D model with freshly initialised weights, its parameter count)."""
    model = d_workload_model(kind, n_layers, max_len, mode="eval")
    weights, _ = model.init(ShapeDtype((1, 8), jnp.int32), jax.random.PRNGKey(0))
    decoder = Decoder(d_workload_model(kind, n_layers, max_len), weights, batch_size=1,
                      prefill_chunk=prefill_chunk, rng=jax.random.PRNGKey(0), max_len=max_len,
                      weight_dtype=weight_dtype, output_dtype=output_dtype)
    return decoder, count_params(weights)


def prefill_flops(kind: str, n_layers: int, max_len: int, prompt_len: int) -> int:
    """FLOPs of reading a prompt of `prompt_len` tokens (the start token added): the D model's
    eval-mode forward pass over them, counted as the model computes it (terraformer/flops.py),
    with the output layer on the last position only (a prefill needs the next token's
    distribution, nothing else, from it). Traced, not run."""
    model = d_workload_model(kind, n_layers, max_len, mode="eval")
    tokens = jax.ShapeDtypeStruct((1, prompt_len + 1), jnp.int32)
    weights, state = jax.eval_shape(
        lambda: model.init(ShapeDtype(tokens.shape, jnp.int32), jax.random.PRNGKey(0)))
    total = flops.model_forward_flops(model, tokens, weights, state)
    out = [i for i, layer in enumerate(model.sublayers) if isinstance(layer, Dense)][-1]
    d_in, d_out = weights[out]["w"].shape
    return total - 2 * prompt_len * d_in * d_out


def bench_decode(args) -> dict:
    """A D record.

    `compile_s`: the first calls, compiling included, less their run time where the decoder
    reads the prompt in one call (the warm-up then prefills the whole prompt: its timed run's
    prefill and steps are taken out); where it reads the prompt in chunks, the warm-up is a
    prefill of the first chunk and a short generation, counted whole. `prefill_chunk`: prompt
    tokens per prefill call (the prompt and start token when read whole: `--prefill_chunk`
    unset and an LSH model, see `decoding.Decoder`). `first_token_s`: time to the first new
    token, the prefill plus one decoding step (the per-token time of the first timed block).
    `prefill_floor_s`: `prefill_flops` at the peak matmul rate, with `prefill_tokens_per_s`
    against `prefill_floor_tokens_per_s`; `s_per_token`: the latency of a token after the
    prompt, against `floor_s_per_token`, the weight bytes a token reads at the peak read
    bandwidth (both floors from `bench peak`'s record)."""
    max_len = args.prompt_len + args.new_tokens + 8
    decoder, params = d_workload_decoder(args.model, args.n_layers, max_len, args.prefill_chunk,
                                         args.dtype, args.output_dtype)
    prompt = np.random.default_rng(0).integers(1, D_SHAPE["vocab_size"],
                                               size=(1, args.prompt_len)).astype(np.int32)
    whole = decoder.prefill_chunk is None
    start = time.perf_counter()
    time_per_token(decoder, prompt if whole else prompt[:, : decoder.prefill_chunk],
                   2 * args.block_size, args.block_size)
    compile_s = time.perf_counter() - start
    timing = time_per_token(decoder, prompt, args.new_tokens, args.block_size)
    if whole:  # the warm-up ran the timed prefill's shapes: take its run time out
        steady = timing["prefill_s"] + 2 * args.block_size * timing["s_per_token"]
        compile_s = max(0.0, compile_s - steady)
    peak_rss_gib = peak_memory_gib()
    # After the peak RSS is read: measuring the machine's peak allocates a 1 GiB stream.
    floor = peak.load_or_measure(args.peak_file)
    bandwidth = floor["read_bytes_per_s"] / 2**30
    read = bytes_read_per_token(decoder.weights, D_SHAPE["vocab_size"],
                                D_FF_SPARSITY if args.model == "sparse" else 1)
    floor_s = read / (bandwidth * 2**30)
    prefill = prefill_flops(args.model, args.n_layers, max_len, args.prompt_len)
    prefill_floor_s = prefill / floor["flops_per_s"]
    return dict(workload=f"D-{args.model}", impl="terraformer",
                device=jax.devices()[0].platform, n_layers=args.n_layers,
                prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                prefill_chunk=decoder.prefill_chunk or args.prompt_len + 1,
                block_size=args.block_size, dtype=args.dtype,
                output_dtype=args.output_dtype or args.dtype, compile_s=compile_s,
                s_per_token=timing["s_per_token"], tokens_per_s=1 / timing["s_per_token"],
                prefill_s=timing["prefill_s"], bandwidth_gib_s=bandwidth,
                weight_bytes_per_token=read, floor_s_per_token=floor_s,
                over_floor=timing["s_per_token"] / floor_s, peak_rss_gib=peak_rss_gib,
                params=params, prefill_flops=prefill, prefill_floor_s=prefill_floor_s,
                prefill_over_floor=timing["prefill_s"] / prefill_floor_s,
                prefill_tokens_per_s=args.prompt_len / timing["prefill_s"],
                prefill_floor_tokens_per_s=args.prompt_len / prefill_floor_s,
                first_token_s=timing["prefill_s"] + timing["first_token_s"],
                peak_flops_per_s=floor["flops_per_s"])


def build_parser() -> ArgumentParser:
    """The `terraformer bench` parser: every numeric option is checked while parsing
    (`terraformer.arguments`), and a bad one is one line on stderr with exit status 2."""
    parser = ArgumentParser(prog="terraformer bench", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="workload", required=True)
    peak_help = ("the machine's peak record (default: $XDG_CACHE_HOME/terraformer/peak.json); "
                 "measured and written there when absent or measured on another machine")
    measure = sub.add_parser("peak", help="measure the machine's float32 matmul rate and "
                                          "memory-read bandwidth, and cache the record")
    measure.add_argument("--peak_file", "--output", dest="peak_file", default=None,
                         help="where to write the record (default: "
                              "$XDG_CACHE_HOME/terraformer/peak.json)")
    measure.add_argument("--repeats", type=integer(1), default=5)
    train = sub.add_parser("train", help="T workloads: a training step on one sequence")
    train.add_argument("--seq_len", type=integer(1), default=16384)
    train.add_argument("--n_layers", type=integer(1), default=2)
    train.add_argument("--attention", default="lsh", choices=[*ATTENTION_TYPES, "dense"],
                       help="a mechanism of the registry, or 'dense': full attention with its "
                            "length x length scores at every length (the T-full model without "
                            "its blockwise path)")
    train.add_argument("--repeats", type=integer(1), default=3)
    train.add_argument("--ff_chunk_size", type=integer(0), default=None,
                       help="feed-forward positions per chunk (0: whole length); default: "
                            "0 up to 65,536 tokens, 32,768 above")
    train.add_argument("--memory_efficient", action="store_true",
                       help="the memory-efficient step (host-resident reversible stack, "
                            "per-block updates, chunked loss): "
                            "terraformer/training/memory_efficient.py")
    train.add_argument("--mesh", default="", metavar="AXIS=SIZE,...",
                       help="train on a mesh, e.g. data=2,model=2 or fsdp=4 (axes data, fsdp, "
                            "model, sequence; -1: the rest): one sequence per data x fsdp "
                            "device; adds the per-device peak memory")
    train.add_argument("--peak_file", default=None, help=peak_help)
    decode = sub.add_parser("decode", help="D workloads: batch-1 greedy decoding latency")
    decode.add_argument("--model", default="dense", choices=["dense", "sparse", "lsh"])
    decode.add_argument("--n_layers", type=integer(1), default=12)
    decode.add_argument("--prompt_len", type=integer(1), default=128)
    decode.add_argument("--new_tokens", type=integer(1), default=128)
    decode.add_argument("--prefill_chunk", type=integer(1), default=None,
                        help="prompt tokens per prefill call (default: the whole prompt in "
                             "one call for a model that reads it so, LSH; else 1024)")
    decode.add_argument("--dtype", default="float32", choices=["float32", "bf16", "int8"],
                        help="how the decoder stores the kernels it multiplies by: float32, "
                             "bf16 or int8 (a scale per output unit), converted inside the "
                             "fused matrix-vector products (Layer.pack_for_decoding)")
    decode.add_argument("--block_size", type=integer(1), default=STREAM_BLOCK,
                        help="tokens per call of the compiled decoding loop while timing "
                             f"(default {STREAM_BLOCK}, as `terraformer decode` streams them; "
                             "1: each token its own call, dispatch included)")
    decode.add_argument("--output_dtype", default=None, choices=["float32", "bf16", "int8"],
                        help="the output layer's storage when it should differ from --dtype "
                             "(int8: a quarter of the bytes of the largest matrix a step reads)")
    decode.add_argument("--peak_file", default=None, help=peak_help)
    decode.add_check(lambda args: check_int("argument --block_size (at most --new_tokens)",
                                            args.block_size, 1, maximum=args.new_tokens))
    bench_attention.add_parser(sub)
    return parser


def main(argv=None) -> int:
    tune_cpu_runtime()  # before JAX's first computation
    args = build_parser().parse_args(argv)
    if args.workload == "attention":
        return bench_attention.main(args)
    if args.workload == "peak":  # always measures: the way to refresh the cached record
        record = peak.measure(repeats=args.repeats)
        record["path"] = str(peak.save(record, args.peak_file))
    elif args.workload == "train":
        record = bench_train(args)
    elif args.workload == "decode":
        record = bench_decode(args)
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
