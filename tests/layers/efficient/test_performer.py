"""Performer (FAVOR+) attention against its own quadratic form and against softmax attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from terraformer.layers.attention_core import dot_product_attention
from terraformer.layers.efficient.linear import linear_attention
from terraformer.layers.efficient.performer import (
    PerformerAttention,
    favor_features,
    orthonormal_rows,
    random_features,
)
from terraformer.models import ReformerLM
from terraformer.models.stack import build_attention
from terraformer.shapes import ShapeDtype


def _phi(x, projection):
    """FAVOR+ features in float64, without the stabilising shifts (they must cancel)."""
    x = x / x.shape[-1] ** 0.25
    return np.exp(x @ projection.T - 0.5 * np.sum(x * x, -1, keepdims=True)) / np.sqrt(
        projection.shape[0])


def _quadratic_reference(x, w, projection, n_heads, causal, mask=None):
    """`A V / A 1` with `A = phi(Q) phi(K)ᵀ` masked (causal, padding): numpy float64."""
    x = np.asarray(x, np.float64)
    projection = np.asarray(projection, np.float64)
    q, k, v = (x @ np.asarray(w[n], np.float64) for n in ("wq", "wk", "wv"))
    b, length, _ = x.shape
    d, d_v = q.shape[-1] // n_heads, v.shape[-1] // n_heads
    allowed = np.tril(np.ones((length, length))) if causal else np.ones((length, length))
    allowed = np.broadcast_to(allowed, (b, length, length))
    if mask is not None:
        allowed = allowed * np.asarray(mask, np.float64)[:, None, :]
    out = np.zeros((b, length, v.shape[-1]))
    for h in range(n_heads):
        sl, sl_v = slice(h * d, (h + 1) * d), slice(h * d_v, (h + 1) * d_v)
        a = _phi(q[..., sl], projection) @ _phi(k[..., sl], projection).transpose(0, 2, 1)
        a = a * allowed
        out[..., sl_v] = a @ v[..., sl_v] / a.sum(-1, keepdims=True)
    return out @ np.asarray(w["wo"], np.float64)


def test_causal_equals_quadratic_form(np_rng):
    # 11 positions in chunks of 4 (the last one padded); one sequence has padded keys.
    length = 11
    x = np_rng.normal(size=(2, length, 8)).astype(np.float32)
    mask = np.ones((2, length), bool)
    mask[1, int(np_rng.integers(3, length)):] = False
    kw = dict(n_heads=2, d_qk=4, d_v=4, causal=True, masked=True, chunk_len=4, n_features=8)
    layer = PerformerAttention(mode="eval", **kw)
    rng = jax.random.PRNGKey(int(np_rng.integers(1 << 30)))
    w, s = layer.init((ShapeDtype(x.shape), ShapeDtype(mask.shape, jnp.bool_)), rng)
    assert s["projection"].shape == (8, 4)
    forward = jax.jit(lambda x, m: layer.apply((x, m), w, s, None)[0][0])
    y = forward(x, mask)
    np.testing.assert_allclose(y, _quadratic_reference(x, w, s["projection"], 2, True, mask),
                               atol=2e-5, rtol=1e-4)
    # A predict layer initialised with the same rng holds the same fixed projection.
    pr = PerformerAttention(mode="predict", **kw)
    _, state = pr.init((ShapeDtype((2, 1, 8)), ShapeDtype((2, 1), jnp.bool_)), rng)
    np.testing.assert_array_equal(state["projection"], s["projection"])


@pytest.mark.slow
def test_causal_never_looks_ahead_and_decodes(np_rng):
    # 11 positions in chunks of 4 (the last one padded); one sequence has padded keys.
    length, prefill = 11, 6
    x = np_rng.normal(size=(2, length, 8)).astype(np.float32)
    mask = np.ones((2, length), bool)
    mask[1, int(np_rng.integers(3, length)):] = False
    kw = dict(n_heads=2, d_qk=4, d_v=4, causal=True, masked=True, chunk_len=4, n_features=8)
    layer = PerformerAttention(mode="eval", **kw)
    rng = jax.random.PRNGKey(int(np_rng.integers(1 << 30)))
    w, s = layer.init((ShapeDtype(x.shape), ShapeDtype(mask.shape, jnp.bool_)), rng)
    forward = jax.jit(lambda x, m: layer.apply((x, m), w, s, None)[0][0])
    y = forward(x, mask)
    # Perturbing positions after t leaves the outputs up to t unchanged.
    t = int(np_rng.integers(0, length - 1))
    x2 = x.copy()
    x2[:, t + 1:] += np_rng.normal(size=x2[:, t + 1:].shape).astype(np.float32)
    y2 = forward(x2, mask)
    np.testing.assert_array_equal(y[:, :t + 1], y2[:, :t + 1])
    assert not np.allclose(y[0, t + 1:], y2[0, t + 1:])
    # Predict (same init rng, so the same projection): one token per call, and a prompt of 6
    # then one at a time, reproduce the eval forward, padding included.
    pr = PerformerAttention(mode="predict", **kw)
    step = jax.jit(pr.apply)
    one = (ShapeDtype((2, 1, 8)), ShapeDtype((2, 1), jnp.bool_))
    for first in (1, prefill):
        _, state = pr.init(one, rng)
        assert state["s"].shape == (2, 2, 8, 4) and state["z"].shape == (2, 2, 8)
        ys, t = [], 0
        while t < length:
            n = first if t == 0 else 1
            (out, _), state = step((x[:, t:t + n], mask[:, t:t + n]), w, state, None)
            ys.append(out)
            t += n
        np.testing.assert_allclose(jnp.concatenate(ys, 1), y, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_train_mode_redraws_features_from_the_rng(np_rng):
    x = np_rng.normal(size=(2, 7, 8)).astype(np.float32)
    kw = dict(n_heads=2, d_qk=4, d_v=4, n_features=8)
    train = PerformerAttention(mode="train", **kw)
    w, s = train.init(ShapeDtype(x.shape), jax.random.PRNGKey(int(np_rng.integers(1 << 30))))
    apply = jax.jit(train.apply)
    y1, y2 = (apply(x, w, s, jax.random.PRNGKey(i))[0] for i in (0, 1))
    assert not np.allclose(y1, y2)
    np.testing.assert_array_equal(y1, apply(x, w, s, jax.random.PRNGKey(0))[0])
    # Eval: the state's projection, whatever the rng; non-causal, its quadratic form.
    y_eval, _ = jax.jit(PerformerAttention(mode="eval", **kw).apply)(x, w, s, None)
    np.testing.assert_allclose(y_eval, _quadratic_reference(x, w, s["projection"], 2, False),
                               atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="rng"):
        train.apply(x, w, s, None)


def test_estimate_approaches_softmax_attention_as_features_grow(np_rng):
    # Queries and keys of moderate norm: the estimator's relative variance grows like
    # exp(|q + k|² / sqrt(d)) / m.
    q, k = (0.5 * np_rng.normal(size=(4, 32, 16)).astype(np.float32) for _ in range(2))
    v = np_rng.normal(size=(4, 32, 8)).astype(np.float32)
    key = jax.random.PRNGKey(int(np_rng.integers(1 << 30)))

    @jax.jit
    def errors(q, k, v, key):
        exact = dot_product_attention(q, k, v)
        projection = random_features(key, 4096, 16)

        def error(m):  # the first m rows are themselves an m-feature projection
            est = linear_attention(favor_features(q, projection[:m], True)[None],
                                   favor_features(k, projection[:m], False)[None], v[None],
                                   eps=0.0)
            return jnp.mean(jnp.abs(est[0] - exact))

        return error(64), error(4096), projection[16:32]

    few, many, block = errors(q, k, v, key)
    assert many < few / 3, (few, many)  # 1/sqrt(m) predicts a factor 8
    assert many < 0.02, many
    # Rows come in blocks of d = 16 orthogonal directions.
    gram = np.asarray(block) @ np.asarray(block).T
    np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0.0, atol=1e-3)


@pytest.mark.slow
def test_train_mode_under_jit_grad_vmap(np_rng):
    # jit(grad(vmap)) in train mode, features redrawn from the rng: the gradient of <y, r>
    # along a random direction equals the finite difference of the same (fixed-rng) forward.
    x = np_rng.normal(size=(2, 11, 8)).astype(np.float32)
    mask = np.ones((2, 11), bool)
    mask[1, int(np_rng.integers(3, 11)):] = False
    kw = dict(n_heads=2, d_qk=4, d_v=4, causal=True, masked=True, chunk_len=4, n_features=8)
    train = PerformerAttention(mode="train", **kw)
    w, s = train.init((ShapeDtype(x.shape), ShapeDtype(mask.shape, jnp.bool_)),
                      jax.random.PRNGKey(int(np_rng.integers(1 << 30))))
    key = jax.random.PRNGKey(int(np_rng.integers(1 << 30)))
    r = np_rng.normal(size=x.shape).astype(np.float32)

    def loss(x):
        per_example = jax.vmap(
            lambda xi, mi: train.apply((xi[None], mi[None]), w, s, key)[0][0])
        return jnp.sum(per_example(x, mask)[:, 0] * r)

    value_and_grad = jax.jit(jax.value_and_grad(loss))
    _, g = value_and_grad(x)
    d = np_rng.normal(size=x.shape).astype(np.float32)
    eps = 1e-2
    fd = (value_and_grad(x + eps * d)[0] - value_and_grad(x - eps * d)[0]) / (2 * eps)
    np.testing.assert_allclose(np.sum(g * d), fd, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_features=0), "n_features"),
    (dict(chunk_len=0), "chunk_len"),
    (dict(mode="predict"), "causal=True"),
])
def test_bad_knobs_are_one_line_errors(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        PerformerAttention(**kwargs)
    assert "\n" not in str(info.value)



def test_performer_by_name_builds_with_the_reformer_convention():
    layer = build_attention("performer", d_model=8, n_heads=2, d_qk=4, d_v=4, causal=True,
                            dropout=0.0, max_len=16, mode="predict")
    assert isinstance(layer, PerformerAttention) and layer.n_features() == 256


@pytest.mark.slow
def test_reformer_lm_with_performer_by_name_decodes_like_eval(np_rng):
    """`attention_type='performer'` in ReformerLM: the model builds, runs, and its predict mode
    (a prompt of 5 in one call, then a token at a time) reproduces the eval forward pass."""
    vocab, length, prompt = 23, 9, 5
    small = dict(d_model=16, d_ff=32, n_layers=2, n_heads=2, d_attention_key=4,
                 d_attention_value=4, dropout=0.0, max_len=16, attention_type="performer")
    x = jnp.asarray(np_rng.integers(1, vocab, size=(2, length)), jnp.int32)
    key = jax.random.PRNGKey(int(np_rng.integers(1 << 30)))
    model = ReformerLM(vocab, mode="eval", **small)
    weights, state = model.init(ShapeDtype(x.shape, jnp.int32), key)
    want, _ = jax.jit(model.apply)(x, weights, state, None)
    assert want.shape == (2, length, vocab) and np.all(np.isfinite(want))
    decoder = ReformerLM(vocab, mode="predict", **small)
    _, pstate = decoder.init(ShapeDtype((2, 1), jnp.int32), key)
    step = jax.jit(decoder.apply)
    inputs = jnp.concatenate([jnp.zeros((2, 1), jnp.int32), x[:, :-1]], axis=1)
    outs = []
    y, pstate = step(inputs[:, :prompt], weights, pstate, None)
    outs.append(y)
    for t in range(prompt, length):
        y, pstate = step(inputs[:, t:t + 1], weights, pstate, None)
        outs.append(y)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), want, atol=1e-4)


def test_orthonormal_rows_is_the_q_of_qr_with_a_positive_diagonal(np_rng):
    """Gram-Schmidt on the rows equals LAPACK's QR of the transpose, signs fixed so that R's
    diagonal is positive (the Haar-distributed factor)."""
    a = np_rng.normal(size=(3, 32, 32)).astype(np.float32)
    q, r = np.linalg.qr(np.swapaxes(a, -1, -2).astype(np.float64))
    want = np.swapaxes(q * np.sign(np.diagonal(r, axis1=-2, axis2=-1))[..., None, :], -1, -2)
    got = np.asarray(jax.jit(orthonormal_rows)(a))
    np.testing.assert_allclose(got, want, atol=2e-4)
    np.testing.assert_allclose(got @ np.swapaxes(got, -1, -2), np.broadcast_to(np.eye(32),
                               got.shape), atol=1e-5)


@pytest.mark.slow
def test_a_deep_train_step_with_redrawn_features_runs(np_rng):
    """The LRA classifier's shape (4 layers, d_model 256), each layer redrawing its features
    in one jitted training step: with `jnp.linalg.qr` this program hung XLA:CPU (jax 0.10.2)."""
    import optax

    from terraformer.models.classifier import Classifier
    from terraformer.training.step import make_train_step

    model = Classifier(256, attention_type="performer", max_len=256, dropout=0.1)
    tokens = jnp.asarray(np_rng.integers(1, 256, size=(2, 256)), jnp.int32)
    w, s = model.init(ShapeDtype(tokens.shape, jnp.int32), jax.random.PRNGKey(0))
    step = make_train_step(model, optax.adam(1e-3), donate=False)
    data = (tokens, jnp.asarray(np_rng.integers(0, 10, size=(2,)), jnp.int32), jnp.ones((2,)))
    *_, metrics = step(w, s, step.init_opt_state(w), data, jax.random.PRNGKey(1))
    assert np.isfinite(float(metrics["loss"]))
