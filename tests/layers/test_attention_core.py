"""The blocked attention core against plain references.

The forward pass is checked against a dense per-chunk computation written with jnp, and the
hand-written backward pass against JAX's own differentiation of the same forward loop (which
draws the same dropout masks), on fresh random inputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from terraformer.layers import attention_core as wa

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
    out, lse = wa.blocked_attention(q, k, v, q_pos, k_pos, **kw,
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
    config = wa._Config(kw["offsets"], 0.4, kw["causal"], kw["self_value"], True, dropout_rate,
                        wa.blocks_of(N_CHUNKS, N * C * C * len(kw["offsets"]),
                                     kw["chunks_per_block"]))

    def loss_custom(q, k, v):
        out, lse = wa.blocked_attention(q, k, v, q_pos, k_pos, **kw)
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


# -- the core against plain full attention over every key -----------------------------------------
def _full_reference(q, k, v, q_pos, k_pos, offsets, causal, wrap, scale):
    """Every query against every key of its sequence, the window written as a mask on chunk
    indices: softmax over the allowed keys (and whether the query has any)."""
    n, n_chunks, c, _ = q.shape
    qf, kf, vf = (a.reshape(n, n_chunks * c, -1) for a in (q, k, v))
    qp, kp = q_pos.reshape(n, -1), k_pos.reshape(n, -1)
    q_chunk = np.repeat(np.arange(n_chunks), c)[:, None]
    k_chunk = np.repeat(np.arange(n_chunks), c)[None, :]
    in_window = np.zeros((n_chunks * c, n_chunks * c), bool)
    for o in offsets:
        target = q_chunk + o
        in_window |= (target % n_chunks == k_chunk) if wrap else (target == k_chunk)
    allowed = jnp.asarray(in_window)[None] & (kp[:, None, :] >= 0)
    if causal:
        allowed &= kp[:, None, :] <= qp[:, :, None]
    s = jnp.einsum("nqd,nkd->nqk", qf, kf) * scale
    s = jnp.where(allowed, s, -jnp.inf)
    has_any = allowed.any(-1)
    p = jax.nn.softmax(jnp.where(has_any[..., None], s, 0.0), axis=-1)
    out = jnp.einsum("nqk,nkd->nqd", p, vf).reshape(n, n_chunks, c, -1)
    return out, has_any.reshape(n, n_chunks, c)


FULL_CASES = [
    dict(offsets=(-1, 0), causal=True, wrap=False),
    dict(offsets=(-1, 0, 1), causal=False, wrap=False),
    dict(offsets=(-1, 0, 1), causal=False, wrap=True),
    dict(offsets=(-2, 0), causal=True, wrap=True),
    dict(offsets=(0, 2), causal=False, wrap=False),
    dict(offsets=(0,), causal=True, wrap=False),
]


@pytest.mark.parametrize("case", FULL_CASES)
@pytest.mark.parametrize("padding", [False, True])
def test_blocked_attention_equals_full_attention_with_masks(np_rng, case, padding):
    """Local-style positions (in order), random padding keys: the core's value and gradient
    equal full attention over all keys with the causal, padding and window masks."""
    n_chunks = 5
    q = jnp.asarray(np_rng.standard_normal((N, n_chunks, C, D_QK)).astype(np.float32))
    k = jnp.asarray(np_rng.standard_normal((N, n_chunks, C, D_QK)).astype(np.float32))
    v = jnp.asarray(np_rng.standard_normal((N, n_chunks, C, D_V)).astype(np.float32))
    pos = np.broadcast_to(np.arange(n_chunks * C).reshape(n_chunks, C), (N, n_chunks, C))
    k_pos = np.where(np_rng.random(pos.shape) < 0.25, -1, pos) if padding else pos
    q_pos, k_pos = jnp.asarray(pos, jnp.int32), jnp.asarray(k_pos, jnp.int32)
    block = int(np_rng.integers(1, n_chunks + 1))
    w_out = jnp.asarray(np_rng.standard_normal((N, n_chunks, C, D_V)).astype(np.float32))
    _, has_any = _full_reference(q, k, v, q_pos, k_pos, scale=0.5, **case)
    weight = w_out * has_any[..., None]  # queries that may see no key are left out

    def loss_core(q, k, v):
        out, _ = wa.blocked_attention(q, k, v, q_pos, k_pos, scale=0.5, chunks_per_block=block,
                                      **case)
        return jnp.sum(out * weight), out

    def loss_full(q, k, v):
        out, _ = _full_reference(q, k, v, q_pos, k_pos, scale=0.5, **case)
        return jnp.sum(out * weight), out

    (_, got), got_grads = jax.value_and_grad(loss_core, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    (_, want), want_grads = jax.value_and_grad(loss_full, argnums=(0, 1, 2), has_aux=True)(
        q, k, v)
    mask = np.asarray(has_any)[..., None]
    np.testing.assert_allclose(np.where(mask, got, 0), np.where(mask, want, 0), atol=1e-5,
                               rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-4)


def test_position_mask_against_a_direct_rule(np_rng):
    q_pos = np_rng.integers(0, 20, size=7)
    k_pos = np_rng.integers(-2, 20, size=9)
    for causal, chunk_len, before, after in ((False, None, 0, 0), (True, None, 0, 0),
                                             (True, 4, 1, 0), (False, 3, 1, 2)):
        got = np.broadcast_to(wa.position_mask(jnp.asarray(q_pos), jnp.asarray(k_pos), causal,
                                               chunk_len, before, after), (7, 9))
        for i, qp in enumerate(q_pos):
            for j, kp in enumerate(k_pos):
                ok = kp >= 0 and (not causal or kp <= qp)
                if chunk_len is not None:
                    ok = ok and qp // chunk_len - before <= kp // chunk_len <= (
                        qp // chunk_len + after)
                assert got[i, j] == ok
