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
    """``kind``: 'transformer' or 'reformer', optionally ':ATTENTION_TYPE' ('reformer:ring')."""
    kind, _, attention = kind.partition(":")
    common = dict(vocab_size=VOCAB, d_model=16, d_ff=32, n_layers=n_layers, n_heads=2,
                  max_len=LENGTH, dropout=0.0, mode=mode)
    if attention:
        common["attention_type"] = attention
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


def _memory_kinds(tree):
    return sorted({str(leaf.sharding.memory_kind) for leaf in jax.tree.leaves(tree)})


def train(seed: int, kind: str, meshes: str, n_steps: int = 3, n_layers: int = 2,
          memory_efficient: int = 0):
    """``n_steps`` on one device, then on each mesh of ``meshes`` ('data=4;fsdp=4'): the
    losses, the weights' and slots' layouts and bytes per device. ``memory_efficient``: with
    `MemoryEfficientTrainer` (the reversible stack's weights and slots in host memory)."""
    model = tiny_model(kind, "train", n_layers)
    w0, s0 = model.init(ShapeDtype((BATCH, LENGTH), jnp.int32), jax.random.PRNGKey(seed))
    data = batches(seed, n_steps)

    def run(mesh):
        step = make_train_step(model, Adam(learning_rate=0.01), mesh=mesh,
                               memory_efficient=bool(memory_efficient))
        w, s, o = step.place(w0, s0, step.init_opt_state(w0))
        losses = []
        for i, batch in enumerate(data):
            w, s, o, m = step(w, s, o, batch, jax.random.fold_in(jax.random.PRNGKey(seed), i))
            losses.append(float(m["loss"]))
        return losses, w, o, step

    ref, w1, o1, _ = run(None)
    record = {"one_device": ref, "bytes_one": max(bytes_per_device(w1).values()),
              "slot_bytes_one": max(bytes_per_device(o1).values())}
    for text in meshes.split(";"):
        losses, w, o, step = run(make_mesh(**parse_mesh_spec(text)))
        mu = o[0].mu if isinstance(o, tuple) and hasattr(o[0], "mu") else None
        if memory_efficient:  # the stack's weights and slots: where, and laid out how
            stack_w = w[step.trainer.k]
            stack_mu = [s.mu for s in jax.tree.leaves(o.stack, is_leaf=lambda x: hasattr(
                x, "mu")) if hasattr(s, "mu")]  # (one per block of a ReversibleSerial)
            record[text + ":stack"] = {
                "kinds": _memory_kinds(stack_w), "slot_kinds": _memory_kinds(o.stack),
                "outer_kinds": _memory_kinds(o.outer),
                "weight_specs": _spec_text(stack_w), "mu_specs": _spec_text(stack_mu)}
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


def ring_layer(seed: int, mesh: str, causal: int):
    """`RingSelfAttention` inside jit on ``mesh`` (its sequence axis in effect, the input's
    length split over it) against `SelfAttention`'s full attention on one device with the same
    weights: the largest differences in value and in the gradients of the input and weights."""
    from jax.sharding import NamedSharding, PartitionSpec

    from terraformer.layers.attention import SelfAttention
    from terraformer.parallel.mesh import mesh_context
    from terraformer.parallel.ring import RingSelfAttention

    rng = np.random.default_rng(seed)
    b, length, d = 4, 64, 16
    args = dict(n_heads=2, d_qk=8, d_v=8, causal=bool(causal), mode="train")
    x = jnp.asarray(rng.normal(size=(b, length, d)), jnp.float32)
    ct = jnp.asarray(rng.normal(size=(b, length, d)), jnp.float32)
    ring = RingSelfAttention(chunk_len=8, **args)  # 16 positions a shard: two chunks
    weights, state = ring.init(ShapeDtype(x.shape, jnp.float32), jax.random.PRNGKey(seed))

    def loss(layer, x, w):
        return jnp.sum(layer.apply(x, w, state, None)[0] * ct)

    full = SelfAttention(**args)
    ref = full.apply(x, weights, state, None)[0]
    ref_g = jax.grad(functools.partial(loss, full), (0, 1))(x, weights)
    m = make_mesh(**parse_mesh_spec(mesh))
    x_sharded = jax.device_put(x, NamedSharding(m, PartitionSpec(("data", "fsdp"), "sequence")))
    with mesh_context(m):
        got = jax.jit(lambda x, w: ring.apply(x, w, state, None)[0])(x_sharded, weights)
        got_g = jax.jit(jax.grad(functools.partial(loss, ring), (0, 1)))(x_sharded, weights)
        text = jax.jit(lambda x, w: ring.apply(x, w, state, None)[0]).lower(
            x_sharded, weights).as_text()
    return {"value": float(jnp.max(jnp.abs(got - ref))),
            "grads": [float(jnp.max(jnp.abs(a - b_)))
                      for a, b_ in zip(jax.tree.leaves(got_g), jax.tree.leaves(ref_g))],
            "scale": float(jnp.max(jnp.abs(ref))),
            "out_spec": str(got.sharding.spec), "ppermute": "collective_permute" in text}


def sequence_layers(seed: int, mesh: str, names: str = "all"):
    """Chunked local attention (halo exchange) and blockwise attention (ring) inside jit on
    ``mesh`` (its sequence axis in effect, the input's length split over it) against the same
    layer, same weights, on one device: per case the largest differences in value and in the
    gradients of the input and weights, and whether neighbours' chunks travelled by
    collective permutes. ``names``: the cases to run, comma-separated, or 'all' (then also
    attention dropout, which must run and change the output)."""
    from jax.sharding import NamedSharding, PartitionSpec

    from terraformer.layers.attention import SelfAttention
    from terraformer.layers.blockwise import BlockwiseAttention
    from terraformer.parallel.mesh import mesh_context

    rng = np.random.default_rng(seed)
    b, length, d = 2, 64, 16  # 16 positions a shard on sequence=4: chunks of 8, two a shard
    head = dict(n_heads=2, d_qk=8, d_v=8, mode="train")
    cases = {
        "local_causal": SelfAttention(causal=True, chunk_len=8, n_chunks_before=1, **head),
        "local_both_ways": SelfAttention(chunk_len=8, n_chunks_before=2, n_chunks_after=1,
                                         **head),
        "local_masked": SelfAttention(chunk_len=8, n_chunks_before=1, masked=True, **head),
        "blockwise_causal": BlockwiseAttention(causal=True, block_len=8, **head),
        "blockwise": BlockwiseAttention(block_len=8, masked=True, **head),
    }
    if names != "all":
        cases = {name: cases[name] for name in names.split(",")}
    m = make_mesh(**parse_mesh_spec(mesh))
    rows = PartitionSpec(("data", "fsdp"), "sequence")
    x = jnp.asarray(rng.normal(size=(b, length, d)), jnp.float32)
    ct = jnp.asarray(rng.normal(size=(b, length, d)), jnp.float32)
    key_mask = jnp.asarray(rng.random((b, length)) > 0.3)
    record = {}
    for name, layer in cases.items():
        masked = layer.n_in == 2
        sig = ShapeDtype(x.shape, jnp.float32)
        weights, state = layer.init((sig, ShapeDtype(key_mask.shape, bool)) if masked else sig,
                                    jax.random.PRNGKey(seed))

        def fwd(x, w, mask, layer=layer, state=state, masked=masked):
            y = layer.apply((x, mask) if masked else x, w, state, None)[0]
            return y[0] if masked else y

        def loss(x, w, mask, fwd=fwd):
            return jnp.sum(fwd(x, w, mask) * ct)

        ref = jax.jit(fwd)(x, weights, key_mask)
        ref_g = jax.jit(jax.grad(loss, (0, 1)))(x, weights, key_mask)
        xs = jax.device_put(x, NamedSharding(m, rows))
        ms = jax.device_put(key_mask, NamedSharding(m, rows))
        with mesh_context(m):
            lowered = jax.jit(fwd).lower(xs, weights, ms)
            got = lowered.compile()(xs, weights, ms)
            got_g = jax.jit(jax.grad(loss, (0, 1)))(xs, weights, ms)
        record[name] = {
            "value": float(jnp.max(jnp.abs(got - ref))), "scale": float(jnp.max(jnp.abs(ref))),
            "grads": [float(jnp.max(jnp.abs(a - b_)) / jnp.max(jnp.abs(b_)))
                      for a, b_ in zip(jax.tree.leaves(got_g), jax.tree.leaves(ref_g))],
            "out_spec": str(got.sharding.spec),
            "ppermute": "collective_permute" in lowered.as_text()}
    if names != "all":
        return record
    dropped = SelfAttention(causal=True, chunk_len=8, n_chunks_before=1,
                            attention_dropout=0.5, **head)
    weights, state = dropped.init(ShapeDtype(x.shape, jnp.float32), jax.random.PRNGKey(seed))
    with mesh_context(m):
        y = jax.jit(lambda x, w, r: dropped.apply(x, w, state, r)[0])(
            jax.device_put(x, NamedSharding(m, rows)), weights, jax.random.PRNGKey(seed + 1))
    plain = SelfAttention(causal=True, chunk_len=8, n_chunks_before=1, **head)
    y0 = plain.apply(x, weights, state, None)[0]
    record["dropout"] = {"finite": bool(jnp.all(jnp.isfinite(y))),
                         "changed": float(jnp.max(jnp.abs(y - y0)))}
    return record


def lagging_device(seed: int, seconds: int):
    """A psum over 4 devices whose device 0 arrives ``seconds`` late (a host callback sleeps):
    with the runtime's settings the others wait instead of XLA:CPU aborting the process."""
    import time

    from jax.sharding import NamedSharding, PartitionSpec

    mesh = make_mesh(data=4)

    def late(x):
        if float(x[0]) == 0.0:
            time.sleep(seconds)
        return x

    def body(x):
        x = jax.pure_callback(late, jax.ShapeDtypeStruct(x.shape, x.dtype), x)
        return jax.lax.psum(x, "data")

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=PartitionSpec("data"),
                              out_specs=PartitionSpec()))
    x = jax.device_put(jnp.arange(4.0), NamedSharding(mesh, PartitionSpec("data")))
    return {"sum": float(f(x)[0]), "expected": 6.0}


if __name__ == "__main__":
    check, seed, *rest = sys.argv[1:]
    fn = {"train": train, "run_dir": run_dir, "decode": decode, "ring": ring,
          "ring_layer": ring_layer, "sequence_layers": sequence_layers,
          "lagging_device": lagging_device}[check]
    args = [int(a) if a.isdigit() else a for a in rest]
    print(json.dumps(fn(int(seed), *args)), flush=True)
