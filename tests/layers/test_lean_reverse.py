"""The in-place reversal of long half-residuals (layers.lean_reverse) against `jax.vjp`.

Small shapes, with the thresholds lowered so that the in-place walks run: the LSH residual
one head at a time and its projections by chunks of positions, the chunked feed-forward
chunk by chunk. Each is checked against the rebuilt input and a plain `jax.vjp` of the
half-residual's forward pass, with fresh random inputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from terraformer import layers as tl
from terraformer.layers import lean_reverse, lsh
from terraformer.layers.feedforward import FeedForward
from terraformer.layers.lsh import LSHSelfAttention
from terraformer.layers.reversible import ReversibleHalfResidual
from terraformer.shapes import ShapeDtype

LENGTH, D_MODEL = 64, 16


def _check(layer, seed: int):
    rng = np.random.default_rng(seed)
    x1, x2, g1, g2 = (jnp.asarray(rng.normal(size=(1, LENGTH, D_MODEL)), jnp.float32)
                      for _ in range(4))
    sig = ShapeDtype((1, LENGTH, D_MODEL), jnp.float32)
    weights, state = layer.init((sig, sig), jax.random.PRNGKey(seed))
    key = jax.random.PRNGKey(seed + 1)
    y, _ = jax.jit(lambda x, w: layer.apply(x, w, state, key))((x1, x2), weights)
    residual = layer.sublayers[0]

    def plain(x, w):  # the half-residual without the in-place walks
        return x[0] + residual.apply(x[1], w[0], state[0], key)[0], x[1]

    # The in-place walks run (None: the residual took the plain path); traced, not run.
    assert jax.eval_shape(lambda w: lean_reverse.lean_apply(residual, w, state[0], key, x1, x2),
                          weights[0]) is not None
    np.testing.assert_allclose(y[0], jax.jit(plain)((x1, x2), weights)[0], atol=1e-5)
    assert jax.eval_shape(lambda w: lean_reverse.lean_reverse_and_grad(
        residual, w, state[0], key, y[0], x2, g1, g2), weights[0]) is not None
    (rx1, rx2), ((gx1, gx2), gw) = jax.jit(
        lambda y_, g_, w_: layer.reverse_and_grad(y_, g_, w_, state, key))(y, (g1, g2), weights)
    (ex1, ex2), ew = jax.jit(lambda x, w: jax.vjp(plain, x, w)[1]((g1, g2)))((x1, x2), weights)
    np.testing.assert_allclose(rx1, x1, atol=2e-5)
    np.testing.assert_array_equal(rx2, x2)
    np.testing.assert_allclose(gx1, ex1, atol=1e-5)
    np.testing.assert_allclose(gx2, ex2, rtol=1e-4, atol=1e-4)
    for got, want in zip(jax.tree.leaves(gw), jax.tree.leaves(ew), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert jax.tree.structure(gw) == jax.tree.structure(ew)


@pytest.mark.parametrize("use_bias", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_lsh_residual_by_head_in_place(monkeypatch, use_bias):
    monkeypatch.setattr(lsh, "_HEAD_LOOP_ROWS", 0)  # one head at a time at this length
    monkeypatch.setattr(lean_reverse, "POSITION_CHUNK", 16)  # four chunks of positions
    attn = LSHSelfAttention(n_heads=2, d_qk=8, d_v=8, causal=True, chunk_len=8, n_hashes=2,
                            n_buckets=4, n_chunks_before=1, attention_dropout=0.1,
                            use_bias=use_bias, mode="train")
    _check(ReversibleHalfResidual(tl.LayerNorm(), attn, tl.Dropout(0.0, mode="train")), 3)


def test_chunked_feed_forward_in_place():
    ff = FeedForward(32, dropout=0.2, mode="train")  # dropout: each chunk keeps its own key
    _check(ReversibleHalfResidual(tl.Chunk(ff, 16)), 5)


def test_other_residuals_take_the_vjp_path():
    residual = ReversibleHalfResidual(tl.LayerNorm(), tl.Dense(D_MODEL)).sublayers[0]
    x = jnp.zeros((1, LENGTH, D_MODEL))
    weights, state = residual.init(ShapeDtype(x.shape, x.dtype), jax.random.PRNGKey(0))
    assert lean_reverse.lean_reverse_and_grad(residual, weights, state, None, x, x, x,
                                              x) is None
