"""TransformerLM: shapes, causality, and predict mode against the eval forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from terraformer.layers.losses import accuracy, cross_entropy
from terraformer.models.transformer import TransformerLM
from terraformer.shapes import ShapeDtype

CONFIG = dict(vocab_size=19, d_model=16, d_ff=32, n_layers=2, n_heads=2, max_len=32)


def _tokens(np_rng, length, batch=2):
    return jnp.asarray(np_rng.integers(1, CONFIG["vocab_size"], size=(batch, length)), jnp.int32)


def test_forward_shapes_and_log_probs(np_rng):
    model = TransformerLM(dropout=0.0, mode="eval", **CONFIG)
    x = _tokens(np_rng, 12)
    weights, state = model.init(ShapeDtype(x.shape, jnp.int32))
    y, _ = model.apply(x, weights, state, None)
    assert y.shape == (2, 12, CONFIG["vocab_size"])
    np.testing.assert_allclose(jnp.exp(y).sum(-1), 1.0, rtol=1e-5)


def test_never_looks_ahead(np_rng):
    model = TransformerLM(dropout=0.0, mode="eval", **CONFIG)
    x = np.asarray(_tokens(np_rng, 12))
    weights, state = model.init(ShapeDtype(x.shape, jnp.int32))
    t = int(np_rng.integers(0, 10))
    x2 = x.copy()
    x2[:, t + 1 :] = (x2[:, t + 1 :] % (CONFIG["vocab_size"] - 1)) + 1
    y1, _ = model.apply(jnp.asarray(x), weights, state, None)
    y2, _ = model.apply(jnp.asarray(x2), weights, state, None)
    # Inputs are shifted right: output t depends on tokens < t only.
    np.testing.assert_allclose(y1[:, : t + 2], y2[:, : t + 2], atol=1e-5)


def test_predict_one_token_at_a_time_reproduces_eval(np_rng):
    key = jax.random.PRNGKey(int(np_rng.integers(1 << 30)))
    x = _tokens(np_rng, 14)
    model = TransformerLM(dropout=0.0, mode="eval", **CONFIG)
    weights, state = model.init(ShapeDtype(x.shape, jnp.int32), key)
    want, _ = model.apply(x, weights, state, None)
    decoder = TransformerLM(dropout=0.0, mode="predict", **CONFIG)
    _, pstate = decoder.init(ShapeDtype((2, 1), jnp.int32), key)
    step = jax.jit(decoder.apply)
    inputs = jnp.concatenate([jnp.zeros((2, 1), jnp.int32), x[:, :-1]], axis=1)
    outs = []
    for t in range(x.shape[1]):
        y, pstate = step(inputs[:, t : t + 1], weights, pstate, None)
        outs.append(y)
    got = jnp.concatenate(outs, axis=1)
    assert float(jnp.max(jnp.abs(got - want))) < 1e-5


@pytest.mark.slow  # compiles a training-mode gradient of the whole model
def test_train_mode_dropout_needs_rng_and_gradients_flow(np_rng):
    model = TransformerLM(dropout=0.1, mode="train", **CONFIG)
    x = _tokens(np_rng, 8)
    weights, state = model.init(ShapeDtype(x.shape, jnp.int32))
    with pytest.raises(ValueError, match="rng"):
        model.apply(x, weights, state, None)

    def loss(w):
        y, _ = model.apply(x, w, state, jax.random.PRNGKey(3))
        return cross_entropy(y, x, jnp.ones(x.shape))

    grads = jax.grad(loss)(weights)
    norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(norms)) and sum(n > 0 for n in norms) > len(norms) // 2
    y, _ = model.apply(x, weights, state, jax.random.PRNGKey(3))
    assert 0.0 <= float(accuracy(y, x, jnp.ones(x.shape))) <= 1.0


def test_out_of_range_token_ids_are_rejected(np_rng):
    model = TransformerLM(dropout=0.0, mode="eval", **CONFIG)
    weights, state = model.init(ShapeDtype((1, 4), jnp.int32))
    with pytest.raises(ValueError, match=r"\[0, 19\)"):
        model.apply(jnp.asarray([[1, 2, 19, 3]], jnp.int32), weights, state, None)
