"""Chunk-window attention (the LSH core) and the permutation gather, against plain references.

The forward pass is checked against a dense per-chunk computation written with jnp, and the
hand-written backward pass against JAX's own differentiation of the same forward loop (which
draws the same dropout masks), on fresh random inputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from terraformer.layers import window_attention as wa

N, N_CHUNKS, C, D_QK, D_V = 3, 6, 4, 5, 3
SELF = -1e5


def _inputs(rng, n_chunks=N_CHUNKS):
    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape).astype(np.float32))

    q = normal(N, n_chunks, C, D_QK)
    k = normal(N, n_chunks, C, D_QK)
    v = normal(N, n_chunks, C, D_V)
    positions = np.stack([rng.permutation(n_chunks * C) for _ in range(N)]).astype(np.int32)
    q_pos = jnp.asarray(positions.reshape(N, n_chunks, C))
    k_pos = np.where(rng.random(positions.shape) < 0.15, -1, positions)  # some padding keys
    return q, k, v, q_pos, jnp.asarray(k_pos.reshape(N, n_chunks, C))


def _reference(q, k, v, q_pos, k_pos, offsets, causal, self_value, scale):
    """Plain: each chunk's window gathered, scores masked, softmax over the window."""
    n_chunks = q.shape[1]
    index = (np.arange(n_chunks)[:, None] + np.asarray(offsets)[None, :]) % n_chunks
    kw = k[:, index].reshape(N, n_chunks, -1, k.shape[-1])
    vw = v[:, index].reshape(N, n_chunks, -1, v.shape[-1])
    kp = k_pos[:, index].reshape(N, n_chunks, -1)
    s = jnp.einsum("nmqd,nmkd->nmqk", q, kw) * scale
    qp_, kp_ = q_pos[..., :, None], kp[..., None, :]
    if self_value is not None:
        s = jnp.where(qp_ == kp_, self_value, s)
    masked = (kp_ < 0) | ((kp_ > qp_) if causal else False)
    s = jnp.where(masked, wa.MASK_VALUE, s)
    return jnp.einsum("nmqk,nmkd->nmqd", jax.nn.softmax(s, axis=-1), vw), jax.nn.logsumexp(
        s, axis=-1)


CASES = [
    dict(offsets=(-1, 0), causal=True, self_value=SELF, chunks_per_block=1),
    dict(offsets=(-1, 0), causal=False, self_value=None, chunks_per_block=2),
    dict(offsets=(-2, 0, 1), causal=True, self_value=SELF, chunks_per_block=3),
    dict(offsets=(0,), causal=False, self_value=SELF, chunks_per_block=None),
]


@pytest.mark.parametrize("case", CASES)
def test_forward_matches_plain_reference(np_rng, case):
    q, k, v, q_pos, k_pos = _inputs(np_rng)
    kw = dict(offsets=case["offsets"], causal=case["causal"], self_value=case["self_value"],
              scale=0.4)
    out, lse = wa.window_attention(q, k, v, q_pos, k_pos, **kw,
                                   chunks_per_block=case["chunks_per_block"])
    ref_out, ref_lse = _reference(q, k, v, q_pos, k_pos, **kw)
    np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(lse, ref_lse, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dropout_rate", [0.0, pytest.param(0.3, marks=pytest.mark.slow)])
def test_custom_gradient_equals_autodiff(np_rng, case, dropout_rate):
    q, k, v, q_pos, k_pos = _inputs(np_rng)
    w_out = jnp.asarray(np_rng.standard_normal((N, N_CHUNKS, C, D_V)).astype(np.float32))
    w_lse = jnp.asarray(np_rng.standard_normal((N, N_CHUNKS, C)).astype(np.float32))
    rng = jax.random.PRNGKey(int(np_rng.integers(2**31)))
    kw = dict(offsets=case["offsets"], causal=case["causal"], self_value=case["self_value"],
              scale=0.4, dropout_rate=dropout_rate, dropout_rng=rng,
              chunks_per_block=case["chunks_per_block"])
    config = wa._Config(kw["offsets"], 0.4, kw["causal"], kw["self_value"], dropout_rate,
                        wa.blocks_of(N_CHUNKS, N * C * C * len(kw["offsets"]),
                                     kw["chunks_per_block"]))

    def loss_custom(q, k, v):
        out, lse = wa.window_attention(q, k, v, q_pos, k_pos, **kw)
        return jnp.sum(out * w_out) + jnp.sum(lse * w_lse)

    def loss_autodiff(q, k, v):  # the same forward loop, differentiated by JAX
        out, lse = wa._forward(config, q, k, v, q_pos, k_pos, rng)
        return jnp.sum(out * w_out) + jnp.sum(lse * w_lse)

    got = jax.grad(loss_custom, argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss_autodiff, argnums=(0, 1, 2))(q, k, v)
    assert float(loss_custom(q, k, v)) == pytest.approx(float(loss_autodiff(q, k, v)), rel=1e-6)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-4)


def test_blocks_divide_the_chunks():
    assert wa.blocks_of(12, 10, 5) == 4
    assert wa.blocks_of(7, 10, 5) == 1
    assert wa.blocks_of(8, 1 << 30, None) == 1
    assert wa.blocks_of(8, 1, None) == 8


def test_gather_rows_and_its_gradient(np_rng):
    groups, rounds, n, d = 2, 3, 7, 4
    x = jnp.asarray(np_rng.standard_normal((groups, n, d)).astype(np.float32))
    perm = np.stack([[np_rng.permutation(n) for _ in range(rounds)] for _ in range(groups)])
    perm = jnp.asarray(perm.astype(np.int32))
    inverse = wa.inverse_permutation(perm)
    np.testing.assert_array_equal(
        jnp.take_along_axis(perm, inverse, axis=-1), np.broadcast_to(np.arange(n), perm.shape))
    out = wa.gather_rows(x, perm, inverse)
    np.testing.assert_array_equal(out, jnp.take_along_axis(x[:, None], perm[..., None], axis=2))
    weights = jnp.asarray(np_rng.standard_normal(out.shape).astype(np.float32))
    got = jax.grad(lambda x: jnp.sum(wa.gather_rows(x, perm, inverse) * weights))(x)
    want = jax.grad(
        lambda x: jnp.sum(jnp.take_along_axis(x[:, None], perm[..., None], axis=2) * weights))(x)
    np.testing.assert_allclose(got, want, atol=1e-5)
