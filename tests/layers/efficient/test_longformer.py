"""Longformer attention against dense softmax attention restricted to its pattern."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from terraformer.layers.attention import merge_heads, split_heads
from terraformer.layers.attention_core import dot_product_attention
from terraformer.layers.efficient.longformer import LongformerAttention
from terraformer.shapes import ShapeDtype


def pattern(length, block, window, n_global, causal):
    """A window of whole blocks, plus global keys and (non-causal) global queries."""
    i, j = np.arange(length)[:, None], np.arange(length)[None, :]
    allowed = (np.abs(i // block - j // block) <= window // block) | (j < n_global)
    allowed |= i < n_global
    return allowed & (j <= i) if causal else allowed


def dense(x, w, n_heads, allowed, mask=None):
    q, k, v = (split_heads(x @ w[n], n_heads) for n in ("wq", "wk", "wv"))
    allowed = jnp.asarray(allowed)
    if mask is not None:
        allowed = allowed & mask[:, None, None, :]
    return merge_heads(dot_product_attention(q, k, v, allowed)) @ w["wo"]


def build(np_rng, shape, **kw):
    layer = LongformerAttention(n_heads=2, d_qk=4, d_v=3, **kw)
    sig = ShapeDtype(shape)
    w, s = layer.init((sig, ShapeDtype(shape[:2], bool)) if kw.get("masked") else sig,
                      jax.random.PRNGKey(int(np_rng.integers(1 << 30))))
    return layer, w, s


@pytest.mark.parametrize("causal,n_global", [
    (False, 5),
    pytest.param(True, 5, marks=pytest.mark.slow),
    pytest.param(False, 0, marks=pytest.mark.slow),
])
def test_equals_dense_attention_on_the_pattern(np_rng, causal, n_global):
    # 26 positions in blocks of 4 (the last one padded); 5 global tokens span two blocks.
    x = jnp.asarray(np_rng.normal(size=(2, 26, 8)), jnp.float32)
    mask = None if causal else jnp.asarray(np_rng.random((2, 26)) < 0.8).at[:, 0].set(True)
    layer, w, s = build(np_rng, x.shape, block_len=4, window=4, n_global=n_global,
                        causal=causal, mode="eval", masked=mask is not None)

    allowed = pattern(26, 4, 4, n_global, causal)

    @jax.jit
    def run(x, mask, w):  # one compile for the layer and its reference
        y, _ = layer.apply(x if mask is None else (x, mask), w, s, None)
        return (y if mask is None else y[0]), dense(x, w, 2, allowed, mask)

    y, expected = run(x, mask, w)
    np.testing.assert_allclose(y, expected, atol=2e-5)


@pytest.mark.slow
def test_causal_never_looks_ahead_and_decodes_like_eval(np_rng):
    x = np_rng.normal(size=(1, 14, 8)).astype(np.float32)
    knobs = dict(block_len=3, window=3, n_global=2, causal=True)
    layer, w, s = build(np_rng, x.shape, mode="eval", **knobs)
    apply = jax.jit(layer.apply)
    y, _ = apply(jnp.asarray(x), w, s, None)
    t = int(np_rng.integers(0, 13))
    x2 = x.copy()
    x2[:, t + 1:] += np_rng.normal(size=x2[:, t + 1:].shape).astype(np.float32)
    y2, _ = apply(jnp.asarray(x2), w, s, None)
    np.testing.assert_allclose(y2[:, :t + 1], y[:, :t + 1], atol=1e-5)

    decoder = LongformerAttention(n_heads=2, d_qk=4, d_v=3, mode="predict", predict_mem_len=16,
                                  **knobs)
    _, state0 = decoder.init(ShapeDtype((1, 1, 8)))
    step = jax.jit(decoder.apply)
    for pieces in ([1] * 14, [5, 1, 6, 2]):
        state, outs, at = state0, [], 0
        for n in pieces:
            out, state = step(jnp.asarray(x[:, at:at + n]), w, state, None)
            outs.append(out)
            at += n
        np.testing.assert_allclose(jnp.concatenate(outs, 1), y, atol=1e-5)


@pytest.mark.slow
def test_jit_grad_vmap(np_rng):
    x = jnp.asarray(np_rng.normal(size=(2, 12, 8)), jnp.float32)
    layer, w, s = build(np_rng, x.shape, block_len=4, window=4, n_global=2, mode="eval")
    allowed = pattern(12, 4, 4, 2, False)
    r = jnp.asarray(np_rng.normal(size=(2, 12, 8)), jnp.float32)

    def loss(w, x):
        return jnp.sum(layer.apply(x, w, s, None)[0] * r)

    g = jax.jit(jax.grad(loss, argnums=(0, 1)))(w, x)
    g_ref = jax.grad(lambda w, x: jnp.sum(dense(x, w, 2, allowed) * r), argnums=(0, 1))(w, x)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, atol=5e-5)
    xs = jnp.stack([x, x[::-1]])
    ys = jax.vmap(lambda x: layer.apply(x, w, s, None)[0])(xs)
    np.testing.assert_allclose(ys[1], dense(x[::-1], w, 2, allowed), atol=2e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(block_len=4, window=6), "window must be a multiple of block_len=4, got 6"),
    (dict(n_global=-1), "n_global must be an int >= 0"),
    (dict(mode="predict"), "predict mode needs causal=True"),
])
def test_bad_knobs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LongformerAttention(**kwargs)
