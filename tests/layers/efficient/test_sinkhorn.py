"""Sinkhorn attention against dense attention of each block on its own and its sorted block,
non-causal and causal (built here from the definitions, in the linear domain)."""

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


def dense_causal(x, w, n_heads, block, n_iters, temperature):
    """The causal form from its definition: block i's sort key is the mean of the keys up to
    its first position; S is strictly lower triangular, rows normalised over their entries
    and columns over the rows up to the current one (a running sum down the column); a query
    sees its own block up to itself and, from block 1 on, the mixture sum_j S_ij block_j.
    Lengths need not be a multiple of the block."""
    q, k, v = (split_heads(x @ w[n], n_heads) for n in ("wq", "wk", "wv"))
    b, h, length, _ = q.shape
    n = -(-length // block)
    starts = np.arange(n) * block
    summary = jnp.stack([k[:, :, :s + 1].mean(2) for s in starts], axis=2)
    r = jax.nn.relu(jnp.einsum("bhnd,hdm->bhnm", summary, w["w_sort"][:, :, :n]))
    below = np.tril(np.ones((n, n), bool), -1)[None, None]
    a = jnp.where(below, jnp.exp(r / temperature), 0.0)
    def divide(a, total):  # 0 where nothing is allowed yet
        return jnp.where(total > 0, a / jnp.where(total > 0, total, 1.0), 0.0)

    for _ in range(n_iters):
        a = divide(a, a.sum(-1, keepdims=True))
        a = divide(a, jnp.cumsum(a, axis=-2))

    def blocks(t):
        t = jnp.pad(t, [(0, 0), (0, 0), (0, n * block - length), (0, 0)])
        return t.reshape(b, h, n, block, t.shape[-1])

    ks, vs = (jnp.einsum("bhij,bhjtd->bhitd", a, blocks(t)).reshape(b, h, n * block, -1)
              for t in (k, v))
    pos, sorted_block = np.arange(length), np.repeat(np.arange(n), block)
    own = (pos[:, None] // block == pos[None, :] // block) & (pos[None, :] <= pos[:, None])
    mixed = (sorted_block[None, :] == pos[:, None] // block) & (pos[:, None] >= block)
    allowed = np.concatenate([own, mixed], axis=1)
    out = dot_product_attention(q, jnp.concatenate([k, ks], axis=2),
                                jnp.concatenate([v, vs], axis=2), jnp.asarray(allowed)[None, None])
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


def test_causal_equals_its_definition_and_never_looks_ahead(np_rng):
    # 22 positions in blocks of 4: the last block is partial (padded inside the layer).
    x = np_rng.normal(size=(2, 22, 8)).astype(np.float32)
    layer, w, s = build(np_rng, x.shape, mode="eval", causal=True, n_sinkhorn_iters=5,
                        temperature=0.5)
    t = int(np_rng.integers(0, 21))
    x2 = x.copy()
    x2[:, t + 1:] += np_rng.normal(size=x2[:, t + 1:].shape).astype(np.float32)

    @jax.jit
    def run(xs, w):  # one compile: the layer on both inputs, its sort and the reference
        ys = jax.vmap(lambda x: layer.apply(x, w, s, None)[0])(xs)
        k = split_heads(xs[0] @ w["wk"], 2)
        return ys, layer.sorting_matrix(jnp.pad(k, [(0, 0), (0, 0), (0, 2), (0, 0)]), w), \
            *dense_causal(xs[0], w, 2, 4, 5, 0.5)

    ys, sort, expected, a = run(jnp.stack([jnp.asarray(x), jnp.asarray(x2)]), w)
    np.testing.assert_allclose(ys[0], expected, atol=2e-5)
    np.testing.assert_allclose(sort, a, atol=1e-5)
    assert float(jnp.max(sort[..., 2:, :])) > 0.3 and float(jnp.min(sort[..., 2:, :2])) < 0.2
    np.testing.assert_allclose(ys[1][:, :t + 1], ys[0][:, :t + 1], atol=1e-5)
    assert float(jnp.max(jnp.abs(ys[1][:, t + 1:] - ys[0][:, t + 1:]))) > 1e-3


@pytest.mark.slow  # a compile per chunk size; the default run checks causality above
def test_predict_decodes_like_the_causal_eval(np_rng):
    x = np_rng.normal(size=(2, 19, 8)).astype(np.float32)
    knobs = dict(causal=True, n_sinkhorn_iters=4, temperature=0.5)
    layer, w, s = build(np_rng, x.shape, mode="eval", **knobs)
    y, _ = jax.jit(layer.apply)(jnp.asarray(x), w, s, None)
    decoder = SinkhornAttention(n_heads=2, d_qk=4, d_v=3, block_len=4, max_length=32,
                                mode="predict", **knobs)
    _, state0 = decoder.init(ShapeDtype((2, 1, 8)))
    step = jax.jit(decoder.apply)
    chunk = int(np_rng.integers(2, 9))  # a chunked prefill (blocks starting mid-chunk), then
    n_prefill = int(np_rng.integers(chunk, 19))  # its remainder, then token by token
    for pieces in ([1] * 19, [chunk] * (n_prefill // chunk) + [n_prefill % chunk]
                   + [1] * (19 - n_prefill - n_prefill % chunk + n_prefill % chunk)):
        state, outs, at = state0, [], 0
        for n in (p for p in pieces if p):
            out, state = step(jnp.asarray(x[:, at:at + n]), w, state, None)
            outs.append(out)
            at += n
        assert at == 19
        np.testing.assert_allclose(np.concatenate(outs, axis=1), y, atol=2e-5,
                                   err_msg=f"pieces {pieces}")


@pytest.mark.slow
def test_causal_gradient_equals_its_definition(np_rng):
    x = jnp.asarray(np_rng.normal(size=(1, 16, 8)), jnp.float32)
    layer, w, s = build(np_rng, x.shape, mode="train", causal=True, n_sinkhorn_iters=3,
                        temperature=0.75)
    r = jnp.asarray(np_rng.normal(size=(1, 16, 8)), jnp.float32)
    g = jax.jit(jax.grad(lambda w, x: jnp.sum(layer.apply(x, w, s, None)[0] * r),
                         argnums=(0, 1)))(w, x)
    g_ref = jax.grad(lambda w, x: jnp.sum(dense_causal(x, w, 2, 4, 3, 0.75)[0] * r),
                     argnums=(0, 1))(w, x)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, atol=5e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="predict"), "predict mode needs causal=True"),
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
        layer.apply(jnp.zeros((1, 22, 8)), w, s, None)  # (causal pads instead)
    with pytest.raises(ValueError, match="length 36 exceeds max_length=32"):
        layer.apply(jnp.zeros((1, 36, 8)), w, s, None)
