"""Chunked cross-entropy equals LogSoftmax(Dense(h)) + cross-entropy, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from terraformer.layers import core
from terraformer.layers.chunked_loss import chunked_cross_entropy
from terraformer.layers.losses import accuracy, cross_entropy


def _inputs(np_rng, batch, length, d, vocab):
    h = jnp.asarray(np_rng.normal(size=(batch, length, d)), jnp.float32)
    w = jnp.asarray(np_rng.normal(size=(d, vocab)) / np.sqrt(d), jnp.float32)
    b = jnp.asarray(np_rng.normal(size=(vocab,)) * 0.1, jnp.float32)
    targets = jnp.asarray(np_rng.integers(0, vocab, size=(batch, length)), jnp.int32)
    weights = jnp.asarray(np_rng.integers(0, 2, size=(batch, length)), jnp.float32)
    return h, w, b, targets, weights


def _reference(h, w, b, targets, weights):
    log_probs = jax.nn.log_softmax(h @ w + b[None, None])  # [batch, length, vocab]
    return cross_entropy(log_probs, targets, weights), accuracy(log_probs, targets, weights)


@pytest.mark.parametrize("length,chunk_len", [(37, 8), (64, 16), (5, 16), (33, 1)])
def test_equals_plain_cross_entropy(np_rng, length, chunk_len):
    h, w, b, targets, weights = _inputs(np_rng, 2, length, 12, 19)
    loss, acc = jax.jit(chunked_cross_entropy, static_argnums=5)(h, w, b, targets, weights,
                                                                  chunk_len)
    ref_loss, ref_acc = _reference(h, w, b, targets, weights)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(acc, ref_acc, rtol=1e-6, atol=1e-7)


def test_gradients_equal(np_rng):
    h, w, b, targets, weights = _inputs(np_rng, 2, 45, 10, 23)  # 45: not a multiple of 16

    def chunked(h, w, b):
        return chunked_cross_entropy(h, w, b, targets, weights, chunk_len=16)[0]

    def plain(h, w, b):
        return _reference(h, w, b, targets, weights)[0]

    got = jax.jit(jax.grad(chunked, argnums=(0, 1, 2)))(h, w, b)
    want = jax.jit(jax.grad(plain, argnums=(0, 1, 2)))(h, w, b)
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


def test_hidden_fn_runs_inside_chunks(np_rng):
    """A position-wise merge + LayerNorm given as hidden_fn: same loss and gradients."""
    a, b_ = (jnp.asarray(np_rng.normal(size=(2, 29, 6)), jnp.float32) for _ in range(2))
    _, w, b, targets, weights = _inputs(np_rng, 2, 29, 12, 17)
    scale = jnp.asarray(np_rng.normal(size=(12,)), jnp.float32)

    def head(x1, x2, s):
        return core.layer_norm(jnp.concatenate([x1, x2], -1), s, 0.1)

    def chunked(x1, x2, s, w):
        return chunked_cross_entropy((x1, x2), w, b, targets, weights, chunk_len=8,
                                     hidden_fn=lambda c1, c2: head(c1, c2, s))[0]

    def plain(x1, x2, s, w):
        return _reference(head(x1, x2, s), w, b, targets, weights)[0]

    np.testing.assert_allclose(jax.jit(chunked)(a, b_, scale, w), plain(a, b_, scale, w),
                               rtol=1e-5)
    got = jax.jit(jax.grad(chunked, argnums=(0, 1, 2, 3)))(a, b_, scale, w)
    want = jax.jit(jax.grad(plain, argnums=(0, 1, 2, 3)))(a, b_, scale, w)
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)


def test_never_materialises_length_by_vocab():
    """The compiled backward's scratch memory grows with chunk_len, not the length."""
    d, vocab, length = 16, 4096, 8192

    def temp_bytes(chunk_len):
        def loss(h, w, b, t, m):
            return chunked_cross_entropy(h, w, b, t, m, chunk_len)[0]

        args = (jax.ShapeDtypeStruct((1, length, d), jnp.float32),
                jax.ShapeDtypeStruct((d, vocab), jnp.float32),
                jax.ShapeDtypeStruct((vocab,), jnp.float32),
                jax.ShapeDtypeStruct((1, length), jnp.int32),
                jax.ShapeDtypeStruct((1, length), jnp.float32))
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    full_logits = length * vocab * 4  # 128 MiB
    assert temp_bytes(256) < full_logits / 8


def test_errors(np_rng):
    h, w, b, targets, weights = _inputs(np_rng, 1, 8, 4, 5)
    with pytest.raises(ValueError, match="hidden must be"):
        chunked_cross_entropy(h[0], w, b, targets, weights)
    with pytest.raises(ValueError, match="w must be"):
        chunked_cross_entropy(h, w.T, b, targets, weights)
    with pytest.raises(ValueError, match="targets and weights"):
        chunked_cross_entropy(h, w, b, targets[:, :3], weights)
    with pytest.raises(TypeError, match="integer"):
        chunked_cross_entropy(h, w, b, targets.astype(jnp.float32), weights)
    with pytest.raises(ValueError, match="chunk_len"):
        chunked_cross_entropy(h, w, b, targets, weights, chunk_len=0)
