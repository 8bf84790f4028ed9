"""Checks that need several (simulated) devices, run by the tests in a subprocess:

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python mesh_checks.py CHECK SEED [ARGS]

Each prints one JSON record as its last line. The device count is fixed when JAX starts, so
each check runs in its own process (see test_sharded_training.py).
"""

import functools
import json
import sys

from terraformer.runtime import tune_cpu_runtime

tune_cpu_runtime()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from terraformer.decoding import Decoder  # noqa: E402
from terraformer.models import ReformerLM, TransformerLM  # noqa: E402
from terraformer.parallel import bytes_per_device, make_mesh, parse_mesh_spec  # noqa: E402
from terraformer.shapes import ShapeDtype  # noqa: E402
from terraformer.training.loop import TrainingRun  # noqa: E402
from terraformer.training.optimizers import Adam  # noqa: E402
from terraformer.training.step import make_train_step  # noqa: E402

VOCAB, LENGTH, BATCH = 32, 16, 4


def tiny_model(kind: str, mode: str, n_layers: int = 2):
    common = dict(vocab_size=VOCAB, d_model=16, d_ff=32, n_layers=n_layers, n_heads=2,
                  max_len=LENGTH, dropout=0.0, mode=mode)
    return TransformerLM(**common) if kind == "transformer" else ReformerLM(**common)


def batches(seed: int, n: int):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        tokens = rng.integers(1, VOCAB, (BATCH, LENGTH)).astype(np.int32)
        out.append((tokens, tokens, (rng.random((BATCH, LENGTH)) > 0.2).astype(np.float32)))
    return out


def _spec_text(tree):
    return [str(getattr(leaf.sharding, "spec", "one device")) for leaf in jax.tree.leaves(tree)]


def train(seed: int, kind: str, meshes: str, n_steps: int = 3, n_layers: int = 2):
    """``n_steps`` on one device, then on each mesh of ``meshes`` ('data=4;fsdp=4'): the
    losses, the weights' and slots' layouts and bytes per device."""
    model = tiny_model(kind, "train", n_layers)
    w0, s0 = model.init(ShapeDtype((BATCH, LENGTH), jnp.int32), jax.random.PRNGKey(seed))
    data = batches(seed, n_steps)

    def run(mesh):
        step = make_train_step(model, Adam(learning_rate=0.01), mesh=mesh)
        w, s, o = step.place(w0, s0, step.init_opt_state(w0))
        losses = []
        for i, batch in enumerate(data):
            w, s, o, m = step(w, s, o, batch, jax.random.fold_in(jax.random.PRNGKey(seed), i))
            losses.append(float(m["loss"]))
        return losses, w, o

    ref, w1, o1 = run(None)
    record = {"one_device": ref, "bytes_one": max(bytes_per_device(w1).values()),
              "slot_bytes_one": max(bytes_per_device(o1).values())}
    for text in meshes.split(";"):
        losses, w, o = run(make_mesh(**parse_mesh_spec(text)))
        mu = o[0].mu if isinstance(o, tuple) and hasattr(o[0], "mu") else None
        record[text] = {
            "losses": losses,
            "weight_specs": _spec_text(w),
            "mu_follows_weights": mu is not None and _spec_text(mu) == _spec_text(w),
            "bytes": sorted(bytes_per_device(w).values()),
            "slot_bytes": sorted(bytes_per_device(o).values()),
            "n_devices": len(bytes_per_device(w)),
        }
    return record


def run_dir(seed: int, kind: str, mesh: str, directory: str, steps: int):
    """A TrainingRun in ``directory`` on ``mesh`` to ``steps`` (resuming what is there):
    the losses of the steps it ran and the layout its weights came back in."""
    data = batches(seed, 8)
    run = TrainingRun(directory, lambda mode: tiny_model(kind, mode), lambda: iter(data),
                      optimizer=lambda: Adam(learning_rate=0.01), steps=steps, seed=seed,
                      progress=False, tensorboard=False, async_checkpoints=False,
                      mesh=make_mesh(**parse_mesh_spec(mesh)), log=lambda _: None)
    try:
        run.run()
    finally:
        run.close()
    return {"losses": run.losses, "start_step": run.start_step,
            "weight_specs": _spec_text(run.weights)}


def decode(seed: int, kind: str, mesh: str):
    """Greedy tokens on one device and with the weights sharded over ``mesh``."""
    weights, _ = tiny_model(kind, "eval").init(ShapeDtype((1, 8), jnp.int32),
                                              jax.random.PRNGKey(seed))
    prompt = np.random.default_rng(seed).integers(1, VOCAB, (2, 5)).astype(np.int32)
    one = Decoder(tiny_model(kind, "predict"), weights, batch_size=2).generate(prompt, 10)
    sharded = Decoder(tiny_model(kind, "predict"), weights, batch_size=2,
                      mesh=make_mesh(**parse_mesh_spec(mesh)))
    many = sharded.generate(prompt, 10)
    return {"one": one.tolist(), "mesh": many.tolist(), "weight_specs": _spec_text(sharded.weights)}


def ring(seed: int, mesh: str, causal: int):
    """Ring attention over ``mesh``'s sequence axis against full softmax attention on one
    device: the largest differences in value and in the gradients of q, k and v."""
    from terraformer.layers.attention_core import dot_product_attention, position_mask
    from terraformer.parallel.ring import ring_attention

    rng = np.random.default_rng(seed)
    b, h, length, d = 2, 2, 64, 8
    q, k, v = (jnp.asarray(rng.normal(size=(b, h, length, d)), jnp.float32) for _ in range(3))
    ct = jnp.asarray(rng.normal(size=(b, h, length, d)), jnp.float32)
    pos = jnp.arange(length)
    mask = position_mask(pos, pos, causal=bool(causal))
    m = make_mesh(**parse_mesh_spec(mesh))

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v) * ct)

    full = lambda q, k, v: dot_product_attention(q, k, v, mask)  # noqa: E731
    ringed = lambda q, k, v: ring_attention(q, k, v, m, causal=bool(causal))  # noqa: E731
    ref, ref_g = full(q, k, v), jax.grad(functools.partial(loss, full), (0, 1, 2))(q, k, v)
    got = jax.jit(ringed)(q, k, v)
    got_g = jax.jit(jax.grad(functools.partial(loss, ringed), (0, 1, 2)))(q, k, v)
    return {"value": float(jnp.max(jnp.abs(got - ref))),
            "grads": [float(jnp.max(jnp.abs(a - b))) for a, b in zip(got_g, ref_g)],
            "scale": float(jnp.max(jnp.abs(ref)))}


if __name__ == "__main__":
    check, seed, *rest = sys.argv[1:]
    fn = {"train": train, "run_dir": run_dir, "decode": decode, "ring": ring}[check]
    args = [int(a) if a.isdigit() else a for a in rest]
    print(json.dumps(fn(int(seed), *args)), flush=True)
