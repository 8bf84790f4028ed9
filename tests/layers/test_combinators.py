"""Stack effects of the combinators, checked against hand-written expectations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from terraformer import layers as tl
from terraformer.layers.core import PackedKernel
from terraformer.shapes import ShapeDtype


def _run(layer, *xs):
    sig = tuple(ShapeDtype(x.shape, x.dtype) for x in xs)
    weights, state = layer.init(sig[0] if len(sig) == 1 else sig)
    y, _ = layer.apply(xs[0] if len(xs) == 1 else xs, weights, state, None)
    return y


def _arrays(np_rng, n, shape=(2, 3)):
    return [jnp.asarray(np_rng.normal(size=shape), jnp.float32) for _ in range(n)]


def test_select_dup_swap_drop(np_rng):
    a, b, c = _arrays(np_rng, 3)
    assert tl.Dup().n_in == 1 and tl.Dup().n_out == 2
    y = _run(tl.Dup(), a)
    np.testing.assert_array_equal(y[0], a)
    np.testing.assert_array_equal(y[1], a)
    y = _run(tl.Swap(), a, b)
    np.testing.assert_array_equal(y[0], b)
    np.testing.assert_array_equal(y[1], a)
    y = _run(tl.Select([2, 0, 0], n_in=3), a, b, c)
    for got, want in zip(y, [c, a, a]):
        np.testing.assert_array_equal(got, want)
    drop = tl.Serial(tl.Drop(), tl.Fn("Id", lambda x: x))
    assert (drop.n_in, drop.n_out) == (2, 1)
    np.testing.assert_array_equal(_run(drop, a, b), b)


def test_serial_leaves_unused_items_on_stack(np_rng):
    a, b, c = _arrays(np_rng, 3)
    layer = tl.Serial(tl.Add(), tl.Fn("Neg", lambda x: -x))
    assert (layer.n_in, layer.n_out) == (2, 1)
    layer = tl.Serial(tl.Add(), tl.Multiply())  # (a, b, c) -> ((a + b) * c)
    assert (layer.n_in, layer.n_out) == (3, 1)
    np.testing.assert_allclose(_run(layer, a, b, c), (a + b) * c, rtol=1e-6)
    layer = tl.Serial(tl.Fn("Sq", lambda x: x * x))  # (a, b) keeps b below: n_in 1
    assert (layer.n_in, layer.n_out) == (1, 1)
    keeps = tl.Serial(tl.Swap(), tl.Fn("Sq", lambda x: x * x))  # (a, b) -> (b², a)
    y = _run(keeps, a, b)
    np.testing.assert_allclose(y[0], b * b, rtol=1e-6)
    np.testing.assert_array_equal(y[1], a)


def test_branch_parallel_residual(np_rng):
    a, b = _arrays(np_rng, 2)
    f = tl.Fn("Double", lambda x: 2 * x)
    g = tl.Fn("Sub", lambda x, y: x - y)
    branch = tl.Branch(f, g, None)  # (a, b) -> (2a, a - b, a)
    assert (branch.n_in, branch.n_out) == (2, 3)
    y = _run(branch, a, b)
    for got, want in zip(y, [2 * a, a - b, a]):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    par = tl.Parallel(f, tl.Fn("Neg", lambda x: -x))
    y = _run(par, a, b)
    np.testing.assert_allclose(y[0], 2 * a, rtol=1e-6)
    np.testing.assert_allclose(y[1], -b, rtol=1e-6)
    np.testing.assert_allclose(_run(tl.Residual(f), a), 3 * a, rtol=1e-6)
    res = tl.Residual(f, shortcut=tl.Fn("Neg", lambda x: -x))
    np.testing.assert_allclose(_run(res, a), a, rtol=1e-6)


def test_nested_multi_output(np_rng):
    a, b = _arrays(np_rng, 2)
    model = tl.Serial(
        tl.Branch(tl.Serial(tl.Dup(), tl.Add()), None),  # (a, b) -> (2a, a, b)
        tl.Parallel(None and tl.Identity(), tl.Identity(), tl.Swap()),  # -> (2a, b, a)
        tl.Concatenate(n_items=3, axis=0),
    )
    assert (model.n_in, model.n_out) == (2, 1)
    np.testing.assert_allclose(_run(model, a, b), jnp.concatenate([2 * a, b, a]), rtol=1e-6)


def test_fn_arity_and_multiple_outputs(np_rng):
    a, b = _arrays(np_rng, 2)
    layer = tl.Fn("SumDiff", lambda x, y: (x + y, x - y), n_out=2)
    assert (layer.n_in, layer.n_out) == (2, 2)
    y = _run(layer, a, b)
    np.testing.assert_allclose(y[0], a + b, rtol=1e-6)
    np.testing.assert_allclose(y[1], a - b, rtol=1e-6)


def test_wrong_number_of_inputs_is_a_clear_error(np_rng):
    a, b = _arrays(np_rng, 2)
    layer = tl.Add()
    with pytest.raises(ValueError, match="takes 2 inputs"):
        layer.apply(a, (), (), None)
    with pytest.raises(TypeError, match="Layer"):
        tl.Serial(tl.Dense(3), "not a layer")


def test_init_infers_shapes_through_combinators(np_rng):
    model = tl.Serial(
        tl.Embedding(11, 6), tl.Dup(), tl.Parallel(tl.Dense(5), tl.Dense(7)),
        tl.Concatenate(), tl.LayerNorm(), tl.Dense(3),
    )
    weights, _ = model.init(ShapeDtype((2, 4), jnp.int32))
    assert weights[0].shape == (11, 6)
    assert weights[2][0]["w"].shape == (6, 5)
    assert weights[2][1]["w"].shape == (6, 7)
    assert weights[4]["scale"].shape == (12,)
    assert weights[5]["w"].shape == (12, 3)
    out = model(jnp.asarray(np_rng.integers(0, 11, size=(2, 4)), jnp.int32))
    assert out.shape == (2, 4, 3)


def test_chunk_equals_unchunked_and_grads(np_rng):
    x = jnp.asarray(np_rng.normal(size=(2, 13, 4)), jnp.float32)
    inner = tl.Serial(tl.Dense(8), tl.Relu(), tl.Dense(4))
    weights, state = inner.init(ShapeDtype(x.shape))
    chunked = tl.Chunk(inner, 4)
    want, _ = inner.apply(x, weights, state, None)
    got, _ = chunked.apply(x, weights, state, None)
    np.testing.assert_allclose(got, want, atol=1e-6)

    def loss(layer):
        return lambda w: jnp.sum(layer.apply(x, w, state, None)[0] ** 2)

    g_want = jax.grad(loss(inner))(weights)
    g_got = jax.grad(loss(chunked))(weights)
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_scan_carries_state(np_rng):
    xs = jnp.asarray(np_rng.normal(size=(5, 3)), jnp.float32)
    c0 = jnp.asarray(np_rng.normal(size=(3,)), jnp.float32)
    step = tl.Fn("CumSum", lambda x, c: (x + c, x + c), n_out=2)
    ys, final = _run(tl.Scan(step, axis=0), xs, c0)
    np.testing.assert_allclose(ys, c0 + jnp.cumsum(xs, axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(final, ys[-1], rtol=1e-6)


def test_apply_under_jit_grad_vmap(np_rng):
    model = tl.Serial(tl.Dense(6), tl.Gelu(), tl.Dense(2), tl.LogSoftmax())
    x = jnp.asarray(np_rng.normal(size=(3, 4)), jnp.float32)
    weights, state = model.init(ShapeDtype(x.shape))
    eager, _ = model.apply(x, weights, state, None)
    jitted, _ = jax.jit(model.apply)(x, weights, state, None)
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-6)
    per_row = jax.vmap(lambda row: model.apply(row[None], weights, state, None)[0][0])(x)
    np.testing.assert_allclose(per_row, eager, rtol=1e-5, atol=1e-6)
    grads = jax.grad(lambda w: jnp.sum(model.apply(x, w, state, None)[0]))(weights)
    assert jax.tree.structure(grads) == jax.tree.structure(weights)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_same_rng_same_result_and_dropout_off_in_eval(np_rng):
    x = jnp.asarray(np_rng.normal(size=(4, 10)) + 3.0, jnp.float32)
    train = tl.Dropout(0.5, mode="train")
    key = jax.random.PRNGKey(int(np_rng.integers(1 << 30)))
    y1, _ = train.apply(x, (), (), key)
    y2, _ = train.apply(x, (), (), key)
    np.testing.assert_array_equal(y1, y2)
    assert 0.2 < float(jnp.mean(y1 == 0)) < 0.8
    kept = y1 != 0
    np.testing.assert_allclose(y1[kept], 2 * x[kept], rtol=1e-6)
    y3, _ = train.apply(x, (), (), jax.random.fold_in(key, 1))
    assert not np.array_equal(y1, y3)
    y_eval, _ = tl.Dropout(0.5, mode="eval").apply(x, (), (), key)
    np.testing.assert_array_equal(y_eval, x)


class _Scaled(tl.Layer):
    """A layer with weights and no pack_for_decoding of its own: x -> x * w."""

    def init_weights_and_state(self, input_signature, rng):
        return {"w": jax.random.normal(rng, input_signature.shape[-1:])}, ()

    def apply(self, x, weights, state, rng):
        return x * weights["w"], state


def test_pack_for_decoding_packs_exactly_the_packable_leaves(np_rng):
    """Combinators recurse (a tuple per sublayer, one sublayer's weights for Chunk and Scan);
    Dense kernels become PackedKernels; every other leaf's weights pass through as they are."""
    d = 6
    model = tl.Serial(
        tl.Dense(d), tl.Relu(),
        tl.Branch(tl.Dense(d), tl.LayerNorm(), _Scaled()),
        tl.Parallel(tl.Chunk(tl.Dense(d), 2), tl.Residual(tl.Dense(d)), tl.Select([0])),
        tl.Concatenate(3), _Scaled(),
    )
    x = jnp.asarray(np_rng.normal(size=(2, 5, d)), jnp.float32)
    weights, state = model.init(ShapeDtype(x.shape))
    packed = model.pack_for_decoding(weights, "float32")
    # the same tree, a PackedKernel where a Dense kernel was
    assert jax.tree.structure(packed, is_leaf=_is_packed) == jax.tree.structure(weights)
    dense_kernels = [packed[0]["w"], packed[2][0]["w"], packed[3][0]["w"],
                     packed[3][1][0][1][0]["w"]]
    assert all(isinstance(k, PackedKernel) for k in dense_kernels)
    assert len([a for a in jax.tree.leaves(packed, is_leaf=_is_packed) if _is_packed(a)]) == 4
    assert packed[2][1] is weights[2][1] and packed[2][2] is weights[2][2]  # not packable
    assert packed[5] is weights[5] and packed[0]["b"] is weights[0]["b"]
    assert packed[1] == () and packed[3][2] == ()
    np.testing.assert_allclose(model.apply(x, packed, state, None)[0],
                               model.apply(x, weights, state, None)[0], atol=1e-5)
    for dtype in ("bf16", "int8"):
        kernels = jax.tree.leaves(model.pack_for_decoding(weights, dtype), is_leaf=_is_packed)
        assert {k.rows.dtype.name for k in kernels if _is_packed(k)} == {
            "bfloat16" if dtype == "bf16" else "int8"}


def _is_packed(a):
    return isinstance(a, PackedKernel)


def test_pack_for_decoding_default_of_a_custom_layer(np_rng):
    """A Layer subclass with no override keeps its weights; one with sublayers whose weights
    are not a tuple per sublayer is told to override."""
    layer = _Scaled()
    weights, _ = layer.init(ShapeDtype((2, 4)))
    assert layer.pack_for_decoding(weights, "int8") is weights

    class Wrapper(tl.Layer):  # one sublayer's weights as its own, no override
        def __init__(self, inner):
            super().__init__(sublayers=[inner])

    with pytest.raises(TypeError, match="Wrapper.pack_for_decoding: expected weights as a "
                                        "tuple of 1 entries"):
        Wrapper(tl.Dense(3)).pack_for_decoding({"w": jnp.ones((4, 3))}, "float32")


def test_pack_for_decoding_keeps_a_cached_encoders_weights(np_rng):
    """A Cache runs its layer once per sequence: its weights stay as they are, beside packed
    ones."""
    from terraformer.layers.encdec import Cache

    model = tl.Serial(Cache(tl.Serial(tl.Dense(4), tl.Relu()), mode="predict"), tl.Dense(3))
    weights, _ = model.init(ShapeDtype((2, 5, 4)))
    packed = model.pack_for_decoding(weights, "int8")
    assert packed[0] is weights[0]
    assert isinstance(packed[1]["w"], PackedKernel) and packed[1]["w"].rows.dtype == jnp.int8
