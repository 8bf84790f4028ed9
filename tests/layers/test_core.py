"""Core layers against plain numpy references, and their input errors."""

import jax.numpy as jnp
import numpy as np
import pytest

from terraformer import layers as tl
from terraformer.layers.core import dequantize_int8, fold_last_axis, pack_kernel, quantize_int8
from terraformer.shapes import ShapeDtype


def test_dense_and_layer_norm_match_numpy(np_rng):
    x = np_rng.normal(size=(2, 5, 7)).astype(np.float32)
    dense = tl.Dense(3)
    w, s = dense.init(ShapeDtype(x.shape))
    assert w["w"].shape == (7, 3) and w["b"].shape == (3,)
    y, _ = dense.apply(jnp.asarray(x), w, s, None)
    np.testing.assert_allclose(y, x @ np.asarray(w["w"]) + np.asarray(w["b"]), rtol=1e-5,
                               atol=1e-5)
    norm = tl.LayerNorm()
    w, s = norm.init(ShapeDtype(x.shape))
    y, _ = norm.apply(jnp.asarray(x), w, s, None)
    ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)


def test_dense_wrong_feature_dim_names_the_problem(np_rng):
    dense = tl.Dense(3)
    w, s = dense.init(ShapeDtype((2, 7)))
    with pytest.raises(ValueError, match="last axis 7"):
        dense.apply(jnp.ones((2, 6)), w, s, None)


def test_embedding_lookup_and_out_of_range_ids(np_rng):
    emb = tl.Embedding(10, 4)
    w, s = emb.init(ShapeDtype((2, 3), jnp.int32))
    ids = np_rng.integers(0, 10, size=(2, 3))
    y, _ = emb.apply(jnp.asarray(ids, jnp.int32), w, s, None)
    np.testing.assert_array_equal(y, np.asarray(w)[ids])
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        emb.apply(jnp.asarray([[1, 10, 2]], jnp.int32), w, s, None)
    with pytest.raises(TypeError, match="integer"):
        emb.apply(jnp.ones((1, 3)), w, s, None)


def test_shift_right_and_positional_encoding_predict(np_rng):
    x = jnp.asarray(np_rng.integers(1, 9, size=(2, 6)), jnp.int32)
    y, _ = tl.ShiftRight(mode="eval").apply(x, (), (), None)
    np.testing.assert_array_equal(y[:, 1:], x[:, :-1])
    np.testing.assert_array_equal(y[:, 0], 0)
    h = jnp.asarray(np_rng.normal(size=(2, 6, 8)), jnp.float32)
    full, _ = tl.SinusoidalPositionalEncoding(max_len=16, mode="eval").apply(h, (), (), None)
    pe = tl.SinusoidalPositionalEncoding(max_len=16, mode="predict")
    _, state = pe.init(ShapeDtype((2, 1, 8)))
    steps = []
    for t in range(6):
        out, state = pe.apply(h[:, t : t + 1], (), state, None)
        steps.append(out)
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=1e-6)
    with pytest.raises(ValueError, match="max_len=4"):
        tl.SinusoidalPositionalEncoding(max_len=4, mode="eval").apply(h, (), (), None)


def test_log_softmax_and_bad_mode():
    y, _ = tl.LogSoftmax().apply(jnp.array([[1.0, 2.0, 3.0]]), (), (), None)
    np.testing.assert_allclose(jnp.exp(y).sum(-1), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="mode must be one of"):
        tl.Dropout(0.1, mode="training")


@pytest.mark.parametrize("d_out", [7, 12])  # 7: one product; 12: converted in row blocks
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("int8", None), ("bf16", 2e-2)])
def test_packed_kernel_matmul_matches_dense(np_rng, dtype, tol, d_out):
    from terraformer.layers.core import Dense, matmul, pack_kernel

    w = jnp.asarray(np_rng.normal(size=(12, d_out)), jnp.float32)
    x = jnp.asarray(np_rng.normal(size=(2, 3, 12)), jnp.float32)
    packed = pack_kernel(w, dtype)
    assert packed.shape == (12, d_out) and packed.rows.shape == (d_out, 12)
    want = np.asarray(x) @ np.asarray(w)
    for xs in (x, x[:1, :1]):  # several rows and the single decoding row
        got = np.asarray(matmul(xs, packed))
        ref = want[: xs.shape[0], : xs.shape[1]]
        if tol is None:  # int8: each entry within half its output unit's step
            step = np.abs(np.asarray(w)).max(0) / 127
            bound = 0.5 * np.abs(np.asarray(xs)).sum(-1, keepdims=True) * step + 1e-5
            assert (np.abs(got - ref) <= bound).all()
        else:
            np.testing.assert_allclose(got, ref, atol=tol * np.abs(ref).max(), rtol=0)
    layer = Dense(d_out)
    weights, _ = layer.init(ShapeDtype(x.shape))
    y, _ = layer.apply(x, layer.pack_for_decoding(weights, "float32"), (), None)
    np.testing.assert_allclose(y, layer.apply(x, weights, (), None)[0], atol=1e-5)


@pytest.mark.parametrize("length", [256, 96, 20])
def test_fold_last_axis_equals_plain_reductions(length):
    x = jnp.asarray(np.random.default_rng().normal(size=(3, 5, length)), jnp.float32)
    np.testing.assert_array_equal(fold_last_axis(x, jnp.maximum, jnp.max), jnp.max(x, -1))
    np.testing.assert_allclose(fold_last_axis(x, jnp.add, jnp.sum), jnp.sum(x, -1),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,axis", [((37, 19), -1), ((3, 16, 8), -2), ((64,), -1),
                                        ((5, 1), 0)])
def test_int8_round_trip_within_half_a_step(np_rng, shape, axis):
    """The one int8 format: |x - dequantize(quantize(x))| <= scale / 2, scale = max|x| / 127
    over each slice along `axis`, and a slice of zeros stored exactly."""
    x = np_rng.normal(size=shape).astype(np.float32) * np_rng.uniform(0.01, 10)
    if x.ndim > 1:
        np.moveaxis(x, axis, -1)[(0,) * (x.ndim - 1)] = 0.0  # one slice of zeros
    q, scale = quantize_int8(x, axis)
    assert q.dtype == jnp.int8 and q.shape == shape and scale.dtype == jnp.float32
    assert scale.shape == tuple(n for a, n in enumerate(shape) if a != axis % x.ndim)
    back = np.asarray(dequantize_int8(q, scale, axis))
    step = np.expand_dims(np.asarray(scale), axis)
    assert np.all(np.abs(back - x) <= step / 2 * (1 + 1e-6))
    amax = np.max(np.abs(x), axis=axis)
    np.testing.assert_allclose(np.where(amax > 0, 127 * np.asarray(scale), 0), amax, rtol=1e-6)
    np.testing.assert_array_equal(back[x == 0], 0.0)
    assert np.abs(np.asarray(q)).max() <= 127


@pytest.mark.parametrize("dtype", ["int8", "bf16"])
def test_pack_kernel_stores_the_one_format(np_rng, dtype):
    """A PackedKernel's int8 rows and scales are `quantize_int8` of the rows (one scale per
    output unit); bf16 rows are within 2**-8 relative; `dense()` gives the kernel back."""
    w = (np_rng.normal(size=(3, 24, 10)) * np.exp(np_rng.uniform(-5, 5, size=(3, 1, 10))))
    w = w.astype(np.float32)
    packed = pack_kernel(jnp.asarray(w), dtype)
    assert packed.shape == w.shape and packed.rows.shape == (3, 10, 24)
    if dtype == "int8":
        q, scale = quantize_int8(np.swapaxes(w, -1, -2))
        np.testing.assert_array_equal(packed.rows, q)
        np.testing.assert_array_equal(packed.scale, scale)
        bound = np.asarray(scale)[:, None, :] / 2 * (1 + 1e-6)
    else:
        assert packed.rows.dtype == jnp.bfloat16 and packed.scale is None
        bound = 2.0**-8 * np.abs(w)
    assert np.all(np.abs(np.asarray(packed.dense()) - w) <= bound)
    # packing a packed kernel again keeps its values (up to the recomputed scale's rounding)
    np.testing.assert_allclose(pack_kernel(packed, dtype).dense(), packed.dense(), rtol=1e-6)
