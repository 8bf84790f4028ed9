"""Sinkhorn attention against dense attention of each block on its own and its sorted block."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from terraformer.layers.attention import merge_heads, split_heads
from terraformer.layers.attention_core import dot_product_attention
from terraformer.layers.efficient.sinkhorn import SinkhornAttention
from terraformer.shapes import ShapeDtype


def dense(x, w, n_heads, block, n_iters, temperature):
    """Sorting by Sinkhorn iterations in the linear domain, then one softmax per block over
    [own block; sorted block]."""
    q, k, v = (split_heads(x @ w[n], n_heads) for n in ("wq", "wk", "wv"))
    b, h, length, _ = q.shape
    n = length // block

    def blocks(a):
        return a.reshape(b, h, n, block, a.shape[-1])

    r = jax.nn.relu(jnp.einsum("bhnd,hdm->bhnm", blocks(k).mean(3), w["w_sort"][:, :, :n]))
    a = jnp.exp(r / temperature - jnp.max(r / temperature, axis=(-1, -2), keepdims=True))
    for _ in range(n_iters):
        a = a / a.sum(-1, keepdims=True)
        a = a / a.sum(-2, keepdims=True)
    ks, vs = (jnp.einsum("bhij,bhjtd->bhitd", a, blocks(t)) for t in (k, v))
    keys = jnp.concatenate([blocks(k), ks], axis=3)
    values = jnp.concatenate([blocks(v), vs], axis=3)
    out = dot_product_attention(blocks(q), keys, values).reshape(b, h, length, -1)
    return merge_heads(out) @ w["wo"], a


def build(np_rng, shape, **kw):
    layer = SinkhornAttention(n_heads=2, d_qk=4, d_v=3, block_len=4, max_length=32, **kw)
    w, s = layer.init(ShapeDtype(shape), jax.random.PRNGKey(int(np_rng.integers(1 << 30))))
    w["w_sort"] = w["w_sort"] * 4.0  # sharper scores: a sort far from uniform
    return layer, w, s


def test_equals_dense_attention_on_own_and_sorted_blocks(np_rng):
    x = jnp.asarray(np_rng.normal(size=(2, 24, 8)), jnp.float32)
    layer, w, s = build(np_rng, x.shape, mode="eval", n_sinkhorn_iters=6, temperature=0.5)

    @jax.jit
    def run(x, w):  # one compile for the layer, its sorting matrix and the reference
        y, _ = layer.apply(x, w, s, None)
        return (y, layer.sorting_matrix(split_heads(x @ w["wk"], 2), w),
                *dense(x, w, 2, 4, 6, 0.5))

    y, sort, expected, a = run(x, w)
    np.testing.assert_allclose(y, expected, atol=2e-5)
    np.testing.assert_allclose(sort, a, atol=1e-5)
    np.testing.assert_allclose(sort.sum(-2), 1.0, atol=1e-5)  # columns, exactly (rows converge
    # slowly when the scores are sharp)
    assert float(jnp.max(sort)) > 0.3  # not the uniform 1/6


@pytest.mark.slow
def test_jit_grad_vmap(np_rng):
    x = jnp.asarray(np_rng.normal(size=(2, 16, 8)), jnp.float32)
    layer, w, s = build(np_rng, x.shape, mode="train", n_sinkhorn_iters=5, temperature=0.75)
    r = jnp.asarray(np_rng.normal(size=(2, 16, 8)), jnp.float32)

    def loss(w, x):
        return jnp.sum(layer.apply(x, w, s, None)[0] * r)

    g = jax.jit(jax.grad(loss, argnums=(0, 1)))(w, x)
    g_ref = jax.grad(lambda w, x: jnp.sum(dense(x, w, 2, 4, 5, 0.75)[0] * r),
                     argnums=(0, 1))(w, x)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, atol=5e-5)
    xs = jnp.stack([x, x[::-1]])
    ys = jax.vmap(lambda x: layer.apply(x, w, s, None)[0])(xs)
    np.testing.assert_allclose(ys[1], dense(x[::-1], w, 2, 4, 5, 0.75)[0], atol=2e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(causal=True), "causal=True is not supported"),
    (dict(mode="predict"), "mode='predict' is not supported"),
    (dict(block_len=5, max_length=32), "block_len=5 must divide max_length=32"),
    (dict(temperature=0.0), r"temperature must be > 0"),
    (dict(n_sinkhorn_iters=0), "n_sinkhorn_iters must be an int >= 1"),
])
def test_bad_knobs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SinkhornAttention(**kwargs)


def test_bad_lengths(np_rng):
    layer, w, s = build(np_rng, (1, 24, 8), mode="eval")
    with pytest.raises(ValueError, match="block_len=4 must divide the length, got length 22"):
        layer.apply(jnp.zeros((1, 22, 8)), w, s, None)
    with pytest.raises(ValueError, match="length 36 exceeds max_length=32"):
        layer.apply(jnp.zeros((1, 36, 8)), w, s, None)
