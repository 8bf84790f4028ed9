"""FeedForward: reference math, d_model from the input, dropout.

Chunking it over the length is the models' feed-forward builder: tests/models/test_stack.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from terraformer import layers as tl
from terraformer.layers.feedforward import FeedForward


def _reference(x, weights, activation):
    """LayerNorm -> Dense -> activation -> Dense in numpy (float64)."""
    x = np.asarray(x, np.float64)
    norm, dense_in, _, _, dense_out, _ = weights
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    h = (x - mean) / np.sqrt(var + 1e-6) * np.asarray(norm["scale"]) + np.asarray(norm["bias"])
    h = activation(h @ np.asarray(dense_in["w"], np.float64) + np.asarray(dense_in["b"]))
    return h @ np.asarray(dense_out["w"], np.float64) + np.asarray(dense_out["b"])


def _relu(h):
    return np.maximum(h, 0.0)


def _fast_gelu(h):
    return 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))


@pytest.mark.parametrize(
    "activation,reference", [(tl.Relu, _relu), (tl.FastGelu, _fast_gelu), (None, _fast_gelu)]
)
def test_feed_forward_matches_reference(activation, reference, seed):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(2, 7, 12)), jnp.float32)
    kwargs = {} if activation is None else {"activation": activation}
    ff = FeedForward(24, mode="eval", **kwargs)
    weights, state = ff.init(tl.signature(x), jax.random.PRNGKey(seed))
    shapes = jax.tree.map(lambda a: a.shape, weights)
    assert shapes == (
        {"bias": (12,), "scale": (12,)},
        {"b": (24,), "w": (12, 24)},
        (),
        (),
        {"b": (12,), "w": (24, 12)},
        (),
    )
    y, _ = ff.apply(x, weights, state, None)
    assert y.shape == x.shape
    expected = _reference(x, weights, reference)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5, err_msg=f"seed {seed}")
    # A Layer instance works as the activation too.
    ff_inst = FeedForward(24, activation=tl.Relu(), mode="eval")
    y_inst, _ = ff_inst.apply(x, weights, state, None)
    np.testing.assert_allclose(y_inst, _reference(x, weights, _relu), rtol=1e-4, atol=1e-5)


def test_d_model_is_read_from_the_input_or_checked():
    ff = FeedForward(8, mode="eval")
    for d_model in (4, 10):
        w, _ = ff.init(tl.ShapeDtype((1, 3, d_model)))
        assert w[4]["w"].shape == (8, d_model)
    fixed = FeedForward(8, d_model=10, mode="eval")
    w, _ = fixed.init(tl.ShapeDtype((1, 3, 10)))
    assert w[4]["w"].shape == (8, 10)
    with pytest.raises(ValueError, match="d_model=10"):
        fixed.init(tl.ShapeDtype((1, 3, 4)))
    with pytest.raises(ValueError, match="d_ff"):
        FeedForward(0)
    with pytest.raises(TypeError, match="activation"):
        FeedForward(8, activation="relu")
    with pytest.raises(TypeError, match="activation"):
        FeedForward(8, activation=lambda: jax.nn.relu)
    with pytest.raises(ValueError, match="mode"):
        FeedForward(8, mode="test")


def test_dropout_in_train_mode_only(seed):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(2, 10, 8)), jnp.float32)
    train = FeedForward(16, dropout=0.5, mode="train")
    evaluate = FeedForward(16, dropout=0.5, mode="eval")
    weights, state = train.init(tl.signature(x), jax.random.PRNGKey(seed))
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed + 1))
    y1, _ = train.apply(x, weights, state, k1)
    y1_again, _ = train.apply(x, weights, state, k1)
    y2, _ = train.apply(x, weights, state, k2)
    np.testing.assert_array_equal(y1, y1_again)
    assert not np.allclose(y1, y2)
    # About half of the outputs are dropped by the final dropout.
    assert 0.3 < float(jnp.mean(y1 == 0)) < 0.7
    y_eval, _ = evaluate.apply(x, weights, state, None)
    np.testing.assert_allclose(y_eval, _reference(x, weights, _fast_gelu), rtol=1e-4, atol=1e-5)
    # ff_dropout sets the middle rate alone; shared axes share the final mask over length.
    shared = FeedForward(16, dropout=0.5, ff_dropout=0.0, dropout_shared_axes=[1], mode="train")
    y_shared, _ = shared.apply(x, weights, state, k1)
    dropped = np.asarray(y_shared) == 0
    assert np.all(dropped == dropped[:, :1]), f"seed {seed}"
