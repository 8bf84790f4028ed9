"""Linformer attention against a plain softmax(Q (EᵀK)ᵀ) FᵀV reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from terraformer.layers.efficient.linformer import LinformerAttention
from terraformer.shapes import ShapeDtype


def _reference(x, w, n_heads, mask, share_kv):
    """softmax(Q (Eᵀ (K·mask))ᵀ / sqrt(d)) Fᵀ (V·mask), one head at a time, numpy float64."""
    x = np.asarray(x, np.float64)
    q, k, v = (x @ np.asarray(w[n], np.float64) for n in ("wq", "wk", "wv"))
    length = x.shape[1]
    e = np.asarray(w["e"], np.float64)[:length]
    f = e if share_kv else np.asarray(w["f"], np.float64)[:length]
    keep = np.asarray(mask, np.float64)[:, :, None]
    d, d_v = q.shape[-1] // n_heads, v.shape[-1] // n_heads
    out = np.zeros(v.shape)
    for h in range(n_heads):
        sl, sl_v = slice(h * d, (h + 1) * d), slice(h * d_v, (h + 1) * d_v)
        kp = np.einsum("lk,bld->bkd", e, k[..., sl] * keep)
        vp = np.einsum("lk,bld->bkd", f, v[..., sl_v] * keep)
        s = q[..., sl] @ kp.transpose(0, 2, 1) / np.sqrt(d)
        p = np.exp(s - s.max(-1, keepdims=True))
        out[..., sl_v] = (p / p.sum(-1, keepdims=True)) @ vp
    return out @ np.asarray(w["wo"], np.float64)


@pytest.mark.parametrize("share_kv", [False, True])
def test_linformer_equals_reference_and_runs_under_jit_grad_vmap(np_rng, share_kv):
    # Length 9 of max_len 12: the first 9 rows of E and F; one sequence has padding.
    x = np_rng.normal(size=(2, 9, 8)).astype(np.float32)
    mask = np.ones((2, 9), bool)
    mask[1, int(np_rng.integers(2, 9)):] = False
    layer = LinformerAttention(n_heads=2, d_qk=4, d_v=4, masked=True, max_len=12, proj_len=5,
                               share_kv=share_kv, mode="eval")
    w, s = layer.init((ShapeDtype(x.shape), ShapeDtype(mask.shape, jnp.bool_)),
                      jax.random.PRNGKey(int(np_rng.integers(1 << 30))))
    assert w["e"].shape == (12, 5) and ("f" in w) != share_kv
    forward = jax.jit(lambda x: layer.apply((x, mask), w, s, None)[0][0])
    y = forward(x)
    np.testing.assert_allclose(y, _reference(x, w, 2, mask, share_kv), atol=2e-5, rtol=1e-5)
    if share_kv:
        return
    # A padded position changes no real position's output.
    x2 = x.copy()
    x2[1, ~mask[1]] += 1.0
    np.testing.assert_allclose(forward(x2)[1, mask[1]], y[1, mask[1]], atol=1e-6)
    # jit(grad(vmap)): the gradient of <y, r> along a random direction equals the central
    # finite difference of the forward pass.
    r = np_rng.normal(size=y.shape).astype(np.float32)

    def loss(x):
        per_example = jax.vmap(lambda xi, mi: layer.apply((xi[None], mi[None]), w, s, None)[0][0])
        return jnp.sum(per_example(x, mask)[:, 0] * r)

    g = jax.jit(jax.grad(loss))(x)
    d = np_rng.normal(size=x.shape).astype(np.float32)
    eps = 1e-2
    fd = np.sum((forward(x + eps * d) - forward(x - eps * d)) * r) / (2 * eps)
    np.testing.assert_allclose(np.sum(g * d), fd, rtol=1e-2, atol=1e-3)


def test_causal_is_refused_in_one_line():
    with pytest.raises(ValueError, match="causal=True is impossible") as info:
        LinformerAttention(causal=True)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="predict"), "predict"),
    (dict(max_len=0), "max_len"),
    (dict(proj_len=0), "proj_len"),
    (dict(n_heads=0), "n_heads"),
    (dict(attention_dropout=1.5), "attention_dropout"),
])
def test_bad_knobs_are_one_line_errors(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        LinformerAttention(**kwargs)
    assert "\n" not in str(info.value)


def test_length_beyond_max_len_is_refused():
    layer = LinformerAttention(n_heads=1, d_qk=4, d_v=4, max_len=4, proj_len=2, mode="eval")
    # Shapes are all the check needs: no weights computed.
    w, s = jax.eval_shape(lambda key: layer.init_weights_and_state(ShapeDtype((1, 4, 8)), key),
                          jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="max_len=4"):
        layer.apply(jnp.zeros((1, 5, 8)), w, s, None)
