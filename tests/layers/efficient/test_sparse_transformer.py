"""Sparse Transformer attention against dense softmax attention restricted to its pattern."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from terraformer.layers.attention import merge_heads, split_heads
from terraformer.layers.attention_core import dot_product_attention
from terraformer.layers.efficient.sparse_transformer import SparseTransformerAttention
from terraformer.shapes import ShapeDtype


def pattern(length, pattern_name, block, n_summary, causal):
    """The paper's pattern (chunk-level window), written from its definition."""
    i, j = np.arange(length)[:, None], np.arange(length)[None, :]
    if pattern_name == "strided":
        allowed = (np.abs(i // block - j // block) <= 1) | ((i - j) % block == 0)
    else:
        allowed = (i // block == j // block) | (j % block >= block - n_summary)
    return allowed & (j <= i) if causal else allowed


def dense(x, w, n_heads, allowed, mask=None):
    q, k, v = (split_heads(x @ w[n], n_heads) for n in ("wq", "wk", "wv"))
    allowed = jnp.asarray(allowed)
    if mask is not None:
        allowed = allowed & mask[:, None, None, :]
    return merge_heads(dot_product_attention(q, k, v, allowed)) @ w["wo"]


def build(np_rng, shape, **kw):
    layer = SparseTransformerAttention(n_heads=2, d_qk=4, d_v=3, **kw)
    sig = ShapeDtype(shape)
    w, s = layer.init((sig, ShapeDtype(shape[:2], bool)) if kw.get("masked") else sig,
                      jax.random.PRNGKey(int(np_rng.integers(1 << 30))))
    return layer, w, s


@pytest.mark.parametrize("name,causal", [
    ("strided", False),
    pytest.param("strided", True, marks=pytest.mark.slow),
    pytest.param("fixed", True, marks=pytest.mark.slow),
    pytest.param("fixed", False, marks=pytest.mark.slow),
])
def test_equals_dense_attention_on_the_pattern(np_rng, name, causal):
    # 26 positions: blocks of 4 with the last one padded; a padding mask when not causal.
    x = jnp.asarray(np_rng.normal(size=(2, 26, 8)), jnp.float32)
    mask = None if causal else jnp.asarray(np_rng.random((2, 26)) < 0.8).at[:, 0].set(True)
    layer, w, s = build(np_rng, x.shape, pattern=name, block_len=4, n_summary=2,
                        causal=causal, mode="eval", masked=mask is not None)

    allowed = pattern(26, name, 4, 2, causal)

    @jax.jit
    def run(x, mask, w):  # one compile for the layer and its reference
        y, _ = layer.apply(x if mask is None else (x, mask), w, s, None)
        return (y if mask is None else y[0]), dense(x, w, 2, allowed, mask)

    y, expected = run(x, mask, w)
    np.testing.assert_allclose(y, expected, atol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["strided", "fixed"])
def test_causal_never_looks_ahead_and_decodes_like_eval(np_rng, name):
    x = np_rng.normal(size=(1, 14, 8)).astype(np.float32)
    layer, w, s = build(np_rng, x.shape, pattern=name, block_len=3, n_summary=1,
                        causal=True, mode="eval")
    apply = jax.jit(layer.apply)
    y, _ = apply(jnp.asarray(x), w, s, None)
    t = int(np_rng.integers(0, 13))
    x2 = x.copy()
    x2[:, t + 1:] += np_rng.normal(size=x2[:, t + 1:].shape).astype(np.float32)
    y2, _ = apply(jnp.asarray(x2), w, s, None)
    np.testing.assert_allclose(y2[:, :t + 1], y[:, :t + 1], atol=1e-5)

    decoder = SparseTransformerAttention(n_heads=2, d_qk=4, d_v=3, pattern=name, block_len=3,
                                         n_summary=1, causal=True, mode="predict",
                                         predict_mem_len=16)
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
    layer, w, s = build(np_rng, x.shape, pattern="fixed", block_len=4, n_summary=1,
                        mode="eval")
    allowed = pattern(12, "fixed", 4, 1, False)
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
    (dict(pattern="dilated"), "pattern must be one of"),
    (dict(pattern="fixed", block_len=4, n_summary=5), "n_summary must be an int <= 4"),
    (dict(block_len=0), "block_len must be an int >= 1"),
    (dict(mode="predict"), "predict mode needs causal=True"),
])
def test_bad_knobs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparseTransformerAttention(**kwargs)
