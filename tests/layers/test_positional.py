"""AxialPositionalEncoding: the axial table, errors, predict mode, dropout, gradients."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from terraformer import layers as tl
from terraformer.layers.positional import AxialPositionalEncoding


def _full_table(weights, shape):
    """Reference: broadcast every axis table to `shape`, concatenate, flatten row-major."""
    parts = [np.broadcast_to(np.asarray(w), (*shape, w.shape[-1])) for w in weights]
    return np.concatenate(parts, axis=-1).reshape(math.prod(shape), -1)


@pytest.mark.parametrize("shape,d_embs", [((4, 8), (6, 10)), ((3, 2, 5), (4, 4, 8)), ((16,), (8,))])
def test_adds_the_axial_table(shape, d_embs, seed):
    rng = np.random.default_rng(seed)
    d_model = sum(d_embs)
    length = int(rng.integers(1, math.prod(shape) + 1))
    x = jnp.asarray(rng.normal(size=(2, length, d_model)), jnp.float32)
    layer = AxialPositionalEncoding(shape=shape, d_embs=d_embs, mode="eval")
    weights, state = layer.init(tl.signature(x), jax.random.PRNGKey(seed))
    k = len(shape)
    for a, w in enumerate(weights):
        assert w.shape == (1,) * a + (shape[a],) + (1,) * (k - 1 - a) + (d_embs[a],)
    y, new_state = layer.apply(x, weights, state, None)
    expected = np.asarray(x) + _full_table(weights, shape)[None, :length]
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6, err_msg=f"seed {seed}")
    assert new_state == state
    # Train mode without dropout adds the same.
    train = AxialPositionalEncoding(shape=shape, d_embs=d_embs, mode="train")
    y_train, _ = train.apply(x, weights, (), jax.random.PRNGKey(seed))
    np.testing.assert_array_equal(y_train, y)


def test_initializer_and_default_stddev(seed):
    layer = AxialPositionalEncoding(shape=(32, 32), d_embs=(64, 64), mode="eval")
    weights, _ = layer.init(tl.ShapeDtype((1, 1024, 128)), jax.random.PRNGKey(seed))
    std = float(np.std(np.concatenate([np.ravel(w) for w in weights])))
    assert 0.9 < std < 1.1  # normal(1.0), as in Trax
    zeros = AxialPositionalEncoding(
        shape=(4, 4), d_embs=(2, 2), kernel_initializer=tl.initializers.zeros, mode="eval"
    )
    w0, _ = zeros.init(tl.ShapeDtype((1, 16, 4)))
    assert all(not np.any(w) for w in w0)


def test_errors_name_what_is_wrong():
    layer = AxialPositionalEncoding(shape=(4, 8), d_embs=(6, 10))
    with pytest.raises(ValueError, match=r"sum\(d_embs\) = 16.*d_model=12"):
        layer.init(tl.ShapeDtype((1, 8, 12)))
    with pytest.raises(ValueError, match="length 33 exceeds the 32 positions"):
        layer.init(tl.ShapeDtype((1, 33, 16)))
    weights, state = layer.init(tl.ShapeDtype((1, 8, 16)))
    with pytest.raises(ValueError, match="length 40 exceeds the 32 positions"):
        layer.apply(jnp.zeros((1, 40, 16)), weights, state, None)
    with pytest.raises(ValueError, match="last axis 16"):
        layer.apply(jnp.zeros((1, 8, 12)), weights, state, None)
    with pytest.raises(ValueError, match="one width per axis"):
        AxialPositionalEncoding(shape=(4, 8), d_embs=(16,))
    with pytest.raises(ValueError, match="dropout"):
        AxialPositionalEncoding(dropout=1.0)
    with pytest.raises(ValueError, match="dropout_broadcast_dims"):
        AxialPositionalEncoding(shape=(4, 8), d_embs=(6, 10), dropout_broadcast_dims=(4,))
    with pytest.raises(ValueError, match="mode"):
        AxialPositionalEncoding(mode="serve")


def test_predict_one_token_at_a_time_equals_whole_sequence(seed):
    rng = np.random.default_rng(seed)
    shape, d_embs, length = (4, 6), (4, 12), 17
    x = jnp.asarray(rng.normal(size=(3, length, 16)), jnp.float32)
    full = AxialPositionalEncoding(shape=shape, d_embs=d_embs, mode="eval")
    weights, _ = full.init(tl.signature(x), jax.random.PRNGKey(seed))
    expected, _ = full.apply(x, weights, (), None)

    pred = AxialPositionalEncoding(shape=shape, d_embs=d_embs, mode="predict")
    _, state = pred.init(tl.signature(x[:, :1]))
    assert int(state) == 0
    step = jax.jit(pred.apply)
    outs = []
    for t in range(length):
        y, state = step(x[:, t : t + 1], weights, state, None)
        outs.append(y)
    assert int(state) == length
    np.testing.assert_allclose(jnp.concatenate(outs, 1), expected, atol=1e-6)

    # Pieces of random sizes (prefill, then steps) give the same.
    _, state = pred.init(tl.signature(x[:, :1]))
    cuts = sorted(rng.choice(np.arange(1, length), size=3, replace=False))
    pieces = []
    for a, b in zip([0, *cuts], [*cuts, length], strict=True):
        y, state = pred.apply(x[:, a:b], weights, state, None)
        pieces.append(y)
    np.testing.assert_allclose(jnp.concatenate(pieces, 1), expected, atol=1e-6)
    # Running past the last position is an error when the state is concrete.
    with pytest.raises(ValueError, match="exceed the 24 positions"):
        pred.apply(x[:, :8], weights, state, None)


def test_dropout_mask_is_shared_along_broadcast_dims(seed):
    shape, d_embs, rate = (4, 8), (6, 10), 0.5
    x = jnp.zeros((3, 32, 16))
    layer = AxialPositionalEncoding(shape=shape, d_embs=d_embs, dropout=rate, mode="train")
    weights, _ = layer.init(tl.signature(x), jax.random.PRNGKey(seed))
    key = jax.random.PRNGKey(seed + 1)
    y, _ = layer.apply(x, weights, (), key)
    y_again, _ = layer.apply(x, weights, (), key)
    np.testing.assert_array_equal(y, y_again)
    with pytest.raises(ValueError, match="rng"):
        layer.apply(x, weights, (), None)

    emb = _full_table(weights, shape)
    ratio = np.asarray(y) / emb[None]
    kept = np.isclose(ratio, 1.0 / (1.0 - rate), rtol=1e-5)
    assert np.all(kept | np.isclose(ratio, 0.0)), f"seed {seed}"
    # Default dims (-2,): positions with the same first-axis index share the mask.
    kept = kept.reshape(3, *shape, 16)
    assert np.all(kept == kept[:, :, :1, :]), f"seed {seed}"
    assert 0.3 < kept.mean() < 0.7
    # Batch elements get their own masks (batch is not a broadcast dim).
    assert not np.all(kept[0] == kept[1])

    # Broadcasting over the batch and the model dimension instead.
    per_position = AxialPositionalEncoding(
        shape=shape, d_embs=d_embs, dropout=rate, dropout_broadcast_dims=(0, -1), mode="train"
    )
    y, _ = per_position.apply(x, weights, (), key)
    kept = np.asarray(y) != 0
    assert np.all(kept == kept[:1, :, :1]), f"seed {seed}"

    # Dropout is train-only.
    ev = AxialPositionalEncoding(shape=shape, d_embs=d_embs, dropout=rate, mode="eval")
    y_eval, _ = ev.apply(x, weights, (), key)
    np.testing.assert_allclose(y_eval, emb[None].repeat(3, 0), atol=1e-6)


def test_gradients_equal_the_full_table_reference(seed):
    rng = np.random.default_rng(seed)
    shape, d_embs, length = (4, 8), (6, 10), 27
    x = jnp.asarray(rng.normal(size=(2, length, 16)), jnp.float32)
    cotangent = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    layer = AxialPositionalEncoding(shape=shape, d_embs=d_embs, mode="eval")
    weights, _ = layer.init(tl.signature(x), jax.random.PRNGKey(seed))

    def loss(w):
        return jnp.sum(layer.apply(x, w, (), None)[0] * cotangent)

    def reference(w):
        parts = [jnp.broadcast_to(t, (*shape, t.shape[-1])) for t in w]
        table = jnp.concatenate(parts, -1).reshape(-1, 16)
        return jnp.sum((x + table[None, :length]) * cotangent)

    got = jax.jit(jax.grad(loss))(weights)
    want = jax.grad(reference)(weights)
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5, err_msg=f"seed {seed}")
