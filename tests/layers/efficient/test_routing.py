"""Routing attention against dense softmax attention restricted to its cluster windows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from terraformer.layers.attention import merge_heads, split_heads
from terraformer.layers.attention_core import dot_product_attention
from terraformer.layers.efficient.routing import RoutingAttention
from terraformer.shapes import ShapeDtype


def pattern(clusters, chunk_len, causal, valid):
    """Same cluster and same window of ranks (rank: earlier real tokens of the cluster)."""
    b, h, length = clusters.shape
    window = np.zeros_like(clusters)
    for bi in range(b):
        for hi in range(h):
            seen = {}
            for i in range(length):
                if valid[bi, i]:
                    c = clusters[bi, hi, i]
                    window[bi, hi, i] = seen.get(c, 0) // chunk_len
                    seen[c] = seen.get(c, 0) + 1
    same = (clusters[..., :, None] == clusters[..., None, :])
    same &= window[..., :, None] == window[..., None, :]
    same &= valid[:, None, None, :]
    if causal:
        same &= np.tril(np.ones((length, length), bool))
    return same


def dense(x, w, n_heads, allowed):
    qk = split_heads(x @ w["w_qk"], n_heads)
    k = qk / jnp.sqrt(jnp.sum(qk * qk, -1, keepdims=True) + 1e-6)
    v = split_heads(x @ w["w_v"], n_heads)
    return merge_heads(dot_product_attention(qk, k, v, jnp.asarray(allowed))) @ w["w_o"]


def build(np_rng, shape, **kw):
    layer = RoutingAttention(n_heads=2, d_qk=4, d_v=3, n_clusters=3, chunk_len=3, **kw)
    sig = ShapeDtype(shape)
    w, s = layer.init((sig, ShapeDtype(shape[:2], bool)) if kw.get("masked") else sig,
                      jax.random.PRNGKey(int(np_rng.integers(1 << 30))))
    return layer, w, s


@pytest.mark.parametrize("causal", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_equals_dense_attention_on_the_pattern(np_rng, causal):
    x = jnp.asarray(np_rng.normal(size=(2, 20, 8)), jnp.float32)
    mask = jnp.asarray(np_rng.random((2, 20)) < 0.8).at[:, 0].set(True)
    layer, w, s = build(np_rng, x.shape, causal=causal, mode="eval", masked=True)
    y, clusters = jax.jit(lambda x, mask, w: (layer.apply((x, mask), w, s, None)[0][0],
                                              layer.clusters_of(x, w, s)))(x, mask, w)
    clusters = np.asarray(clusters)
    assert len(np.unique(clusters)) > 1
    allowed = pattern(clusters, 3, causal, np.asarray(mask))
    expected = jax.jit(dense, static_argnums=2)(x, w, 2, allowed)
    rows = np.asarray(mask)  # padded queries: anything
    np.testing.assert_allclose(np.asarray(y)[rows], np.asarray(expected)[rows], atol=2e-5)


@pytest.mark.slow
def test_train_mode_routes_like_eval_and_moves_centroids(np_rng):
    x = jnp.asarray(np_rng.normal(size=(2, 20, 8)), jnp.float32)
    mask = jnp.asarray(np_rng.random((2, 20)) < 0.8).at[:, 0].set(True)
    layer, w, s = build(np_rng, x.shape, mode="eval", masked=True)
    y, _ = jax.jit(layer.apply)((x, mask), w, s, None)
    clusters = np.asarray(layer.clusters_of(x, w, s))
    trainer = RoutingAttention(n_heads=2, d_qk=4, d_v=3, n_clusters=3, chunk_len=3,
                               mode="train", masked=True, centroid_decay=0.9)
    (y_train, _), s2 = jax.jit(trainer.apply)((x, mask), w, s, jax.random.PRNGKey(0))
    np.testing.assert_allclose(y_train, y[0], atol=1e-5)
    # Each centroid moves toward its tokens' mean (an independent float64 computation).
    qk = np.asarray(split_heads(x @ w["w_qk"], 2), np.float64)
    u = qk / np.sqrt((qk ** 2).sum(-1, keepdims=True) + 1e-6)
    c = np.asarray(s["centroids"], np.float64)
    for h in range(2):
        for k in range(3):
            members = (clusters[:, h] == k) & np.asarray(mask)
            expected = c[h, k]
            if members.any():
                expected = 0.9 * c[h, k] + 0.1 * u[:, h][members].mean(0)
                expected /= np.linalg.norm(expected)
            np.testing.assert_allclose(s2["centroids"][h, k], expected, atol=1e-5)


@pytest.mark.slow
def test_causal_never_looks_ahead_and_decodes_like_eval(np_rng):
    x = np_rng.normal(size=(1, 16, 8)).astype(np.float32)
    layer, w, s = build(np_rng, x.shape, causal=True, mode="eval")
    apply = jax.jit(layer.apply)
    y, _ = apply(jnp.asarray(x), w, s, None)
    t = int(np_rng.integers(0, 15))
    x2 = x.copy()
    x2[:, t + 1:] += 3 * np_rng.normal(size=x2[:, t + 1:].shape).astype(np.float32)
    y2, _ = apply(jnp.asarray(x2), w, s, None)
    np.testing.assert_allclose(y2[:, :t + 1], y[:, :t + 1], atol=1e-5)

    decoder = RoutingAttention(n_heads=2, d_qk=4, d_v=3, n_clusters=3, chunk_len=3,
                               causal=True, mode="predict", predict_mem_len=16)
    _, state0 = decoder.init(ShapeDtype((1, 1, 8)))
    state0 = dict(state0, centroids=s["centroids"])
    step = jax.jit(decoder.apply)
    for pieces in ([1] * 16, [6, 1, 7, 2]):
        state, outs, at = state0, [], 0
        for n in pieces:
            out, state = step(jnp.asarray(x[:, at:at + n]), w, state, None)
            outs.append(out)
            at += n
        np.testing.assert_allclose(jnp.concatenate(outs, 1), y, atol=1e-5)


@pytest.mark.slow
def test_jit_grad_vmap(np_rng):
    x = jnp.asarray(np_rng.normal(size=(2, 12, 8)), jnp.float32)
    layer, w, s = build(np_rng, x.shape, mode="eval")
    allowed = pattern(np.asarray(layer.clusters_of(x, w, s)), 3, False, np.ones((2, 12), bool))
    r = jnp.asarray(np_rng.normal(size=(2, 12, 8)), jnp.float32)

    def loss(w):
        return jnp.sum(layer.apply(x, w, s, None)[0] * r)

    g = jax.jit(jax.grad(loss))(w)
    g_ref = jax.grad(lambda w: jnp.sum(dense(x, w, 2, allowed) * r))(w)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, atol=5e-5)
    xs = jnp.stack([x, x[::-1]])
    ys = jax.vmap(lambda x: layer.apply(x, w, s, None)[0])(xs)
    allowed_r = pattern(np.asarray(layer.clusters_of(x[::-1], w, s)), 3, False,
                        np.ones((2, 12), bool))
    np.testing.assert_allclose(ys[1], dense(x[::-1], w, 2, allowed_r), atol=2e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(centroid_decay=1.0), r"centroid_decay must be in \[0.0, 1.0\)"),
    (dict(n_clusters=0), "n_clusters must be an int >= 1"),
    (dict(mode="predict"), "predict mode needs causal=True"),
])
def test_bad_knobs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RoutingAttention(**kwargs)
