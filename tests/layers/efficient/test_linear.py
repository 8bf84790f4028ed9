"""Linear Transformer attention against its own quadratic form, causal and not."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from terraformer.layers.efficient.linear import LinearAttention
from terraformer.shapes import ShapeDtype


def _elu1(x):
    return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))


def _quadratic_reference(x, w, n_heads, causal, mask=None, eps=1e-6):
    """`A V / (A 1 + eps)` with `A = phi(Q) phi(K)ᵀ` masked (causal, padding): numpy float64."""
    x = np.asarray(x, np.float64)
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
        a = _elu1(q[..., sl]) @ _elu1(k[..., sl]).transpose(0, 2, 1) * allowed
        out[..., sl_v] = a @ v[..., sl_v] / (a.sum(-1, keepdims=True) + eps)
    return out @ np.asarray(w["wo"], np.float64)


def _init(layer, shape, np_rng, masked=False):
    sig = ShapeDtype(shape)
    if masked:
        sig = (sig, ShapeDtype(shape[:2], jnp.bool_))
    return layer.init(sig, jax.random.PRNGKey(int(np_rng.integers(1 << 30))))


def test_causal_equals_quadratic_form_never_looks_ahead_and_decodes(np_rng):
    # 11 positions in chunks of 4: the last chunk is padded; one sequence has padded keys.
    length, prefill = 11, 6
    x = np_rng.normal(size=(2, length, 8)).astype(np.float32)
    mask = np.ones((2, length), bool)
    mask[1, int(np_rng.integers(3, length)):] = False
    kw = dict(n_heads=2, d_qk=4, d_v=4, causal=True, masked=True, chunk_len=4)
    layer = LinearAttention(mode="eval", **kw)
    rng = jax.random.PRNGKey(int(np_rng.integers(1 << 30)))
    w, s = layer.init((ShapeDtype(x.shape), ShapeDtype(mask.shape, jnp.bool_)), rng)
    forward = jax.jit(lambda x, m: layer.apply((x, m), w, s, None)[0][0])
    y = forward(x, mask)
    np.testing.assert_allclose(y, _quadratic_reference(x, w, 2, True, mask), atol=2e-5,
                               rtol=1e-5)
    # Perturbing positions after t leaves the outputs up to t unchanged.
    t = int(np_rng.integers(0, length - 1))
    x2 = x.copy()
    x2[:, t + 1:] += np_rng.normal(size=x2[:, t + 1:].shape).astype(np.float32)
    y2 = forward(x2, mask)
    np.testing.assert_array_equal(y[:, :t + 1], y2[:, :t + 1])
    assert not np.allclose(y[0, t + 1:], y2[0, t + 1:])
    # Predict: one token per call, and a prompt of 6 (more than a chunk, not a multiple of
    # it) then one at a time, reproduce the eval forward, padding included.
    pr = LinearAttention(mode="predict", **kw)
    step = jax.jit(pr.apply)
    one = (ShapeDtype((2, 1, 8)), ShapeDtype((2, 1), jnp.bool_))
    for first in (1, prefill):
        _, state = pr.init(one, rng)
        assert state["s"].shape == (2, 2, 4, 4) and state["z"].shape == (2, 2, 4)
        ys, t = [], 0
        while t < length:
            n = first if t == 0 else 1
            (out, _), state = step((x[:, t:t + n], mask[:, t:t + n]), w, state, None)
            ys.append(out)
            t += n
        np.testing.assert_allclose(jnp.concatenate(ys, 1), y, atol=1e-5, rtol=1e-5)


def test_noncausal_equals_quadratic_form(np_rng):
    x = np_rng.normal(size=(2, 7, 8)).astype(np.float32)
    mask = np.ones((2, 7), bool)
    mask[0, int(np_rng.integers(2, 7)):] = False
    layer = LinearAttention(n_heads=2, d_qk=4, d_v=4, masked=True, mode="eval")
    w, s = _init(layer, x.shape, np_rng, masked=True)
    (y, _), _ = jax.jit(layer.apply)((x, mask), w, s, None)
    np.testing.assert_allclose(y, _quadratic_reference(x, w, 2, False, mask), atol=2e-5,
                               rtol=1e-5)


@pytest.mark.slow
def test_causal_linear_attention_under_jit_grad_vmap(np_rng):
    x = np_rng.normal(size=(2, 11, 8)).astype(np.float32)
    mask = np.ones((2, 11), bool)
    mask[1, int(np_rng.integers(3, 11)):] = False
    layer = LinearAttention(n_heads=2, d_qk=4, d_v=4, causal=True, masked=True, chunk_len=4,
                            mode="eval")
    w, s = _init(layer, x.shape, np_rng, masked=True)
    forward = jax.jit(lambda x, m: layer.apply((x, m), w, s, None)[0][0])
    y = forward(x, mask)
    # jit(grad(vmap)): the gradient of <y, r> along a random direction equals the central
    # finite difference of the forward pass.
    r = np_rng.normal(size=y.shape).astype(np.float32)

    def loss(x):
        per_example = jax.vmap(lambda xi, mi: layer.apply((xi[None], mi[None]), w, s, None)[0][0])
        return jnp.sum(per_example(x, mask)[:, 0] * r)

    g = jax.jit(jax.grad(loss))(x)
    d = np_rng.normal(size=x.shape).astype(np.float32)
    eps = 1e-2
    fd = np.sum((forward(x + eps * d, mask) - forward(x - eps * d, mask)) * r) / (2 * eps)
    np.testing.assert_allclose(np.sum(g * d), fd, rtol=1e-2, atol=1e-3)



@pytest.mark.parametrize("kwargs,match", [
    (dict(n_heads=0), "n_heads"),
    (dict(chunk_len=0), "chunk_len"),
    (dict(eps=-1.0), "eps"),
    (dict(output_dropout=1.0), "output_dropout"),
    (dict(mode="predict"), "causal=True"),
])
def test_bad_knobs_are_one_line_errors(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        LinearAttention(**kwargs)
    assert "\n" not in str(info.value)
