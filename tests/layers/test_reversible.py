"""Reversible layers: semantics, reversal, gradients equal to the ordinary stack, memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from terraformer import layers as tl
from terraformer.layers.core import PackedKernel
from terraformer.layers.reversible import (
    ReversibleHalfResidual,
    ReversibleLayer,
    ReversibleRepeat,
    ReversibleSelect,
    ReversibleSerial,
    ReversibleSwap,
    UnstackedLayers,
)


def _normal(key, shape):
    return jax.random.normal(key, shape, jnp.float32)


def _residual_fn(d_model, d_ff=32, dropout=0.0, mode="train"):
    return [
        tl.LayerNorm(),
        tl.Dense(d_ff),
        tl.Relu(),
        tl.Dropout(dropout, mode=mode),
        tl.Dense(d_model),
    ]


def _blocks(n_blocks, d_model, dropout=0.0, mode="train"):
    """RevNet blocks: (x1, x2) -> (x1 + F(x2), ...) then (x2 + G(y1), ...)."""
    layers = []
    for _ in range(n_blocks):
        layers += [
            ReversibleHalfResidual(*_residual_fn(d_model, dropout=dropout, mode=mode)),
            ReversibleSwap(),
            ReversibleHalfResidual(*_residual_fn(d_model, dropout=dropout, mode=mode)),
            ReversibleSwap(),
        ]
    return layers


def _init(layer, inputs, key):
    return layer.init_weights_and_state(tl.signature(inputs), key)


def _grad(loss, argnums=(0, 1)):
    # Eager on purpose: on CPU, compiling each small graph costs more than running it.
    return jax.grad(loss, argnums=argnums)


def _max_err(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(a, b, strict=True))


def _rel_err(a, b):
    fa, fb = ravel_pytree(a)[0], ravel_pytree(b)[0]
    return float(jnp.linalg.norm(fa - fb) / jnp.linalg.norm(fb))


def _loss(layer, state, rng):
    """A loss that depends on every output item non-linearly."""

    def loss(weights, xs):
        ys, _ = layer.apply(xs, weights, state, rng)
        return sum(jnp.sum(jnp.sin(y) * (i + 1)) for i, y in enumerate(ys))

    return loss


# -- the simple layers ------------------------------------------------------------------------


def test_swap_and_select_permute_and_reverse(seed):
    keys = jax.random.split(jax.random.PRNGKey(seed), 6)
    a, b, c = (_normal(k, (2, 3)) for k in keys[:3])
    swap = ReversibleSwap()
    assert (swap.n_in, swap.n_out) == (2, 2)
    y, _ = swap.apply((a, b), (), (), None)
    assert y[0] is b and y[1] is a
    assert swap.reverse(y)[0] is a

    sel = ReversibleSelect([2, 0, 1])
    y, _ = sel.apply((a, b, c), (), (), None)
    assert [t is s for t, s in zip(y, (c, a, b), strict=True)] == [True] * 3
    x = sel.reverse(y)
    assert [t is s for t, s in zip(x, (a, b, c), strict=True)] == [True] * 3
    grads = tuple(_normal(k, (2, 3)) for k in keys[3:])
    x, (gx, _) = sel.reverse_and_grad(y, grads)
    # The gradient of output i flows to input indices[i].
    np.testing.assert_array_equal(gx[2], grads[0])
    np.testing.assert_array_equal(gx[0], grads[1])
    np.testing.assert_array_equal(gx[1], grads[2])


@pytest.mark.parametrize("indices", [[0, 0], [1], [0, 2], []])
def test_select_rejects_non_permutations(indices):
    with pytest.raises(ValueError, match="permutation"):
        ReversibleSelect(indices)


def test_serial_rejects_non_reversible_layers():
    with pytest.raises(TypeError, match="ReversibleLayer"):
        ReversibleSerial(ReversibleSwap(), tl.Dense(4))
    with pytest.raises(TypeError, match="ReversibleLayer"):
        ReversibleRepeat(tl.Dense(4), 2)
    with pytest.raises(ValueError, match="n_layers"):
        ReversibleRepeat(ReversibleSwap(), 0)


def test_reversible_layer_needs_equal_arity():
    with pytest.raises(ValueError, match="n_in == n_out"):
        ReversibleLayer(n_in=2, n_out=1)


class _Scale(ReversibleLayer):
    """y = x * exp(s): a reversible layer that relies on the default reverse_and_grad."""

    def __init__(self):
        super().__init__(n_in=1)

    def init_weights_and_state(self, input_signature, rng):
        return {"s": 0.1 * jax.random.normal(rng, input_signature.shape[-1:])}, ()

    def apply(self, x, weights, state, rng):
        return x * jnp.exp(weights["s"]), state

    def reverse(self, output, weights=(), state=(), rng=None):
        return output * jnp.exp(-weights["s"])


def test_default_reverse_and_grad(seed):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    xs = (_normal(keys[0], (2, 4, 8)), _normal(keys[1], (2, 4, 8)))
    layers = [
        ReversibleHalfResidual(tl.Dense(8), tl.Tanh()),
        ReversibleSwap(),
        _Scale(),
        ReversibleHalfResidual(tl.Dense(8)),
    ]
    rev = ReversibleSerial(*layers)
    w, s = _init(rev, xs, keys[2])
    g_rev = _grad(_loss(rev, s, None))(w, xs)
    g_ref = _grad(_loss(tl.Serial(*layers), s, None))(w, xs)
    assert _rel_err(g_rev, g_ref) < 1e-5, f"seed {seed}"


# -- the half residual ------------------------------------------------------------------------


def test_half_residual_computes_x1_plus_f_of_x2(seed):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    x1, x2 = _normal(k1, (2, 5, 8)), _normal(k2, (2, 5, 8))
    f = tl.Serial(*_residual_fn(8))
    layer = ReversibleHalfResidual(*f.sublayers)
    assert (layer.n_in, layer.n_out) == (2, 2)
    w, s = _init(layer, (x1, x2), k3)
    (y1, y2), _ = layer.apply((x1, x2), w, s, None)
    f_x2, _ = f.apply(x2, w[0], s[0], None)
    np.testing.assert_allclose(y1, x1 + f_x2, rtol=1e-6, atol=1e-6, err_msg=f"seed {seed}")
    assert y2 is x2
    rx1, rx2 = layer.reverse((y1, y2), w, s, None)
    np.testing.assert_allclose(rx1, x1, atol=1e-5, err_msg=f"seed {seed}")
    assert rx2 is x2


def test_half_residual_with_extra_inputs_keeps_them(seed):
    """F may read items below x2 (a mask here, int32); they pass through unchanged."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    x1, x2 = _normal(k1, (2, 6, 8)), _normal(k2, (2, 6, 8))
    mask = jnp.asarray(np.random.default_rng(seed).integers(0, 2, (2, 6)), jnp.int32)
    masked = tl.Fn("Masked", lambda h, m: h * m[..., None].astype(h.dtype))
    layer = ReversibleHalfResidual(tl.Dense(8), masked)
    assert layer.n_in == 3
    stack = ReversibleSerial(layer, ReversibleSwap(), ReversibleHalfResidual(tl.Dense(8), masked))
    w, s = _init(stack, (x1, x2, mask), k3)
    (y1, y2, m), _ = stack.apply((x1, x2, mask), w, s, None)
    assert m is mask or np.array_equal(m, mask)
    # Masked positions get no residual on either half.
    off = np.asarray(mask) == 0
    np.testing.assert_array_equal(np.asarray(y1)[off], np.asarray(x2)[off])
    np.testing.assert_array_equal(np.asarray(y2)[off], np.asarray(x1)[off])
    # Gradients through the reversible stack equal those of the ordinary one.
    ref = tl.Serial(*stack.sublayers)

    def loss(layer_):
        def f(w_, a, b):
            ys, _ = layer_.apply((a, b, mask), w_, s, None)
            return jnp.sum(jnp.sin(ys[0])) + 2 * jnp.sum(jnp.cos(ys[1]))

        return f

    g_rev = _grad(loss(stack), argnums=(0, 1, 2))(w, x1, x2)
    g_ref = _grad(loss(ref), argnums=(0, 1, 2))(w, x1, x2)
    assert _rel_err(g_rev, g_ref) < 1e-5, f"seed {seed}"


def test_half_residual_shape_mismatch_is_an_error():
    layer = ReversibleHalfResidual(tl.Dense(3))
    x = (jnp.zeros((1, 2, 4)), jnp.zeros((1, 2, 4)))
    w, s = layer.init(tl.signature(x))
    with pytest.raises(ValueError, match="accumulator's shape"):
        layer.apply(x, w, s, None)


# -- reversal and gradients of a stack --------------------------------------------------------


def _stack_setup(seed, n_blocks=2, d_model=16, dropout=0.0, batch=2, length=8):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    xs = (_normal(keys[0], (batch, length, d_model)), _normal(keys[1], (batch, length, d_model)))
    layers = _blocks(n_blocks, d_model, dropout=dropout)
    rev = ReversibleSerial(*layers)
    w, s = _init(rev, xs, keys[2])
    return rev, layers, xs, w, s, keys[3]


def test_reverse_reconstructs_inputs(seed):
    rev, _, xs, w, s, rng = _stack_setup(seed, n_blocks=2, dropout=0.2)
    ys, _ = rev.apply(xs, w, s, rng)
    assert _max_err(rev.reverse(ys, w, s, rng), xs) < 1e-5, f"seed {seed}"


def test_gradients_equal_ordinary_residual_stack(seed):
    """4 layers (2 RevNet blocks), d=16, dropout on: same rng gives the same masks."""
    rev, layers, xs, w, s, rng = _stack_setup(seed, n_blocks=2, dropout=0.3)
    ref = tl.Serial(*layers)
    y_rev, _ = rev.apply(xs, w, s, rng)
    y_ref, _ = ref.apply(xs, w, s, rng)
    assert _max_err(y_rev, y_ref) < 1e-6
    g_rev = _grad(_loss(rev, s, rng))(w, xs)
    g_ref = _grad(_loss(ref, s, rng))(w, xs)
    assert _rel_err(g_rev, g_ref) < 1e-5, f"seed {seed}"
    for a, b in zip(jax.tree.leaves(g_rev), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=f"seed {seed}")


def test_typed_keys_and_no_rng(seed):
    rev, layers, xs, w, s, _ = _stack_setup(seed, n_blocks=1)
    for rng in (jax.random.key(seed), None):
        g_rev = _grad(_loss(rev, s, rng))(w, xs)
        g_ref = _grad(_loss(tl.Serial(*layers), s, rng))(w, xs)
        assert _rel_err(g_rev, g_ref) < 1e-5, f"seed {seed}"


def test_nested_serial_reverse_and_grad(seed):
    """A ReversibleSerial inside another uses the inner one's reverse_and_grad."""
    _, layers, xs, _, _, rng = _stack_setup(seed, n_blocks=2, dropout=0.1)
    nested = ReversibleSerial(ReversibleSerial(*layers[:4]), ReversibleSerial(*layers[4:]))
    w, s = _init(nested, xs, jax.random.PRNGKey(seed + 1))
    ref = tl.Serial(*nested.sublayers)
    g_rev = _grad(_loss(nested, s, rng))(w, xs)
    g_ref = _grad(_loss(ref, s, rng))(w, xs)
    assert _rel_err(g_rev, g_ref) < 1e-5, f"seed {seed}"


def test_vmap_and_jit_of_apply(seed):
    rev, _, xs, w, s, _ = _stack_setup(seed, n_blocks=1)
    direct, _ = rev.apply(xs, w, s, None)
    mapped = jax.vmap(lambda a, b: rev.apply((a[None], b[None]), w, s, None)[0])(*xs)
    assert _max_err([m[:, 0] for m in mapped], direct) < 1e-5
    jitted = jax.jit(lambda w_, x_: rev.apply(x_, w_, s, None)[0])(w, xs)
    assert _max_err(jitted, direct) < 1e-5


def test_state_is_passed_through(seed):
    """Layers with state (a predict-mode position counter) return their new state."""
    d = 8
    x = _normal(jax.random.PRNGKey(seed), (1, 3, d))
    layers = [
        ReversibleHalfResidual(tl.PositionalEncoding(max_len=16, mode="predict"), tl.Dense(d)),
        ReversibleSwap(),
    ]
    rev = ReversibleSerial(*layers)
    w, s = rev.init(tl.signature((x, x)))
    ys, s1 = rev.apply((x, x), w, s, None)
    ys_ref, s1_ref = tl.Serial(*layers).apply((x, x), w, s, None)
    assert _max_err(ys, ys_ref) == 0.0
    assert int(s1[0][0][0]) == 3 and int(s1_ref[0][0][0]) == 3
    _, s2 = rev.apply(ys, w, s1, None)
    assert int(s2[0][0][0]) == 6
    # Gradients still flow (state gets a zero cotangent).
    g = jax.grad(lambda w_: jnp.sum(rev.apply((x, x), w_, s, None)[0][1]))(w)
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(g))


# -- the scanned variant ---------------------------------------------------------------------


def _unstack(tree, n):
    return tuple(jax.tree.map(lambda a, i=i: a[i], tree) for i in range(n))


def test_repeat_equals_serial_of_copies(seed):
    n, d = 2, 16
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    xs = (_normal(keys[0], (2, 8, d)), _normal(keys[1], (2, 8, d)))
    block = ReversibleSerial(*_blocks(1, d, dropout=0.2))
    rep = ReversibleRepeat(block, n)
    w, s = _init(rep, xs, keys[2])
    assert all(leaf.shape[0] == n for leaf in jax.tree.leaves(w))
    ser = ReversibleSerial(*[block] * n)
    ws, ss = _unstack(w, n), _unstack(s, n)
    rng = keys[3]
    y_rep, _ = rep.apply(xs, w, s, rng)
    y_ser, _ = ser.apply(xs, ws, ss, rng)
    assert _max_err(y_rep, y_ser) < 1e-5, f"seed {seed}"
    assert _max_err(rep.reverse(y_rep, w, s, rng), xs) < 1e-5, f"seed {seed}"
    g_rep = _grad(_loss(rep, s, rng))(w, xs)
    g_ser = _grad(_loss(ser, ss, rng))(ws, xs)
    g_ser_w = jax.tree.map(lambda *a: jnp.stack(a), *g_ser[0])
    assert _rel_err((g_rep[0], g_rep[1]), (g_ser_w, g_ser[1])) < 1e-5, f"seed {seed}"


def test_repeat_predict_mode_runs_layers_on_per_layer_state(seed):
    """Predict mode: per-layer states, stacked or unstacked weights, the scan's outputs."""
    n, d = 3, 16
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    xs = (_normal(keys[0], (2, 5, d)), _normal(keys[1], (2, 5, d)))
    scanned = ReversibleRepeat(ReversibleSerial(*_blocks(1, d, mode="eval")), n)
    w, s = _init(scanned, xs, keys[2])
    want, _ = scanned.apply(xs, w, s, None)
    unrolled = ReversibleRepeat(ReversibleSerial(*_blocks(1, d, mode="predict")), n,
                                mode="predict")
    assert unrolled.unrolled and not scanned.unrolled
    _, state = _init(unrolled, xs, keys[2])
    assert isinstance(state, tuple) and len(state) == n
    for weights in (w, UnstackedLayers(_unstack(w, n))):
        got, new_state = jax.jit(unrolled.apply)(xs, weights, state, None)
        assert _max_err(got, want) < 1e-5, f"seed {seed}"
        assert isinstance(new_state, tuple) and len(new_state) == n
    with pytest.raises(ValueError, match="tuple of 3 per-layer states"):
        unrolled.apply(xs, w, s, None)


def test_repeat_packs_its_stack_for_decoding(seed):
    """Predict mode: an UnstackedLayers of per-layer packed weights; train/eval: the stacked
    weights packed by the block. Both give the outputs of the weights as stored."""
    n, d = 3, 16
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    xs = (_normal(keys[0], (2, 5, d)), _normal(keys[1], (2, 5, d)))
    unrolled = ReversibleRepeat(ReversibleSerial(*_blocks(1, d, mode="predict")), n,
                                mode="predict")
    w, state = _init(unrolled, xs, keys[2])
    want, _ = unrolled.apply(xs, w, state, None)
    packed = unrolled.pack_for_decoding(w, "float32")
    assert isinstance(packed, UnstackedLayers) and len(packed.layers) == n
    for i, layer in enumerate(packed.layers):
        kernel = layer[0][0][1]["w"]  # block -> first half-residual -> Serial -> Dense(d_ff)
        assert isinstance(kernel, PackedKernel) and kernel.shape == (d, 32)
        np.testing.assert_array_equal(kernel.dense(), w[0][0][1]["w"][i])
    got, _ = unrolled.apply(xs, packed, state, None)
    assert _max_err(got, want) < 1e-5, f"seed {seed}"
    scanned = ReversibleRepeat(ReversibleSerial(*_blocks(1, d, mode="eval")), n)
    stacked = scanned.pack_for_decoding(w, "float32")
    assert stacked[0][0][1]["w"].shape == (n, d, 32)


# -- memory -----------------------------------------------------------------------------------


def _grad_temp_bytes(layer, d_model=64, length=4096):
    """Temp memory XLA assigns to jit(grad(loss)) of `layer` on (1, length, d_model) pairs."""
    sig = (tl.ShapeDtype((1, length, d_model)),) * 2
    w, s = layer.init_weights_and_state(sig, jax.random.PRNGKey(0))
    xs = tuple(jnp.zeros(t.shape) for t in sig)
    f = jax.jit(jax.grad(_loss(layer, s, None), argnums=(0, 1)))
    stats = f.lower(w, xs).compile().memory_analysis()
    weight_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(w))
    return stats.temp_size_in_bytes, weight_bytes


def _ff_half(d_model):
    return ReversibleHalfResidual(tl.LayerNorm(), tl.Dense(128), tl.Relu(), tl.Dense(d_model))


def test_memory_flat_in_depth():
    """Activation memory of the gradient: flat in depth for reversible stacks.

    Measured with XLA's memory analysis of the compiled `grad` (available on CPU). An ordinary
    stack keeps every layer's activations (~4 MiB per layer here). `ReversibleRepeat` (one
    block, `lax.scan`) is flat on every backend. The unrolled `ReversibleSerial` ties each
    layer's recomputation to the gradient chain with `lax.optimization_barrier`, which XLA's
    GPU/TPU pipelines keep until scheduling; the CPU pipeline drops barriers before scheduling
    and its scheduler runs some reconstructions early, so on CPU it grows, but far slower
    than the ordinary stack.
    """
    d = 64

    def halves(n):
        layers = []
        for _ in range(n // 2):
            layers += [_ff_half(d), ReversibleSwap(), _ff_half(d), ReversibleSwap()]
        return layers

    plain = {n: _grad_temp_bytes(tl.Serial(*halves(n)))[0] for n in (2, 8)}
    serial = {n: _grad_temp_bytes(ReversibleSerial(*halves(n)))[0] for n in (2, 8)}
    block = ReversibleSerial(*halves(2))
    repeat = {n: _grad_temp_bytes(ReversibleRepeat(block, n // 2)) for n in (2, 16)}

    assert plain[8] > 2.5 * plain[2], plain
    temp16, weights16 = repeat[16]
    assert temp16 < 1.3 * repeat[2][0] + weights16, repeat
    assert serial[8] - serial[2] < 0.3 * (plain[8] - plain[2]), (serial, plain)
