"""Tests of LSH self-attention against plain references (fresh random inputs every run)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from terraformer.layers import lsh
from terraformer.layers.lsh import (
    LSHSelfAttention,
    hash_vectors,
    lsh_attention,
    random_rotations,
    resolve_n_buckets,
)
from terraformer.shapes import ShapeDtype

TOL = 1e-5


@pytest.fixture
def seed():
    s = int(np.random.default_rng().integers(2**31))
    print(f"seed={s}")
    return s


def _normal(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


# -- plain references ----------------------------------------------------------------------------
def _np_normalize(x):
    return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + lsh.NORM_EPSILON)


def window_masks(buckets, valid, n_total, chunk_len, before, after):
    """bool (B, H, R, L, L): query i's chunk window holds key j (sorting by bucket, position).

    buckets: (B, H, R, L) ints; valid: (B, L) bool; invalid positions go to bucket n_total.
    """
    buckets = np.asarray(buckets)
    b, h, r, length = buckets.shape
    c = min(chunk_len, length)
    n = -(-length // c)
    lp = n * c
    out = np.zeros((b, h, r, length, length), bool)
    for bi in range(b):
        for hi in range(h):
            for ri in range(r):
                bk = np.full(lp, n_total)
                bk[:length] = np.where(valid[bi], buckets[bi, hi, ri], n_total)
                order = np.lexsort((np.arange(lp), bk))
                for s, i in enumerate(order):
                    if i >= length:
                        continue
                    chunks = {(s // c + o) % n for o in range(-before, after + 1)}
                    for ch in chunks:
                        for j in order[ch * c : (ch + 1) * c]:
                            if j < length:
                                out[bi, hi, ri, i, j] = True
    return out


def dense_reference(qk, v, window, valid, causal):
    """Masked dense attention, differentiable: qk (B,H,L,d), v, window (B,H,R,L,L), valid (B,L)."""
    d = qk.shape[-1]
    length = qk.shape[2]
    k = qk / jnp.sqrt(jnp.sum(qk * qk, axis=-1, keepdims=True) + lsh.NORM_EPSILON)
    s = jnp.einsum("bhid,bhjd->bhij", qk, k) / np.sqrt(d)
    eye = np.eye(length, dtype=bool)
    s = jnp.where(eye, lsh.SELF_ATTENTION_VALUE, s)[:, :, None]  # (B, H, 1, L, L)
    ok = window & np.asarray(valid)[:, None, None, None, :]
    if causal:
        ok = ok & np.tril(np.ones((length, length), bool))
    s = jnp.where(ok, s, lsh.MASK_VALUE)
    lse = jax.nn.logsumexp(s, axis=-1)
    o = jnp.einsum("bhrij,bhjd->bhrid", jnp.exp(s - lse[..., None]), v)
    weights = jax.nn.softmax(lse, axis=2)  # exp(lse - logsumexp(lse)), normalised
    return jnp.sum(weights[..., None] * o, axis=2), jax.nn.logsumexp(lse, axis=2)


def full_reference(qk, v, causal, valid=None):
    """Plain full attention with the same shared-QK and self-mask rules."""
    b, h, length, _ = qk.shape
    window = np.ones((b, h, 1, length, length), bool)
    valid = np.ones((b, length), bool) if valid is None else valid
    return dense_reference(qk, v, window, valid, causal)


def layer_reference(layer, x, weights, causal, valid=None):
    qk, v = layer.project_qk_v(x, weights)
    o, _ = full_reference(qk, v, causal, valid)
    return layer.project_output(o, weights)


# -- hashing -------------------------------------------------------------------------------------
def _np_hash(vecs, rot):
    """vecs (B, H, L, d), rot (H, R, d, f/2) -> (B, H, R, L) and the top-2 margin."""
    rotated = np.einsum("bhld,hrdf->bhrlf", vecs.astype(np.float64), np.asarray(rot, np.float64))
    both = np.concatenate([rotated, -rotated], axis=-1)
    top2 = np.sort(both, axis=-1)[..., -2:]
    return np.argmax(both, axis=-1), top2[..., 1] - top2[..., 0]


def test_hash_matches_numpy_reference(seed):
    rng = np.random.default_rng(seed)
    vecs = _normal(rng, 2, 3, 40, 8)
    key = jax.random.PRNGKey(seed)
    for n_buckets in (2, 8, 16):
        rot = random_rotations(key, 8, n_buckets, 2, n_heads=3)
        got = np.asarray(hash_vectors(jnp.asarray(vecs), n_buckets, rotations=rot))
        want, margin = _np_hash(vecs, rot[0])
        clear = margin > 1e-4
        assert got.shape == (2, 3, 2, 40) and got.dtype == np.int32
        np.testing.assert_array_equal(got[clear], want[clear])


def test_hash_blocked_over_length_equals_whole(seed):
    vecs = jax.random.normal(jax.random.PRNGKey(seed), (2, 2, 37, 8))
    rot = random_rotations(jax.random.PRNGKey(seed + 1), 8, (4, 8), 3, n_heads=2)
    whole = hash_vectors(vecs, (4, 8), rotations=rot)
    blocked = hash_vectors(vecs, (4, 8), rotations=rot, block_len=5)
    np.testing.assert_array_equal(whole, blocked)


def test_hash_scale_invariant_and_rng_determines_buckets(seed):
    vecs = jax.random.normal(jax.random.PRNGKey(seed), (3, 64, 16))
    key = jax.random.PRNGKey(seed + 1)
    base = hash_vectors(vecs, 16, key, n_hashes=2)
    assert base.shape == (3, 2, 64)
    for scale in (0.25, 8.0):  # powers of two scale exactly
        np.testing.assert_array_equal(hash_vectors(vecs * scale, 16, key, n_hashes=2), base)
    agree = np.mean(np.asarray(hash_vectors(vecs * 3.7, 16, key, n_hashes=2)) == base)
    assert agree > 0.98
    np.testing.assert_array_equal(hash_vectors(vecs, 16, key, n_hashes=2), base)
    other = hash_vectors(vecs, 16, jax.random.PRNGKey(seed + 2), n_hashes=2)
    assert np.mean(np.asarray(other) != np.asarray(base)) > 0.3


def test_factored_buckets(seed):
    vecs = jax.random.normal(jax.random.PRNGKey(seed), (2, 2, 200, 8))
    rot = random_rotations(jax.random.PRNGKey(seed + 1), 8, (4, 8), 2, n_heads=2)
    buckets = np.asarray(hash_vectors(vecs, (4, 8), rotations=rot))
    assert buckets.min() >= 0 and buckets.max() < 32
    assert len(np.unique(buckets)) > 16  # both factors vary
    first = hash_vectors(vecs, 4, rotations=rot[:1])
    second = hash_vectors(vecs, 8, rotations=rot[1:])
    np.testing.assert_array_equal(buckets, np.asarray(first) * 8 + np.asarray(second))
    assert rot[0].shape == (2, 2, 8, 2) and rot[1].shape == (2, 2, 8, 4)
    one = hash_vectors(vecs, (1, 4), jax.random.PRNGKey(seed))
    assert 0 <= int(one.min()) and int(one.max()) < 4
    np.testing.assert_array_equal(hash_vectors(vecs, 1, jax.random.PRNGKey(seed)), 0)


def test_resolve_n_buckets():
    assert resolve_n_buckets(6, 4096, 128) == 6
    assert resolve_n_buckets((4, 8), 4096, 128) == (4, 8)
    assert resolve_n_buckets(None, 100, 128) == 1
    assert resolve_n_buckets(None, 300, 128) == 4  # 3 chunks -> 4
    assert resolve_n_buckets(None, 4096, 128) == 32
    assert resolve_n_buckets(None, 10, 128, max_length_for_buckets=65536) == 512
    assert resolve_n_buckets(None, 2**20, 128) == (64, 128)  # 8192 buckets, factored
    for bad in (3, 0, (2, 3), (2, 2, 2)):
        with pytest.raises(ValueError, match="n_buckets"):
            resolve_n_buckets(bad, 64, 8)
    with pytest.raises(TypeError, match="n_buckets"):
        resolve_n_buckets("8", 64, 8)


# -- attention against references -----------------------------------------------------------------
# One chunk covering everything, or several chunks whose windows cover everything.
@pytest.mark.parametrize(
    "causal, chunk_len, before, after",
    [(False, 16, 1, 0), (False, 4, 1, 1), (True, 12, 0, 0), (True, 3, 5, 0)],
)
def test_one_bucket_equals_full_attention(seed, causal, chunk_len, before, after):
    rng = np.random.default_rng(seed)
    qk, v = jnp.asarray(_normal(rng, 2, 3, 12, 8)), jnp.asarray(_normal(rng, 2, 3, 12, 5))
    want, want_lse = full_reference(qk, v, causal)
    out, lse = lsh_attention(qk, v, jax.random.PRNGKey(seed), n_hashes=2, n_buckets=1,
                             chunk_len=chunk_len, n_chunks_before=before, n_chunks_after=after,
                             causal=causal)
    assert out.shape == (2, 3, 12, 5) and lse.shape == (2, 3, 12)
    assert np.abs(out - want).max() < TOL
    # Both rounds are identical, so the merged lse is the round's plus log 2.
    np.testing.assert_allclose(lse, want_lse + np.log(2.0), rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
def test_layer_one_bucket_equals_full_attention(seed, causal):
    x = jax.random.normal(jax.random.PRNGKey(seed), (2, 9, 12))
    layer = LSHSelfAttention(n_heads=2, d_qk=4, d_v=3, causal=causal, chunk_len=16,
                             n_buckets=1, n_hashes=2, mode="eval")
    weights, state = layer.init(ShapeDtype(x.shape), jax.random.PRNGKey(seed + 1))
    y, _ = layer.apply(x, weights, state, None)
    assert y.shape == x.shape
    assert np.abs(y - layer_reference(layer, x, weights, causal)).max() < TOL


@pytest.mark.parametrize(
    "causal, n_buckets, before, after",
    [(False, 4, 1, 1), (True, 4, 1, 0), (False, (2, 4), 0, 2), (True, (2, 4), 2, 1)],
)
def test_matches_plain_reference_with_buckets_padding_and_mask(
    seed, causal, n_buckets, before, after
):
    rng = np.random.default_rng(seed)
    b, h, length, n_hashes = 2, 2, 22, 3  # 22 = 5 chunks of 4 + padding
    qk, v = jnp.asarray(_normal(rng, b, h, length, 6)), jnp.asarray(_normal(rng, b, h, length, 4))
    valid = rng.random((b, length)) > 0.2
    rot = random_rotations(jax.random.PRNGKey(seed), 6, n_buckets, n_hashes, n_heads=h)
    out, lse = lsh_attention(qk, v, rotations=rot, n_hashes=n_hashes, n_buckets=n_buckets,
                             chunk_len=4, n_chunks_before=before, n_chunks_after=after,
                             causal=causal, mask=jnp.asarray(valid))
    buckets = hash_vectors(qk, n_buckets, rotations=rot)
    win = window_masks(buckets, valid, lsh.total_buckets(n_buckets), 4, before, after)
    want, want_lse = dense_reference(qk, v, win, valid, causal)
    sel = np.broadcast_to(valid[:, None, :], (b, h, length))
    assert np.abs(np.asarray(out - want)[sel]).max() < TOL
    np.testing.assert_allclose(np.asarray(lse)[sel], np.asarray(want_lse)[sel], rtol=1e-6,
                               atol=1e-4)


def test_rounds_merge_by_log_sum_exp(seed):
    rng = np.random.default_rng(seed)
    qk, v = jnp.asarray(_normal(rng, 2, 2, 32, 8)), jnp.asarray(_normal(rng, 2, 2, 32, 4))
    rot = random_rotations(jax.random.PRNGKey(seed), 8, 8, 3, n_heads=2)
    kw = dict(n_buckets=8, chunk_len=4, n_chunks_before=1, causal=True)
    out, lse = lsh_attention(qk, v, rotations=rot, n_hashes=3, **kw)
    outs, lses = [], []
    for r in range(3):
        o_r, l_r = lsh_attention(qk, v, rotations=(rot[0][:, r : r + 1],), n_hashes=1, **kw)
        outs.append(o_r)
        lses.append(l_r)
    lses = jnp.stack(lses)
    weights = jax.nn.softmax(lses, axis=0)
    want = sum(w[..., None] * o for w, o in zip(weights, outs))
    assert np.abs(out - want).max() < TOL
    assert np.abs(lse - jax.nn.logsumexp(lses, axis=0)).max() < 1e-4


def test_chunks_per_block_does_not_change_result(seed):
    rng = np.random.default_rng(seed)
    qk, v = jnp.asarray(_normal(rng, 1, 2, 40, 8)), jnp.asarray(_normal(rng, 1, 2, 40, 4))
    key = jax.random.PRNGKey(seed)
    kw = dict(n_hashes=2, n_buckets=4, chunk_len=8, causal=True)
    a, _ = lsh_attention(qk, v, key, **kw)
    b, _ = lsh_attention(qk, v, key, chunks_per_block=3, **kw)  # 20 chunks: 6 blocks + 2 left
    assert np.abs(a - b).max() < 1e-6


# -- causality and masking ------------------------------------------------------------------------
def test_causal_never_looks_ahead(seed):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(_normal(rng, 2, 16, 8))
    # One bucket: sorted order is position order, so chunks are local windows (with wrap-around).
    layer = LSHSelfAttention(n_heads=2, d_qk=4, d_v=4, causal=True, chunk_len=4,
                             n_chunks_before=1, n_chunks_after=1, n_buckets=1, mode="eval")
    weights, state = layer.init(ShapeDtype(x.shape), jax.random.PRNGKey(seed))
    y, _ = layer.apply(x, weights, state, None)
    t = int(rng.integers(0, 15))
    x2 = x.at[:, t + 1 :].add(jnp.asarray(_normal(rng, 2, 15 - t, 8)) * 3)
    y2, _ = layer.apply(x2, weights, state, None)
    assert np.abs(y2[:, : t + 1] - y[:, : t + 1]).max() < 1e-6
    assert np.abs(y2[:, t + 1 :] - y[:, t + 1 :]).max() > 1e-3
    # With many buckets, future values never reach earlier outputs (the hash pattern may).
    qk, v = jnp.asarray(_normal(rng, 1, 2, 32, 8)), jnp.asarray(_normal(rng, 1, 2, 32, 4))
    kw = dict(n_hashes=2, n_buckets=8, chunk_len=4, n_chunks_after=1, causal=True)
    key = jax.random.PRNGKey(seed)
    o1, _ = lsh_attention(qk, v, key, **kw)
    o2, _ = lsh_attention(qk, v.at[:, :, t + 1 :].set(100.0), key, **kw)
    assert np.abs(o2[:, :, : t + 1] - o1[:, :, : t + 1]).max() < 1e-6


def test_padding_mask_hides_masked_positions(seed):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(_normal(rng, 2, 20, 8))
    mask = rng.random((2, 20)) > 0.3
    mask[:, 0] = True
    layer = LSHSelfAttention(n_heads=2, d_qk=4, d_v=4, chunk_len=4, n_buckets=4, n_hashes=2,
                             use_mask=True, mode="eval")
    weights, state = layer.init((ShapeDtype(x.shape), ShapeDtype(mask.shape, bool)))
    y, _ = layer.apply((x, jnp.asarray(mask)), weights, state, None)
    noise = jnp.asarray(_normal(rng, 2, 20, 8)) * 5 * (~mask[..., None])
    y2, _ = layer.apply((x + noise, jnp.asarray(mask)), weights, state, None)
    assert np.abs(np.asarray(y2 - y)[mask]).max() < 1e-5
    # In the full-attention configuration it is full attention over the real tokens.
    full = LSHSelfAttention(n_heads=2, d_qk=4, d_v=4, chunk_len=32, n_buckets=1, use_mask=True,
                            mode="eval")
    y3, _ = full.apply((x, jnp.asarray(mask.astype(np.int32))), weights, state, None)
    want = layer_reference(full, x, weights, False, mask)
    assert np.abs(np.asarray(y3 - want)[mask]).max() < TOL


def test_length_not_multiple_of_chunk_is_padded(seed):
    x = jax.random.normal(jax.random.PRNGKey(seed), (1, 10, 8))
    layer = LSHSelfAttention(n_heads=2, d_qk=4, d_v=4, causal=True, chunk_len=4,
                             n_chunks_before=2, n_buckets=1, mode="eval")
    weights, state = layer.init(ShapeDtype(x.shape))
    y, _ = layer.apply(x, weights, state, None)
    assert y.shape == (1, 10, 8)
    assert np.abs(y - layer_reference(layer, x, weights, True)).max() < TOL


# -- gradients -------------------------------------------------------------------------------------
def test_gradients_finite_differences(seed):
    rng = np.random.default_rng(seed)
    qk, v = jnp.asarray(_normal(rng, 1, 2, 6, 3)), jnp.asarray(_normal(rng, 1, 2, 6, 2))

    def f(qk, v):
        return lsh_attention(qk, v, jax.random.PRNGKey(0), n_hashes=2, n_buckets=1, chunk_len=2,
                             n_chunks_before=1, n_chunks_after=1, causal=True)[0]

    check_grads(f, (qk, v), order=1, modes=["rev"], eps=1e-2, atol=2e-2, rtol=2e-2)


def test_gradients_match_reference(seed):
    rng = np.random.default_rng(seed)
    qk, v = jnp.asarray(_normal(rng, 2, 2, 18, 6)), jnp.asarray(_normal(rng, 2, 2, 18, 4))
    ct = jnp.asarray(_normal(rng, 2, 2, 18, 4))
    valid = np.ones((2, 18), bool)
    rot = random_rotations(jax.random.PRNGKey(seed), 6, 4, 2, n_heads=2)
    kw = dict(n_hashes=2, n_buckets=4, chunk_len=4, n_chunks_before=1, causal=True)
    win = window_masks(hash_vectors(qk, 4, rotations=rot), valid, 4, 4, 1, 0)

    def loss_lsh(qk, v):
        return jnp.sum(lsh_attention(qk, v, rotations=rot, chunks_per_block=2, **kw)[0] * ct)

    def loss_ref(qk, v):
        return jnp.sum(dense_reference(qk, v, win, valid, True)[0] * ct)

    g = jax.jit(jax.grad(loss_lsh, argnums=(0, 1)))(qk, v)
    g_ref = jax.grad(loss_ref, argnums=(0, 1))(qk, v)
    for a, b in zip(g, g_ref):
        assert np.abs(a - b).max() < 1e-4


def test_layer_weight_gradients_match_reference(seed):
    x = jax.random.normal(jax.random.PRNGKey(seed), (2, 8, 8))
    layer = LSHSelfAttention(n_heads=2, d_qk=4, d_v=4, causal=True, chunk_len=8, n_buckets=1,
                             mode="eval", use_bias=True)
    weights, state = layer.init(ShapeDtype(x.shape), jax.random.PRNGKey(seed + 1))
    g = jax.grad(lambda w: jnp.sum(layer.apply(x, w, state, None)[0] ** 2))(weights)
    g_ref = jax.grad(lambda w: jnp.sum(layer_reference(layer, x, w, True) ** 2))(weights)
    assert set(g) == {"w_qk", "w_v", "w_o", "b_o"}
    for name in g:
        assert np.abs(g[name] - g_ref[name]).max() < 1e-4


# -- modes, rng, jit ------------------------------------------------------------------------------
def test_train_mode_rng(seed):
    x = jax.random.normal(jax.random.PRNGKey(seed), (2, 32, 8))
    layer = LSHSelfAttention(n_heads=2, d_qk=4, d_v=4, chunk_len=4, n_buckets=8, n_hashes=2,
                             causal=True, mode="train")
    weights, state = layer.init(ShapeDtype(x.shape))
    apply = jax.jit(lambda x, r: layer.apply(x, weights, state, r)[0])
    r1, r2 = jax.random.PRNGKey(seed + 1), jax.random.PRNGKey(seed + 2)
    np.testing.assert_array_equal(apply(x, r1), apply(x, r1))
    assert np.abs(apply(x, r1) - apply(x, r2)).max() > 1e-4
    with pytest.raises(ValueError, match="rng"):
        layer.apply(x, weights, state, None)
    drop = LSHSelfAttention(n_heads=2, d_qk=4, d_v=4, chunk_len=4, n_buckets=8,
                            attention_dropout=0.5, output_dropout=0.1, mode="train")
    y, _ = drop.apply(x, weights, state, r1)
    assert np.isfinite(y).all() and y.shape == x.shape
    # eval: deterministic from the state's key, no rng needed.
    ev = LSHSelfAttention(n_heads=2, d_qk=4, d_v=4, chunk_len=4, n_buckets=8, n_hashes=2,
                          causal=True, mode="eval", attention_dropout=0.5)
    y1, _ = ev.apply(x, weights, state, None)
    y2, _ = jax.jit(lambda x: ev.apply(x, weights, state, r2))(x)
    assert np.abs(y1 - y2).max() < 1e-6


@pytest.mark.parametrize("n_buckets", [None, 6, (2, 4)])
def test_jit_and_shapes(seed, n_buckets):
    x = jax.random.normal(jax.random.PRNGKey(seed), (2, 50, 16)).astype(jnp.float32)
    layer = LSHSelfAttention(n_heads=3, d_qk=8, d_v=4, chunk_len=8, n_buckets=n_buckets,
                             n_hashes=2, n_chunks_after=1, mode="eval")
    weights, state = layer.init(ShapeDtype(x.shape))
    assert weights["w_qk"].shape == (16, 24) and weights["w_o"].shape == (12, 16)
    y, _ = jax.jit(lambda x: layer.apply(x, weights, state, None))(x)
    assert y.shape == x.shape and np.isfinite(y).all()
    assert layer.output_signature(ShapeDtype(x.shape), weights, state) == ShapeDtype(x.shape)
    short = x[:, :5]  # shorter than a chunk: one chunk of that length
    assert layer.apply(short, weights, state, None)[0].shape == short.shape


def test_invalid_arguments():
    with pytest.raises(ValueError, match="chunk_len"):
        LSHSelfAttention(chunk_len=0)
    with pytest.raises(ValueError, match="n_buckets"):
        LSHSelfAttention(n_buckets=5)
    with pytest.raises(ValueError, match="attention_dropout"):
        LSHSelfAttention(attention_dropout=1.0)
    with pytest.raises(ValueError, match="mode"):
        LSHSelfAttention(mode="decode")
    layer = LSHSelfAttention(n_heads=1, d_qk=4, d_v=4, mode="eval", use_mask=True)
    weights, state = layer.init((ShapeDtype((1, 8, 6)), ShapeDtype((1, 8), bool)))
    with pytest.raises(ValueError, match="last axis"):
        layer.apply((jnp.zeros((1, 8, 5)), jnp.ones((1, 8))), weights, state, None)
    with pytest.raises(ValueError, match="mask"):
        layer.apply((jnp.zeros((1, 8, 6)), jnp.ones((1, 7))), weights, state, None)
    with pytest.raises(ValueError, match="2 inputs"):
        layer.apply(jnp.zeros((1, 8, 6)), weights, state, None)
    with pytest.raises(ValueError, match="qk and v"):
        lsh_attention(jnp.zeros((1, 8, 4)), jnp.zeros((1, 8, 4)), jax.random.PRNGKey(0))


def test_subclass_can_replace_projections(seed):
    class NoValueProjection(LSHSelfAttention):
        """Values are the inputs themselves (d_v = d_model / n_heads)."""

        def init_projections(self, d_model, rng):
            weights = super().init_projections(d_model, rng)
            del weights["w_v"]
            return weights

        def project_qk_v(self, x, weights):
            qk = jnp.dot(x, weights["w_qk"])
            return self._split_heads(qk, self.d_qk), self._split_heads(x, self.d_v)

    x = jax.random.normal(jax.random.PRNGKey(seed), (1, 12, 8))
    layer = NoValueProjection(n_heads=2, d_qk=4, d_v=4, chunk_len=16, n_buckets=1, mode="eval")
    weights, state = layer.init(ShapeDtype(x.shape))
    assert "w_v" not in weights
    y, _ = layer.apply(x, weights, state, None)
    assert np.abs(y - layer_reference(layer, x, weights, False)).max() < TOL


# -- predict mode ---------------------------------------------------------------------------------
def _predict_pair(seed, length, d_model=8, **kw):
    x = jax.random.normal(jax.random.PRNGKey(seed), (2, length, d_model))
    common = dict(n_heads=2, d_qk=4, d_v=4, causal=True, **kw)
    ev = LSHSelfAttention(mode="eval", **common)
    pr = LSHSelfAttention(mode="predict", **common)
    key = jax.random.PRNGKey(seed + 1)
    weights, state = ev.init(ShapeDtype(x.shape), key)
    _, pstate = pr.init(ShapeDtype((2, 1, d_model)), key)
    return x, ev, pr, weights, state, pstate


def _feed(pr, weights, pstate, x, sizes):
    step = jax.jit(lambda x, s: pr.apply(x, weights, s, None))
    ys, t = [], 0
    for n in sizes:
        y, pstate = step(x[:, t : t + n], pstate)
        ys.append(y)
        t += n
    return jnp.concatenate(ys, axis=1), pstate


def test_predict_one_token_at_a_time_equals_eval(seed):
    x, ev, pr, weights, state, pstate = _predict_pair(
        seed, 14, chunk_len=16, n_buckets=1, n_hashes=2, predict_mem_len=32)
    y_eval, _ = ev.apply(x, weights, state, None)
    y_tok, s = _feed(pr, weights, pstate, x, [1] * 14)
    assert np.abs(y_tok - y_eval).max() < TOL
    assert int(s["pos"]) == 14 and int(s["fill"]) == 14
    y_mix, _ = _feed(pr, weights, pstate, x, [5, 1, 1, 7])  # a prompt, then tokens
    assert np.abs(y_mix - y_eval).max() < TOL


def _bucket_reference(x, layer, weights, state, positions_seen):
    """Predict-mode contract: each query attends, per round, to seen keys in its own bucket."""
    qk, v = layer.project_qk_v(x, weights)
    rot = random_rotations(state["hash_rng"], layer.d_qk, layer.n_buckets, layer.n_hashes,
                           layer.n_heads)
    buckets = np.asarray(hash_vectors(qk, layer.n_buckets, rotations=rot))  # (B, H, R, L)
    b, h, length, _ = qk.shape
    window = np.zeros((b, h, layer.n_hashes, length, length), bool)
    for t in range(length):
        seen = np.zeros(length, bool)
        seen[positions_seen[t]] = True
        window[..., t, :] = seen & (buckets == buckets[..., t : t + 1])
    o, _ = dense_reference(qk, v, window, np.ones((b, length), bool), True)
    return layer.project_output(o, weights)


def test_predict_with_buckets_matches_bucket_reference(seed):
    x, ev, pr, weights, state, pstate = _predict_pair(
        seed, 12, chunk_len=4, n_buckets=4, n_hashes=2, predict_mem_len=16)
    y_tok, _ = _feed(pr, weights, pstate, x, [1] * 12)
    want = _bucket_reference(x, pr, weights, pstate, [list(range(t + 1)) for t in range(12)])
    assert np.abs(y_tok - want).max() < TOL
    y_chunks, _ = _feed(pr, weights, pstate, x, [7, 5])
    assert np.abs(y_chunks - y_tok).max() < TOL


def test_predict_drops_oldest_positions(seed):
    x, ev, pr, weights, state, pstate = _predict_pair(
        seed, 15, chunk_len=4, n_buckets=1, predict_mem_len=8, predict_drop_len=3)
    y_tok, s = _feed(pr, weights, pstate, x, [1] * 15)
    seen, memory = [], []
    for t in range(15):
        if len(memory) + 1 > 8:
            memory = memory[3:]
        memory.append(t)
        seen.append(list(memory))
    want = _bucket_reference(x, pr, weights, pstate, seen)
    assert np.abs(y_tok - want).max() < TOL
    assert int(s["pos"]) == 15 and int(s["fill"]) == len(memory)


def test_predict_errors(seed):
    x, ev, pr, weights, state, pstate = _predict_pair(
        seed, 12, chunk_len=4, n_buckets=1, predict_mem_len=8, predict_drop_len=0)
    with pytest.raises(ValueError, match="predict_mem_len"):
        pr.apply(x[:, :9], weights, pstate, None)
    _, s = pr.apply(x[:, :6], weights, pstate, None)
    with pytest.raises(ValueError, match="full"):
        pr.apply(x[:, 6:9], weights, s, None)
    y, _ = jax.jit(lambda x, s: pr.apply(x, weights, s, None))(x[:, 6:9], s)
    assert np.isnan(y).all()  # under jit the overflow cannot raise, so it is made visible
    with pytest.raises(ValueError, match="batch"):
        pr.apply(x[:1, :1], weights, pstate, None)


def test_non_causal_predict_runs_the_eval_forward(seed):
    x = jax.random.normal(jax.random.PRNGKey(seed), (1, 12, 8))
    common = dict(n_heads=2, d_qk=4, d_v=4, chunk_len=4, n_buckets=4, n_hashes=2)
    ev = LSHSelfAttention(mode="eval", **common)
    pr = LSHSelfAttention(mode="predict", **common)
    weights, state = ev.init(ShapeDtype(x.shape))
    _, pstate = pr.init(ShapeDtype(x.shape))
    assert set(pstate) == {"hash_rng"}
    y_ev, _ = ev.apply(x, weights, state, None)
    y_pr, _ = pr.apply(x, weights, pstate, None)
    assert np.abs(y_ev - y_pr).max() < 1e-6


# -- memory ----------------------------------------------------------------------------------------
def test_backward_memory_grows_linearly_with_length():
    layer = LSHSelfAttention(n_heads=2, d_qk=16, d_v=16, chunk_len=64, n_buckets=16, n_hashes=2,
                             causal=True, mode="train")
    d_model = 32
    weights, state = layer.init(ShapeDtype((1, 128, d_model)))

    def temp_bytes(length):
        def loss(w, x, r):
            return jnp.sum(layer.apply(x, w, state, r)[0] ** 2)

        x = jax.ShapeDtypeStruct((1, length, d_model), jnp.float32)
        compiled = jax.jit(jax.grad(loss)).lower(weights, x, jax.random.PRNGKey(0)).compile()
        analysis = compiled.memory_analysis()
        if analysis is None:
            pytest.skip("memory_analysis is not available on this backend")
        return analysis.temp_size_in_bytes

    small, large = temp_bytes(4096), temp_bytes(8192)
    assert large / small < 2.6
