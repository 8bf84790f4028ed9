"""Synthesizer attention (dense and random) against a plain softmax(B) V reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from terraformer.layers.efficient.synthesizer import SynthesizerAttention
from terraformer.shapes import ShapeDtype


def _reference(x, w, s, n_heads, synthesizer_type, causal, mask):
    """softmax over the allowed keys of the synthesised scores, times V: numpy float64."""
    x = np.asarray(x, np.float64)
    b, length, _ = x.shape
    v = x @ np.asarray(w["wv"], np.float64)
    d_v = v.shape[-1] // n_heads
    if synthesizer_type == "dense":
        hidden = np.maximum(x @ np.asarray(w["w1"], np.float64) + np.asarray(w["b1"]), 0.0)
        hidden = hidden.reshape(b, length, n_heads, -1)
        w2, b2 = np.asarray(w["w2"], np.float64), np.asarray(w["b2"], np.float64)
        scores = [hidden[:, :, h] @ w2[h, :, :length] + b2[h, :length] for h in range(n_heads)]
    else:
        r = np.asarray((s if "r" in s else w)["r"], np.float64)
        scores = [np.broadcast_to(r[h, :length, :length], (b, length, length))
                  for h in range(n_heads)]
    allowed = np.tril(np.ones((length, length), bool)) if causal else np.ones((length, length),
                                                                             bool)
    allowed = allowed[None] & np.asarray(mask, bool)[:, None, :]
    out = np.zeros(v.shape)
    for h in range(n_heads):
        sc = np.where(allowed, scores[h], -np.inf)
        p = np.exp(sc - sc.max(-1, keepdims=True))
        out[..., h * d_v:(h + 1) * d_v] = (p / p.sum(-1, keepdims=True)) @ v[
            ..., h * d_v:(h + 1) * d_v]
    return out @ np.asarray(w["wo"], np.float64)


@pytest.mark.parametrize("synthesizer_type,fixed_random", [
    ("dense", False), pytest.param("random", True, marks=pytest.mark.slow)])
def test_causal_equals_reference_never_looks_ahead_and_decodes(np_rng, synthesizer_type,
                                                               fixed_random):
    length, prefill, max_len = 11, 6, 13
    x = np_rng.normal(size=(2, length, 8)).astype(np.float32)
    mask = np.ones((2, length), bool)
    mask[1, int(np_rng.integers(3, length)):] = False
    kw = dict(n_heads=2, d_qk=4, d_v=4, causal=True, masked=True, max_len=max_len,
              synthesizer_type=synthesizer_type, fixed_random=fixed_random)
    layer = SynthesizerAttention(mode="eval", **kw)
    rng = jax.random.PRNGKey(int(np_rng.integers(1 << 30)))
    w, s = layer.init((ShapeDtype(x.shape), ShapeDtype(mask.shape, jnp.bool_)), rng)
    assert ("r" in s) == fixed_random
    forward = jax.jit(lambda x: layer.apply((x, mask), w, s, None)[0][0])
    y = forward(x)
    np.testing.assert_allclose(y, _reference(x, w, s, 2, synthesizer_type, True, mask),
                               atol=2e-5, rtol=1e-5)
    # Perturbing positions after t leaves the outputs up to t unchanged.
    t = int(np_rng.integers(0, length - 1))
    x2 = x.copy()
    x2[:, t + 1:] += np_rng.normal(size=x2[:, t + 1:].shape).astype(np.float32)
    y2 = forward(x2)
    np.testing.assert_array_equal(y[:, :t + 1], y2[:, :t + 1])
    assert not np.allclose(y[0, t + 1:], y2[0, t + 1:])
    # Predict: values cached in kv_cache's ring; one token per call, and a prompt of 6 then
    # one at a time, reproduce the eval forward, padding included.
    pr = SynthesizerAttention(mode="predict", **kw)
    assert pr.predict_context() == max_len
    step = jax.jit(pr.apply)
    one = (ShapeDtype((2, 1, 8)), ShapeDtype((2, 1), jnp.bool_))
    for first in (1, prefill):
        _, state = pr.init(one, rng)
        ys, t = [], 0
        while t < length:
            n = first if t == 0 else 1
            (out, _), state = step((x[:, t:t + n], mask[:, t:t + n]), w, state, None)
            ys.append(out)
            t += n
        np.testing.assert_allclose(jnp.concatenate(ys, 1), y, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_dense_synthesizer_under_jit_grad_vmap(np_rng):
    x = np_rng.normal(size=(2, 11, 8)).astype(np.float32)
    mask = np.ones((2, 11), bool)
    mask[1, int(np_rng.integers(3, 11)):] = False
    layer = SynthesizerAttention(n_heads=2, d_qk=4, d_v=4, causal=True, masked=True,
                                 max_len=13, mode="eval")
    w, s = layer.init((ShapeDtype(x.shape), ShapeDtype(mask.shape, jnp.bool_)),
                      jax.random.PRNGKey(int(np_rng.integers(1 << 30))))
    forward = jax.jit(lambda x: layer.apply((x, mask), w, s, None)[0][0])
    y = forward(x)
    # jit(grad(vmap)): the gradient of <y, r> along a random direction equals the central
    # finite difference of the forward pass.
    r = np_rng.normal(size=y.shape).astype(np.float32)

    def loss(x):
        per_example = jax.vmap(lambda xi, mi: layer.apply((xi[None], mi[None]), w, s, None)[0][0])
        return jnp.sum(per_example(x, mask)[:, 0] * r)

    g = jax.jit(jax.grad(loss))(x)
    d = np_rng.normal(size=x.shape).astype(np.float32)
    # The finite difference in float64 (numpy, on the float32 forward's inputs) with a step
    # small enough for the softmax's curvature: float32 rounding alone is ~1e-4 of it.
    eps = 1e-3
    fd = np.sum((np.asarray(forward(x + eps * d), np.float64)
                 - np.asarray(forward(x - eps * d), np.float64)) * r) / (2 * eps)
    np.testing.assert_allclose(np.sum(g * d), fd, rtol=2e-2, atol=2e-3)



@pytest.mark.slow
def test_learned_random_scores_non_causal_equal_reference_and_train(np_rng):
    x = np_rng.normal(size=(2, 7, 8)).astype(np.float32)
    mask = np.ones((2, 7), bool)
    mask[0, int(np_rng.integers(2, 7)):] = False
    layer = SynthesizerAttention(n_heads=2, d_qk=4, d_v=4, masked=True, max_len=9,
                                 synthesizer_type="random", mode="eval")
    w, s = layer.init((ShapeDtype(x.shape), ShapeDtype(mask.shape, jnp.bool_)),
                      jax.random.PRNGKey(int(np_rng.integers(1 << 30))))
    assert w["r"].shape == (2, 9, 9) and s == ()

    def loss(w):
        return jnp.sum(layer.apply((x, mask), w, s, None)[0][0] ** 2)

    value, g = jax.jit(jax.value_and_grad(loss))(w)
    y = _reference(x, w, s, 2, "random", False, mask)
    np.testing.assert_allclose(value, np.sum(y ** 2), rtol=1e-5)
    # The learned scores get a gradient where they are used (the leading 7 x 7 block) only.
    assert np.abs(g["r"][:, :7, :7]).sum() > 0 and np.abs(g["r"][:, 7:]).sum() == 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(synthesizer_type="factorized"), "synthesizer_type"),
    (dict(max_len=0), "max_len"),
    (dict(fixed_random=True), "fixed_random"),
    (dict(mode="predict"), "causal=True"),
    (dict(output_dropout=-0.1), "output_dropout"),
])
def test_bad_knobs_are_one_line_errors(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        SynthesizerAttention(**kwargs)
    assert "\n" not in str(info.value)


def test_length_beyond_max_len_is_refused():
    layer = SynthesizerAttention(n_heads=1, d_qk=4, d_v=4, max_len=4, mode="eval")
    w, s = jax.eval_shape(lambda key: layer.init_weights_and_state(ShapeDtype((1, 4, 8)), key),
                          jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="max_len=4"):
        layer.apply(jnp.zeros((1, 5, 8)), w, s, None)
