"""AxialPositionalEncoding: the axial table, errors, predict mode, dropout, gradients."""

import functools
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


# -- trax's other positional encodings: PositionalEncoding, SinCos, FixedBase -----------------
def _interleaved(n, d):
    """Reference table: sin(p / 10000^(2i/d)) at feature 2i, cos at 2i + 1."""
    p, i = np.arange(n)[:, None], np.arange(d // 2)[None]
    angle = p / 10000.0 ** (2 * i / d)
    return np.stack([np.sin(angle), np.cos(angle)], -1).reshape(n, d)


def _concatenated(positions, d):
    angle = np.asarray(positions)[:, None] / 10000.0 ** (2 * np.arange(d // 2)[None] / d)
    return np.concatenate([np.sin(angle), np.cos(angle)], -1)


def _predict_pieces(layer_predict, x, weights, cuts):
    _, state = layer_predict.init(tl.signature(x[:, :1]))
    out, start = [], 0
    for stop in cuts + [x.shape[1]]:
        y, state = layer_predict.apply(x[:, start:stop], weights, state, None)
        out.append(np.asarray(y))
        start = stop
    return np.concatenate(out, 1), state


def test_trainable_table_starts_interleaved_and_is_trained(seed):
    rng = np.random.default_rng(seed)
    length, d = int(rng.integers(2, 12)), 8
    x = jnp.asarray(rng.normal(size=(2, length, d)), jnp.float32)
    layer = tl.PositionalEncoding(max_len=12, mode="eval")
    table, state = layer.init(tl.signature(x))
    np.testing.assert_allclose(table, _interleaved(12, d), atol=1e-6)
    table = table + jnp.asarray(rng.normal(size=table.shape), jnp.float32)  # a trained table
    y, _ = layer.apply(x, table, state, None)
    np.testing.assert_allclose(y, np.asarray(x) + np.asarray(table)[None, :length], atol=1e-6)
    cut = int(rng.integers(1, length)) if length > 1 else 1
    y_pred, s = _predict_pieces(tl.PositionalEncoding(max_len=12, mode="predict"), x, table,
                                [cut])
    np.testing.assert_allclose(y_pred, y, atol=1e-6)
    assert int(s) == length
    g = jax.grad(lambda t: jnp.sum(layer.apply(x, t, state, None)[0]))(table)
    np.testing.assert_allclose(g[:length], 2.0)  # a weight: batch 2, one per position
    np.testing.assert_array_equal(g[length:], 0.0)
    # Train: a random start in [0, max_offset_to_add), and dropout of whole features.
    train = tl.PositionalEncoding(max_len=12, dropout=0.5, start_from_zero_prob=0.0,
                                  max_offset_to_add=12 - length + 1, mode="train")
    added = np.asarray(train.apply(x, table, (), jax.random.PRNGKey(seed))[0] - x)[0]
    rows = np.asarray(table)
    starts = [s for s in range(12 - length + 1)
              if np.all((np.abs(added - 2 * rows[s:s + length]) < 1e-4) | (np.abs(added) < 1e-6))]
    assert starts, "the train-mode table is no slice of the table (times 0 or 1 / keep)"
    dropped = np.abs(added) < 1e-6
    assert np.all(dropped == dropped[:1])  # one mask for every position


def test_sin_cos_is_concatenated_sinusoids_from_a_random_start(seed):
    rng = np.random.default_rng(seed)
    length, d = int(rng.integers(2, 10)), 6
    x = jnp.asarray(rng.normal(size=(1, length, d)), jnp.float32)
    y, _ = tl.SinCosPositionalEncoding(mode="eval").apply(x, (), (), None)
    np.testing.assert_allclose(y - x, _concatenated(np.arange(length), d)[None], atol=1e-5)
    y_pred, _ = _predict_pieces(tl.SinCosPositionalEncoding(mode="predict"), x, (), [1])
    np.testing.assert_allclose(y_pred, y, atol=1e-5)
    layer = tl.SinCosPositionalEncoding(add_offset=50, start_from_zero_one_in=10**6)
    added = np.asarray(layer.apply(x, (), (), jax.random.PRNGKey(seed))[0] - x)[0]
    gaps = [np.abs(added - _concatenated(s + np.arange(length), d)).max() for s in range(50)]
    assert min(gaps) < 1e-4 and int(np.argmin(gaps)) > 0  # some start; 0 once in a million


def _fixed_base_reference(weights, positions, bases, n_digits):
    digits, start = np.asarray(weights["digits"]), np.asarray(weights["start"])
    out = np.zeros((len(positions), start.shape[0]))
    for b, base in enumerate(bases):
        for i in range(n_digits):
            d_i = (np.asarray(positions) // base**i) % base
            out[:, i * digits.shape[-1]:(i + 1) * digits.shape[-1]] += d_i[:, None] * digits[b, i]
    out[0] += start
    return out


def test_fixed_base_writes_positions_in_digits(seed):
    rng = np.random.default_rng(seed)
    bases, n_digits, d, length = (3, 5), 3, 6, 13
    x = jnp.asarray(rng.normal(size=(2, length, d)), jnp.float32)
    make = functools.partial(tl.FixedBasePositionalEncoding, bases=bases, n_digits=n_digits)
    layer = make(mode="eval")
    w, s = layer.init(tl.signature(x), jax.random.PRNGKey(seed))
    assert w["digits"].shape == (2, 3, 2) and w["start"].shape == (6,)
    assert float(jnp.abs(w["digits"]).max()) <= 1e-4
    w = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32), w)
    y, _ = layer.apply(x, w, s, None)
    ref = _fixed_base_reference(w, np.arange(length), bases, n_digits)
    np.testing.assert_allclose(y - x, np.broadcast_to(ref, y.shape), atol=1e-4)
    y_pred, _ = _predict_pieces(make(mode="predict"), x, w, [1, 5])
    np.testing.assert_allclose(y_pred, y, atol=1e-4)
    # Train, starting at 0 always and dropping every base's digits always: only `start`.
    train = make(start_from_zero_one_in=1, base_dropout_one_in=1, mode="train")
    added = np.asarray(train.apply(x, w, (), jax.random.PRNGKey(seed))[0] - x)
    np.testing.assert_allclose(added[:, 0], np.broadcast_to(w["start"], (2, d)), atol=1e-5)
    np.testing.assert_allclose(added[:, 1:], 0.0, atol=1e-6)
    with pytest.raises(ValueError, match="multiple of n_digits"):
        make(mode="eval").init(tl.signature(x[..., :5]))
