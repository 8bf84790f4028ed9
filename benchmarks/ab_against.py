"""Old against new in one process: this checkout's `terraformer` against a git ref's.

    python benchmarks/ab_against.py --ref baseline-s6 --workload t16k|d-dense|d-sparse
                                    [--rounds N] [--steps S] [--seq_len L]

The ref's `terraformer/` package is exported (`git archive REF terraformer`) into a temporary
folder as `terraformer_ref` (its absolute imports and gin module names rewritten), so both
packages load side by side. The same workload is built with each package's own builders and
timed interleaved, new then ref then new ... (ref first in every other round), so that a busy
or throttled machine slows both alike:

- `t16k`: the T-len training step at 16,384 tokens (`--seq_len` for another length;
  ReformerLM with LSH attention, Adam), the
  model of each package's `bench.t_workload_model` and a step written here once for both
  (loss from each package's `cross_entropy`). Each round times `--steps` steps a side.
- `d-dense`, `d-sparse`: the D workload's per-token decoding (each package's
  `bench.d_workload_decoder`, a 128-token prompt, then 128 greedy tokens in blocks of
  `decoding.STREAM_BLOCK`, each round with a fresh prefill; a round's first block is a
  warm-up and left out).

Prints one JSON record: per side the median seconds (per step or per token) over all rounds,
the ratio ref / new per round and pooled (> 1: the new code is faster).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import pathlib
import re
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import terraformer.runtime  # noqa: E402  (only os/ctypes: JAX is not loaded yet)

terraformer.runtime.tune_cpu_runtime()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

REF_NAME = "terraformer_ref"


def export_ref(ref: str) -> pathlib.Path:
    """Exports REF's `terraformer/` as `<tmp>/terraformer_ref`, imports rewritten; the tmp
    folder is returned (put it on sys.path)."""
    root = pathlib.Path(tempfile.mkdtemp(prefix="ab_ref_"))
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "terraformer"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    (root / "terraformer").rename(root / REF_NAME)
    imports = re.compile(r"\b(from|import)(\s+)terraformer\b")
    # gin registers configurables by module name: the two packages' names must not collide.
    gin_modules = re.compile(r"""(module\s*=\s*["'])terraformer\b""")
    for path in (root / REF_NAME).rglob("*.py"):
        text = imports.sub(rf"\1\2{REF_NAME}", path.read_text())
        path.write_text(gin_modules.sub(rf"\1{REF_NAME}", text))
    return root


def load(package: str) -> dict:
    modules = ("bench", "decoding", "layers.losses", "shapes")
    return {m: importlib.import_module(f"{package}.{m}") for m in modules}


# -- T-len 16K ------------------------------------------------------------------------------
def t_side(pkg: dict, seq_len: int):
    """(a function that runs one timed training step, its compile seconds)."""
    bench, losses, shapes = pkg["bench"], pkg["layers.losses"], pkg["shapes"]
    model = bench.t_workload_model(seq_len, 2, "lsh")
    tokens = np.random.default_rng(0).integers(1, 256, size=(1, seq_len)).astype(np.int32)
    batch = (jnp.asarray(tokens), jnp.asarray(tokens), jnp.ones((1, seq_len), jnp.float32))
    weights, state = model.init(shapes.ShapeDtype((1, seq_len), jnp.int32),
                                jax.random.PRNGKey(0))
    optimizer = optax.adam(1e-3)

    def loss_fn(weights, batch, rng):
        inputs, targets, mask = batch
        log_probs, _ = model.apply(inputs, weights, state, rng)
        return losses.cross_entropy(log_probs, targets, mask)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(weights, opt_state, batch, rng):
        loss, grads = jax.value_and_grad(loss_fn)(weights, batch, rng)
        updates, opt_state = optimizer.update(grads, opt_state, weights)
        return optax.apply_updates(weights, updates), opt_state, loss

    carry = {"w": weights, "o": optimizer.init(weights)}
    rng = jax.random.PRNGKey(1)

    def run() -> float:
        start, cpu = time.perf_counter(), time.process_time()
        carry["w"], carry["o"], loss = step(carry["w"], carry["o"], batch, rng)
        jax.block_until_ready(loss)
        run.cpu_s.append(time.process_time() - cpu)
        return time.perf_counter() - start

    run.cpu_s = []
    first = run()
    run.cpu_s.clear()
    return run, first


def time_t(sides: dict, rounds: int, steps: int) -> dict:
    times = {name: [[] for _ in range(rounds)] for name in sides}
    for r in range(rounds):
        for _ in range(steps):
            for name in _order(sides, r):
                times[name][r].append(sides[name]())
    return times


def _order(sides: dict, round_index: int) -> list:
    """The sides in turn, the order reversed every other round (new first, then ref first)."""
    names = list(sides)
    return names if round_index % 2 == 0 else names[::-1]


# -- D per token ----------------------------------------------------------------------------
def d_side(pkg: dict, kind: str, prompt, new_tokens: int, block: int):
    """A function that runs one round (prefill, then blocks of tokens, one block per call of
    the returned generator) yielding seconds per token of each block."""
    bench, decoding = pkg["bench"], pkg["decoding"]
    max_len = prompt.shape[1] + new_tokens + 8
    decoder, _ = bench.d_workload_decoder(kind, 12, max_len)
    loop = decoder._loop(block, decoding.Sampling(), ())

    def one_round():
        log_probs, state = decoder.prefill(prompt)
        jax.block_until_ready(log_probs)
        rng, done = jax.random.PRNGKey(0), jnp.zeros((1,), bool)
        for _ in range(new_tokens // block):
            start = time.perf_counter()
            out, _, state, log_probs, rng, done = loop(decoder.weights, state, log_probs, rng,
                                                       done, None)
            jax.block_until_ready(out)
            yield (time.perf_counter() - start) / block

    return one_round


def time_d(sides: dict, rounds: int) -> dict:
    times = {name: [] for name in sides}
    for r in range(rounds):
        gens = {name: sides[name]() for name in _order(sides, r)}
        this_round = {name: [] for name in sides}
        while gens:
            for name in list(gens):
                try:
                    this_round[name].append(next(gens[name]))
                except StopIteration:
                    del gens[name]
        for name, ts in this_round.items():
            times[name].append(ts[1:] or ts)
    return times


def summary(times: dict) -> dict:
    per_round = {name: [float(np.median(r)) for r in rounds] for name, rounds in times.items()}
    pooled = {name: float(np.median([t for r in rounds for t in r]))
              for name, rounds in times.items()}
    return dict(
        new_s=pooled["new"], ref_s=pooled["ref"],
        ratio_ref_over_new=pooled["ref"] / pooled["new"],
        ratio_per_round=[round(a / b, 4) for a, b in zip(per_round["ref"], per_round["new"])],
        new_s_per_round=per_round["new"], ref_s_per_round=per_round["ref"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref", required=True, help="git ref of the old code")
    parser.add_argument("--workload", required=True, choices=("t16k", "d-dense", "d-sparse"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="t16k: steps a side per round")
    parser.add_argument("--seq_len", type=int, default=16384, help="t16k: the length")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.steps < 1:
        parser.error("--rounds and --steps must be >= 1")
    sys.path.insert(0, str(export_ref(args.ref)))
    packages = {"new": load("terraformer"), "ref": load(REF_NAME)}
    record = dict(workload=args.workload, ref=args.ref, rounds=args.rounds,
                  device=jax.devices()[0].platform)
    if args.workload == "t16k":
        sides, compile_s = {}, {}
        for name, pkg in packages.items():
            sides[name], compile_s[name] = t_side(pkg, args.seq_len)
        times = time_t(sides, args.rounds, args.steps)
        record.update(seq_len=args.seq_len, steps_per_round=args.steps, unit="s/step",
                      compile_s=compile_s)
    else:
        kind = args.workload.split("-")[1]
        new_tokens = 128
        prompt = np.random.default_rng(0).integers(
            1, packages["new"]["bench"].D_SHAPE["vocab_size"], size=(1, 128)).astype(np.int32)
        block = packages["new"]["decoding"].STREAM_BLOCK
        sides = {name: d_side(pkg, kind, prompt, new_tokens, block)
                 for name, pkg in packages.items()}
        for make in sides.values():  # compile both (prefill and the loop) before timing
            for _ in make():
                pass
        times = time_d(sides, args.rounds)
        record.update(prompt_len=128, new_tokens=new_tokens, block_size=block,
                      unit="s/token")
    record.update(summary(times))
    if args.workload == "t16k":
        # Process CPU seconds a step (all threads): on a machine whose CPU share is capped
        # (a cgroup quota), a steadier measure of the work than the wall clock.
        cpu = {name: float(np.median(side.cpu_s)) for name, side in sides.items()}
        record.update(new_cpu_s=cpu["new"], ref_cpu_s=cpu["ref"],
                      cpu_ratio_ref_over_new=cpu["ref"] / cpu["new"])
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
