"""ListOps accuracy per attention mechanism at a small scale: one short training run each.

Every mechanism trains the same small classifier (`models.classifier.Classifier`: mean pooling,
2 layers, d_model 64, 2 heads, d_ff 128, no dropout) on the same ListOps batches
(`data.listops`: expressions of `--min_len`..`--max_len` symbols, depth `--max_depth`) for
`--steps` steps of Adam at a constant `--learning_rate` (gradient norm clipped at 1), then is
scored on `--eval_batches` fixed batches of the eval split. The knobs of each mechanism are
scaled to the short sequences (blocks of 16, chunks of 32, ...: `SMALL_KNOBS`), so that the
sparse patterns stay sparse at this length instead of degenerating into full attention.

    python benchmarks/listops_mechanisms.py [--mechanisms full,lsh,...] [--steps 300]
        [--max_len 128] [--out results.jsonl]

One JSON record per mechanism (accuracy, eval loss after training and at init, seconds),
then a markdown table with chance (10%) and the eval split's majority class beside it. The
model, batches and rng are the same for every mechanism; only the attention differs. This is
far from LRA's budget (5k steps at 2K tokens): read the table as a check that each mechanism
learns, not as LRA's ranking.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from terraformer.data.listops import N_CLASSES, listops_inputs
from terraformer.layers.attention_types import ATTENTION_TYPES
from terraformer.models.classifier import Classifier
from terraformer.shapes import ShapeDtype
from terraformer.training.optimizers import Adam
from terraformer.training.step import make_eval_step, make_train_step

MODEL = dict(vocab_size=16, n_classes=N_CLASSES, d_model=64, d_ff=128, n_layers=2, n_heads=2,
             dropout=0.0)


def small_knobs(max_len: int) -> dict[str, dict]:
    """Each mechanism's knobs at a short length (the registry's defaults are for 1K-64K)."""
    return {
        "blockwise": dict(block_len=32),
        "local": dict(chunk_len=32, n_chunks_before=1, n_chunks_after=1),
        "lsh": dict(chunk_len=32, n_buckets=max(2, max_len // 32)),
        "sparse_transformer": dict(block_len=16, n_summary=4),
        "longformer": dict(block_len=16, window=16, n_global=2),
        "bigbird": dict(block_len=16, n_window_blocks=1, n_global_blocks=1, n_random_blocks=1),
        "routing": dict(n_clusters=4, chunk_len=32),
        "sinkhorn": dict(block_len=16, max_length=max_len),
        "performer": dict(n_features=64),
        "linformer": dict(max_len=max_len, proj_len=32),
        "synthesizer": dict(max_len=max_len),
    }


def attention_of(name: str, max_len: int):
    """The registry's constructor for `name` with its small-scale knobs."""
    constructor = ATTENTION_TYPES[name]
    knobs = small_knobs(max_len).get(name, {})
    if name == "local":  # the registry's entry is already a partial of SelfAttention
        constructor = constructor.func
    return functools.partial(constructor, **knobs) if knobs else constructor


def run_one(name: str, args) -> dict:
    """Trains and scores the classifier with attention `name`; returns its record."""
    attention = attention_of(name, args.max_len)
    model = Classifier(attention_type=attention, max_len=args.max_len, mode="train", **MODEL)
    evaluate = Classifier(attention_type=attention, max_len=args.max_len, mode="eval", **MODEL)
    data = dict(batch_size=args.batch, max_len=args.max_len, min_len=args.min_len,
                seed=args.seed, max_depth=args.max_depth)
    train = listops_inputs(split="train", **data)
    eval_batches = list(itertools.islice(listops_inputs(split="eval", **data),
                                         args.eval_batches))
    weights, state = model.init(ShapeDtype((args.batch, args.max_len), jnp.int32),
                                jax.random.PRNGKey(args.seed))
    step = make_train_step(model, Adam(learning_rate=args.learning_rate, clip_grad_norm=1.0))
    opt_state = step.init_opt_state(weights)
    eval_step = make_eval_step(evaluate)

    def scores(weights, state):  # (accuracy, loss) over the eval batches
        sums = [eval_step(weights, state, tuple(jnp.asarray(a) for a in b))
                for b in eval_batches]
        total = sum(float(s["weight"]) for s in sums)
        return (sum(float(s["accuracy"]) for s in sums) / total,
                sum(float(s["loss"]) for s in sums) / total, int(total))

    _, loss_at_init, _ = scores(weights, state)
    rng = jax.random.PRNGKey(args.seed + 1)
    start = time.perf_counter()
    # optax's Adam mixes float and int32 inside (its step count): standard promotion.
    with jax.numpy_dtype_promotion("standard"):
        for i in range(args.steps):
            batch = tuple(jnp.asarray(a) for a in next(train))
            weights, state, opt_state, metrics = step(weights, state, opt_state, batch,
                                                      jax.random.fold_in(rng, i))
        train_loss = float(metrics["loss"])
    train_s = time.perf_counter() - start
    accuracy, loss, total = scores(weights, state)
    return {"mechanism": name, "steps": args.steps, "max_len": args.max_len,
            "accuracy": accuracy, "eval_loss": loss, "eval_loss_at_init": loss_at_init,
            "train_loss_last": train_loss, "train_seconds": round(train_s, 1),
            "eval_examples": total}


def majority_share(args) -> float:
    """The share of the eval batches' most frequent label (what predicting it would score)."""
    data = dict(batch_size=args.batch, max_len=args.max_len, min_len=args.min_len,
                seed=args.seed, max_depth=args.max_depth)
    labels = np.concatenate([b[1] for b in itertools.islice(
        listops_inputs(split="eval", **data), args.eval_batches)])
    return float(np.bincount(labels, minlength=N_CLASSES).max() / labels.size)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mechanisms", default=",".join(ATTENTION_TYPES),
                   help="comma-separated names of attention_types.ATTENTION_TYPES")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max_len", type=int, default=128)
    p.add_argument("--min_len", type=int, default=20)
    p.add_argument("--max_depth", type=int, default=10)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--eval_batches", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON-lines file for the records")
    args = p.parse_args(argv)
    names = [n for n in args.mechanisms.split(",") if n]
    unknown = [n for n in names if n not in ATTENTION_TYPES]
    if unknown or not names:
        p.error(f"--mechanisms must be names among {', '.join(ATTENTION_TYPES)}, got "
                f"{args.mechanisms!r}")
    if args.max_len < args.min_len + 2:
        p.error(f"--max_len must be at least --min_len + 2, got {args.max_len} and "
                f"{args.min_len}")
    args.mechanisms = names
    return args


def table(records, majority: float) -> str:
    lines = ["| mechanism | ListOps accuracy | eval loss (at init) | train s |",
             "|---|---|---|---|"]
    lines += [f"| {r['mechanism']} | {100 * r['accuracy']:.1f}% | {r['eval_loss']:.3f} "
              f"({r['eval_loss_at_init']:.3f}) | {r['train_seconds']} |" for r in records]
    lines.append(f"| (chance) | {100 / N_CLASSES:.1f}% | | |")
    lines.append(f"| (majority class of the eval batches) | {100 * majority:.1f}% | | |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    records = []
    for name in args.mechanisms:
        record = run_one(name, args)
        print(json.dumps(record), flush=True)
        records.append(record)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(record) + "\n")
    print(table(records, majority_share(args)))
    return records


if __name__ == "__main__":
    main(sys.argv[1:])
