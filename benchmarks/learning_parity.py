"""Learning parity with trax 1.4.1: the same model, optimizer and batches of a text, trained by
trax and by terraformer; held-out bits per byte every `--eval_every` steps, side by side.

The configuration is the byte-level LSH ReformerLM of issue 21: d_model 256, d_ff 512,
2 layers, 4 heads of 64, LSH with chunks of 128, 2 hash rounds and 16 buckets, axial positions,
sequences of 2,048, batch 4, Adam (trax's defaults: eps 1e-5, weight decay 1e-5) at a constant
1e-3, no dropout. Training windows are drawn at random from the first 90% of the text's bytes
(one numpy generator, seeded, so both sides see the same batches in the same order); the
held-out set is `--eval_batches` fixed batches from the last 10%.

Each side runs in its own process, one after the other (2 cores: never both at once):
    python benchmarks/learning_parity.py --peer /tmp/trax-venv/bin/python [--steps 1000]
    python benchmarks/learning_parity.py --gin_param 'LSHSelfAttention.qk_scale = 0.125'
(`--peer` is a python with trax 1.4.1; see ../shared/peer/bench_trax.py for its venv.)
Each side prints one JSON record per evaluation; the last lines are a markdown table and, with
`--out`, every record goes to a JSON-lines file.
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

import numpy as np

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / \
    "crime-and-punishment-2554.txt"
CONFIG = dict(vocab_size=256, d_model=256, d_ff=512, n_layers=2, n_heads=4, d_qk=64, d_v=64,
              chunk_len=128, n_hashes=2, n_buckets=16, seq_len=2048, batch=4,
              axial_shape=(32, 64), axial_embs=(128, 128), learning_rate=1e-3,
              weight_decay=1e-5, eps=1e-5)
HELD_OUT_FRACTION = 0.1


# -- data: numpy only, so that both sides (and both virtual environments) share it ------------
def text_bytes(path: Path) -> np.ndarray:
    data = np.frombuffer(Path(path).read_bytes(), np.uint8).astype(np.int32)
    if len(data) < 4 * CONFIG["seq_len"]:
        raise SystemExit(f"learning_parity: {path} has {len(data)} bytes; need at least "
                         f"{4 * CONFIG['seq_len']}")
    return data


def split(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cut = int(len(data) * (1 - HELD_OUT_FRACTION))
    return data[:cut], data[cut:]


def train_batches(train: np.ndarray, seed: int):
    """Random windows of the training bytes: (inputs, targets, weights) [batch, seq_len]."""
    rng = np.random.default_rng(seed)
    seq_len, batch = CONFIG["seq_len"], CONFIG["batch"]
    while True:
        starts = rng.integers(0, len(train) - seq_len, batch)
        x = np.stack([train[s:s + seq_len] for s in starts])
        yield x, x, np.ones_like(x, np.float32)


def held_out_batches(held_out: np.ndarray, n_batches: int) -> list[np.ndarray]:
    """`n_batches` fixed batches of windows spread evenly over the held-out bytes."""
    seq_len, batch = CONFIG["seq_len"], CONFIG["batch"]
    n = n_batches * batch
    if len(held_out) < seq_len + n:
        raise SystemExit("learning_parity: the held-out part is too short for --eval_batches")
    starts = np.linspace(0, len(held_out) - seq_len, n).astype(int)
    windows = np.stack([held_out[s:s + seq_len] for s in starts])
    return list(windows.reshape(n_batches, batch, seq_len))


def bits_per_byte(log_probs_fn, batches) -> float:
    """Mean cross-entropy in bits of next-byte prediction over the held-out batches; the
    models shift right inside, so a window is both input and target."""
    total, count = 0.0, 0
    for x in batches:
        lp = np.asarray(log_probs_fn(x), np.float64)
        lp = lp - np.log(np.sum(np.exp(lp - lp.max(-1, keepdims=True)), -1,
                                keepdims=True)) - lp.max(-1, keepdims=True)
        total -= np.take_along_axis(lp, x[..., None], -1).sum()
        count += x.size
    return total / count / math.log(2)


# -- the two sides -------------------------------------------------------------------------------
def run_trax(args, train, held_out):
    """trax 1.4.1's ReformerLM, trained by its own Loop."""
    import functools
    import warnings

    warnings.filterwarnings("ignore")
    import trax
    from trax import layers as tl
    from trax import shapes

    c = CONFIG

    def model(mode):
        attention = functools.partial(tl.LSHSelfAttention, chunk_len=c["chunk_len"],
                                      n_chunks_before=1, n_hashes=c["n_hashes"],
                                      n_buckets=c["n_buckets"])
        return trax.models.ReformerLM(
            c["vocab_size"], d_model=c["d_model"], d_ff=c["d_ff"],
            d_attention_key=c["d_qk"], d_attention_value=c["d_v"], n_layers=c["n_layers"],
            n_heads=c["n_heads"], dropout=0.0, max_len=c["seq_len"], attention_type=attention,
            pos_type="axial", pos_axial_shape=c["axial_shape"],
            pos_d_axial_embs=c["axial_embs"], mode=mode)

    task = trax.supervised.training.TrainTask(
        labeled_data=train_batches(train, args.seed),
        loss_layer=tl.WeightedCategoryCrossEntropy(),
        optimizer=trax.optimizers.Adam(c["learning_rate"], eps=c["eps"],
                                       weight_decay_rate=c["weight_decay"]),
        n_steps_per_checkpoint=None)
    loop = trax.supervised.training.Loop(model("train"), [task], output_dir=None,
                                         checkpoint_at=lambda step: False,
                                         random_seed=args.seed)
    evaluator = model("eval")
    evaluator.init(shapes.signature(held_out[0]))
    return loop, evaluator


def trax_side(args, train, held_out):
    loop, evaluator = run_trax(args, train, held_out)
    start = time.perf_counter()
    for step in range(args.eval_every, args.steps + 1, args.eval_every):
        loop.run(args.eval_every)
        evaluator.weights = loop.model.weights
        yield step, bits_per_byte(lambda x: evaluator(x), held_out), time.perf_counter() - start


def ours_side(args, train, held_out):
    """terraformer's ReformerLM with the same arguments, trained by `make_train_step`."""
    import gin
    import jax

    from terraformer import configs
    from terraformer.layers.lsh import LSHSelfAttention
    from terraformer.models import ReformerLM
    from terraformer.runtime import tune_cpu_runtime
    from terraformer.shapes import signature
    from terraformer.training.optimizers import Adam
    from terraformer.training.step import make_train_step

    tune_cpu_runtime()
    # The gin-registered LSHSelfAttention, so that --gin_param bindings reach it.
    lsh = configs.register(LSHSelfAttention, module="terraformer.layers")
    gin.parse_config(args.gin_param)
    c = CONFIG

    def attention(**kw):
        return lsh(chunk_len=c["chunk_len"], n_chunks_before=1, n_hashes=c["n_hashes"],
                   n_buckets=c["n_buckets"], **kw)

    def model(mode):
        return ReformerLM(
            c["vocab_size"], d_model=c["d_model"], d_ff=c["d_ff"],
            d_attention_key=c["d_qk"], d_attention_value=c["d_v"], n_layers=c["n_layers"],
            n_heads=c["n_heads"], dropout=0.0, max_len=c["seq_len"], attention_type=attention,
            pos_type="axial", pos_axial_shape=c["axial_shape"],
            pos_d_axial_embs=c["axial_embs"], mode=mode)

    trainer = model("train")
    evaluator = model("eval")
    batches = train_batches(train, args.seed)
    weights, state = trainer.init(signature(next(train_batches(train, args.seed))[0]),
                                  rng=jax.random.PRNGKey(args.seed))
    _, eval_state = evaluator.init(signature(held_out[0]), rng=jax.random.PRNGKey(args.seed))
    step_fn = make_train_step(trainer, Adam(c["learning_rate"], eps=c["eps"],
                                            weight_decay_rate=c["weight_decay"]))
    opt_state = step_fn.init_opt_state(weights)
    forward = jax.jit(lambda w, x: evaluator.apply(x, w, eval_state, None)[0])
    rng = jax.random.PRNGKey(args.seed + 1)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        rng, step_rng = jax.random.split(rng)
        weights, state, opt_state, _ = step_fn(weights, state, opt_state, next(batches),
                                               step_rng)
        if step % args.eval_every == 0:
            bpb = bits_per_byte(lambda x, w=weights: forward(w, x), held_out)
            yield step, bpb, time.perf_counter() - start


SIDES = {"trax": trax_side, "ours": ours_side}


def run_side(args) -> None:
    train, held_out_bytes = split(text_bytes(args.text))
    held_out = held_out_batches(held_out_bytes, args.eval_batches)
    for step, bpb, seconds in SIDES[args.side](args, train, held_out):
        print(json.dumps({"side": args.side, "step": step, "bits_per_byte": round(bpb, 4),
                          "seconds": round(seconds, 1)}), flush=True)


def side_records(python: str, args, side: str) -> list[dict]:
    cmd = [python, __file__, "--side", side, "--steps", str(args.steps), "--eval_every",
           str(args.eval_every), "--eval_batches", str(args.eval_batches), "--text",
           str(args.text), "--seed", str(args.seed)]
    for binding in args.gin_param:
        cmd += ["--gin_param", binding]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    records = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env) as proc:
        for line in proc.stdout:
            print(line, end="", flush=True)
            if line.startswith("{"):
                records.append(json.loads(line))
    if proc.returncode:
        raise SystemExit(f"learning_parity: the {side} side exited {proc.returncode}")
    return records


def table(records: dict[str, list[dict]]) -> str:
    sides = [s for s in ("trax", "ours") if records.get(s)]
    steps = sorted({r["step"] for s in sides for r in records[s]})
    by = {s: {r["step"]: r["bits_per_byte"] for r in records[s]} for s in sides}
    lines = ["| step | " + " | ".join(f"{s} bits/byte" for s in sides) + " |",
             "| --- |" + " --- |" * len(sides)]
    for step in steps:
        lines.append(f"| {step} | " + " | ".join(f"{by[s].get(step, float('nan')):.3f}"
                                                 for s in sides) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peer", help="a python with trax 1.4.1 (trains trax's side too)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--eval_every", type=int, default=100)
    p.add_argument("--eval_batches", type=int, default=4)
    p.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gin_param", action="append", default=[],
                   help="a gin binding for our side, e.g. 'LSHSelfAttention.qk_scale = 0.125'")
    p.add_argument("--out", type=Path, help="append every record to this JSON-lines file")
    p.add_argument("--side", choices=sorted(SIDES), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.steps < 1 or args.eval_every < 1 or args.eval_batches < 1:
        p.error("--steps, --eval_every and --eval_batches must be >= 1")
    if not args.text.is_file():
        p.error(f"--text: no file {args.text}")
    if args.side:
        run_side(args)
        return
    records = {}
    if args.peer:
        records["trax"] = side_records(args.peer, args, "trax")
    records["ours"] = side_records(sys.executable, args, "ours")
    if args.out:
        with args.out.open("a") as f:
            for side in records.values():
                for r in side:
                    f.write(json.dumps({**r, "gin_param": args.gin_param}) + "\n")
    print(table(records))


if __name__ == "__main__":
    main()
