"""Tests of LSH self-attention against plain references (fresh random inputs every run).

Compilation dominates the run time on CPU, so inputs and hash rotations come from numpy, the
references are jitted, and the layer tests share one shape (batch 2, d_model 8, 2 heads of 4).
"""

from __future__ import annotations

import functools

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
D_MODEL = 8
HEADS = dict(n_heads=2, d_qk=4, d_v=4)


@pytest.fixture
def rng(np_rng):
    """A numpy Generator with a fresh seed (tests/conftest.py prints it; TEST_SEED replays)."""
    return np_rng


def _normal(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _rotations(rng, d, n_buckets, n_hashes, n_heads):
    factors = n_buckets if isinstance(n_buckets, tuple) else (n_buckets,)
    return tuple(_normal(rng, n_heads, n_hashes, d, f // 2) for f in factors)


def _key(rng):
    return jax.random.PRNGKey(int(rng.integers(2**31)))


def _layer(mode="eval", **kw):
    return LSHSelfAttention(mode=mode, **{**HEADS, **kw})


def _init(layer, rng, length=16, batch=2):
    sig = ShapeDtype((batch, length, D_MODEL))
    if layer.n_in == 2:
        sig = (sig, ShapeDtype((batch, length), bool))
    return layer.init(sig, _key(rng))


# -- plain references ----------------------------------------------------------------------------
def window_masks(buckets, valid, n_total, chunk_len, before, after):
    """bool (B, H, R, L, L): key j is in query i's chunk window (sorting by bucket, position).

    buckets: (B, H, R, L) ints; valid: (B, L) bool; invalid positions go to bucket n_total, as
    does the padding up to a multiple of chunk_len.
    """
    buckets = np.asarray(buckets)
    b, h, r, length = buckets.shape
    c = min(chunk_len, length)
    n = -(-length // c)
    out = np.zeros((b, h, r, length, length), bool)
    for bi in range(b):
        for hi in range(h):
            for ri in range(r):
                bk = np.full(n * c, n_total)
                bk[:length] = np.where(valid[bi], buckets[bi, hi, ri], n_total)
                order = np.lexsort((np.arange(n * c), bk))
                for s, i in enumerate(order):
                    if i >= length:
                        continue
                    for ch in {(s // c + o) % n for o in range(-before, after + 1)}:
                        keys = order[ch * c : (ch + 1) * c]
                        out[bi, hi, ri, i, keys[keys < length]] = True
    return out


@functools.partial(jax.jit, static_argnames=("causal", "qk_scale"))
def dense_reference(qk, v, window, valid, causal, qk_scale=1.0):
    """Masked dense attention: qk (B,H,L,d), v (B,H,L,dv), window (B,H,R,L,L), valid (B,L).

    Shared QK with unit-length keys, scores `qk_scale * q . k` (1: Trax's); self-scores -1e5,
    masked scores -1e9; rounds merged by their log-sum-exp. Returns (out (B,H,L,dv),
    lse (B,H,L)).
    """
    length = qk.shape[2]
    k = qk / jnp.sqrt(jnp.sum(qk * qk, axis=-1, keepdims=True) + lsh.NORM_EPSILON)
    s = jnp.einsum("bhid,bhjd->bhij", qk, k) * qk_scale
    s = jnp.where(jnp.eye(length, dtype=bool), lsh.SELF_ATTENTION_VALUE, s)[:, :, None]
    ok = window & valid[:, None, None, None, :]
    if causal:
        ok = ok & jnp.tril(jnp.ones((length, length), bool))
    s = jnp.where(ok, s, lsh.MASK_VALUE)
    lse = jax.nn.logsumexp(s, axis=-1)
    o = jnp.einsum("bhrij,bhjd->bhrid", jnp.exp(s - lse[..., None]), v)
    weights = jax.nn.softmax(lse, axis=2)  # exp(lse_r - logsumexp_r(lse_r))
    return jnp.sum(weights[..., None] * o, axis=2), jax.nn.logsumexp(lse, axis=2)


def full_reference(qk, v, causal, valid=None, qk_scale=1.0):
    """Plain full attention with the same shared-QK and self-score rules."""
    b, h, length, _ = qk.shape
    window = np.ones((b, h, 1, length, length), bool)
    valid = np.ones((b, length), bool) if valid is None else np.asarray(valid, bool)
    return dense_reference(qk, v, window, valid, causal, qk_scale)


def layer_reference(layer, x, weights, causal, valid=None):
    qk, v = layer.project_qk_v(jnp.asarray(x), weights)
    o, _ = full_reference(qk, v, causal, valid, layer.qk_scale)
    return layer.project_output(o, weights)


def _max_diff(a, b, where=None):
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return d.max() if where is None else d[where].max()


# -- hashing -------------------------------------------------------------------------------------
def test_hash_matches_numpy_reference(rng):
    vecs = _normal(rng, 2, 3, 40, 8)
    for n_buckets in (2, 16):
        rot = _rotations(rng, 8, n_buckets, 2, 3)
        got = np.asarray(hash_vectors(vecs, n_buckets, rotations=rot))
        rotated = np.einsum("bhld,hrdf->bhrlf", vecs.astype(np.float64), rot[0])
        both = np.concatenate([rotated, -rotated], axis=-1)
        top2 = np.sort(both, axis=-1)[..., -2:]
        clear = top2[..., 1] - top2[..., 0] > 1e-4  # leave out float near-ties
        assert got.shape == (2, 3, 2, 40) and got.dtype == np.int32
        np.testing.assert_array_equal(got[clear], np.argmax(both, axis=-1)[clear])


def test_factored_buckets_and_blocked_hashing(rng):
    vecs = _normal(rng, 2, 2, 200, 8)
    rot = _rotations(rng, 8, (4, 8), 2, 2)
    buckets = np.asarray(hash_vectors(vecs, (4, 8), rotations=rot))
    assert buckets.min() >= 0 and buckets.max() < 32
    assert len(np.unique(buckets)) > 16  # both factors vary
    first = np.asarray(hash_vectors(vecs, 4, rotations=rot[:1]))
    second = np.asarray(hash_vectors(vecs, 8, rotations=rot[1:]))
    np.testing.assert_array_equal(buckets, first * 8 + second)
    blocked = hash_vectors(vecs, (4, 8), rotations=rot, block_len=37)  # a lax.map over length
    np.testing.assert_array_equal(blocked, buckets)
    one = np.asarray(hash_vectors(vecs, (1, 4), rotations=(rot[0][..., :0], rot[0])))
    np.testing.assert_array_equal(one, first)
    np.testing.assert_array_equal(hash_vectors(vecs, 1, rotations=(rot[0][..., :0],)), 0)
    with pytest.raises(ValueError, match="rotation"):
        hash_vectors(vecs, (4, 8), rotations=rot[:1])
    with pytest.raises(ValueError, match="rotation"):
        hash_vectors(vecs, 16, rotations=rot[:1])


def test_hash_scale_invariant_and_rng_determines_buckets(rng):
    vecs = _normal(rng, 3, 64, 16)
    key, other_key = _key(rng), _key(rng)
    base = np.asarray(hash_vectors(vecs, 16, key, n_hashes=2))
    assert base.shape == (3, 2, 64)
    for scale in (0.25, 8.0):  # powers of two scale exactly
        np.testing.assert_array_equal(hash_vectors(vecs * scale, 16, key, n_hashes=2), base)
    assert np.mean(np.asarray(hash_vectors(vecs * 3.7, 16, key, n_hashes=2)) == base) > 0.98
    np.testing.assert_array_equal(hash_vectors(vecs, 16, key, n_hashes=2), base)
    other = np.asarray(hash_vectors(vecs, 16, other_key, n_hashes=2))
    assert np.mean(other != base) > 0.3
    rot = jax.eval_shape(lambda k: random_rotations(k, 16, (2, 8), 3, n_heads=4), key)
    assert [r.shape for r in rot] == [(4, 3, 16, 1), (4, 3, 16, 4)]


def test_resolve_n_buckets():
    assert resolve_n_buckets(6, 4096, 128) == 6
    assert resolve_n_buckets([4, 8], 4096, 128) == (4, 8)
    # 'chunks': one bucket a chunk, rounded up to a power of two.
    assert resolve_n_buckets("chunks", 100, 128) == 1
    assert resolve_n_buckets("chunks", 300, 128) == 4  # 3 chunks -> 4
    assert resolve_n_buckets("chunks", 4096, 128) == 32
    assert resolve_n_buckets("chunks", 10, 128, max_length_for_buckets=65536) == 512
    assert resolve_n_buckets("chunks", 2**20, 128) == (64, 128)  # 8192 buckets, factored
    # None: Trax's 2 * (L // chunk_len), factored above 128 buckets.
    assert resolve_n_buckets(None, 100, 128) == 2
    assert resolve_n_buckets(None, 300, 128) == 4
    assert resolve_n_buckets(None, 4096, 128) == 64
    assert resolve_n_buckets(None, 10, 128, max_length_for_buckets=8192) == 128
    assert resolve_n_buckets(None, 8192 + 128, 128) == (16, 8)  # 130 buckets: 16 x 2*(130//32)
    assert resolve_n_buckets(None, 2**20, 128) == (128, 128)  # 16384 buckets
    for bad in (3, 0, (2, 3), (2, 2, 2)):
        with pytest.raises(ValueError, match="n_buckets"):
            resolve_n_buckets(bad, 64, 8)
    with pytest.raises(TypeError, match="n_buckets"):
        resolve_n_buckets("8", 64, 8)


# -- attention against references -----------------------------------------------------------------
# One chunk covering everything, or several chunks whose windows cover everything (with
# wrap-around duplicates removed).
@pytest.mark.parametrize(
    "causal, chunk_len, before, after",
    [(False, 16, 1, 0), (False, 4, 1, 1), (True, 12, 0, 0), (True, 3, 5, 0)],
)
def test_one_bucket_equals_full_attention(rng, causal, chunk_len, before, after):
    qk, v = _normal(rng, 2, 3, 12, 8), _normal(rng, 2, 3, 12, 5)
    want, want_lse = full_reference(qk, v, causal)
    out, lse = lsh_attention(qk, v, rotations=_rotations(rng, 8, 1, 2, 3), n_hashes=2,
                             n_buckets=1, chunk_len=chunk_len, n_chunks_before=before,
                             n_chunks_after=after, causal=causal)
    assert out.shape == (2, 3, 12, 5) and lse.shape == (2, 3, 12)
    assert _max_diff(out, want) < TOL
    # Both rounds are identical, so the merged lse is the round's plus log 2.
    np.testing.assert_allclose(lse, want_lse + np.log(2.0), rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
def test_layer_one_bucket_equals_full_attention(rng, causal):
    layer = _layer(causal=causal, chunk_len=16, n_buckets=1, n_hashes=2)
    weights, state = _init(layer, rng, length=9)
    x = _normal(rng, 2, 9, D_MODEL)
    y, _ = layer.apply(x, weights, state, None)
    assert y.shape == x.shape
    assert _max_diff(y, layer_reference(layer, x, weights, causal)) < TOL


def test_qk_scale_multiplies_every_score(rng):
    """Scores are `qk_scale * q . k_hat`: the layer with a soft scale equals the reference at
    that scale, and not the one at Trax's scale of 1 (so the argument really reaches them)."""
    layer = _layer(causal=True, chunk_len=16, n_buckets=1, qk_scale=0.125)
    weights, state = _init(layer, rng, length=10)
    x = _normal(rng, 2, 10, D_MODEL)
    y, _ = layer.apply(x, weights, state, None)
    assert _max_diff(y, layer_reference(layer, x, weights, True)) < TOL
    qk, v = layer.project_qk_v(jnp.asarray(x), weights)
    trax_scale = layer.project_output(full_reference(qk, v, True)[0], weights)
    assert _max_diff(y, trax_scale) > 100 * TOL


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), "1", True])
def test_qk_scale_must_be_a_positive_number(bad):
    with pytest.raises(ValueError, match="qk_scale must be a positive number"):
        LSHSelfAttention(qk_scale=bad)


@pytest.mark.parametrize(
    "causal, n_buckets, before, after",
    [(False, 4, 1, 1), (True, 4, 1, 0), (False, (2, 4), 0, 2), (True, (2, 4), 2, 1)],
)
def test_matches_plain_reference_with_buckets_padding_and_mask(
    rng, causal, n_buckets, before, after
):
    b, h, length, n_hashes = 2, 2, 22, 3  # 22 = 5 chunks of 4 + padding
    qk, v = _normal(rng, b, h, length, 6), _normal(rng, b, h, length, 4)
    valid = rng.random((b, length)) > 0.2
    rot = _rotations(rng, 6, n_buckets, n_hashes, h)
    out, lse = lsh_attention(qk, v, rotations=rot, n_hashes=n_hashes, n_buckets=n_buckets,
                             chunk_len=4, n_chunks_before=before, n_chunks_after=after,
                             causal=causal, mask=valid)
    buckets = hash_vectors(qk, n_buckets, rotations=rot)
    win = window_masks(buckets, valid, lsh.total_buckets(n_buckets), 4, before, after)
    want, want_lse = dense_reference(qk, v, win, valid, causal)
    sel = np.broadcast_to(valid[:, None, :], (b, h, length))
    assert _max_diff(out, want, sel) < TOL
    np.testing.assert_allclose(np.asarray(lse)[sel], np.asarray(want_lse)[sel], rtol=1e-6,
                               atol=1e-4)


def test_rounds_merge_by_log_sum_exp(rng):
    qk, v = _normal(rng, 2, 2, 32, 8), _normal(rng, 2, 2, 32, 4)
    rot = _rotations(rng, 8, 8, 3, 2)
    kw = dict(n_buckets=8, chunk_len=4, n_chunks_before=1, causal=True)
    out, lse = lsh_attention(qk, v, rotations=rot, n_hashes=3, **kw)
    per_round = [
        lsh_attention(qk, v, rotations=(rot[0][:, r : r + 1],), n_hashes=1, **kw)
        for r in range(3)
    ]
    lses = jnp.stack([l_r for _, l_r in per_round])
    weights = jax.nn.softmax(lses, axis=0)
    want = sum(w[..., None] * o_r for w, (o_r, _) in zip(weights, per_round))
    assert _max_diff(out, want) < TOL
    np.testing.assert_allclose(lse, jax.nn.logsumexp(lses, axis=0), rtol=1e-6, atol=1e-4)
    # Processing the chunks in blocks (a lax.map with a remainder) changes nothing.
    blocked, _ = lsh_attention(qk, v, rotations=rot, n_hashes=3, chunks_per_block=5, **kw)
    assert _max_diff(blocked, out) < 1e-6


# -- causality and masking ------------------------------------------------------------------------
def test_causal_never_looks_ahead(rng):
    # One bucket: the sorted order is the position order, so the chunk windows are local
    # (wrapping around from the first chunk to the last).
    layer = _layer(causal=True, chunk_len=4, n_chunks_before=1, n_chunks_after=1, n_buckets=1)
    weights, state = _init(layer, rng)
    x = _normal(rng, 2, 16, D_MODEL)
    y, _ = layer.apply(x, weights, state, None)
    t = int(rng.integers(0, 15))
    x2 = x.copy()
    x2[:, t + 1 :] += 3 * _normal(rng, 2, 15 - t, D_MODEL)
    y2, _ = layer.apply(x2, weights, state, None)
    assert _max_diff(y2[:, : t + 1], y[:, : t + 1]) < 1e-6
    assert _max_diff(y2[:, t + 1 :], y[:, t + 1 :]) > 1e-3
    # With many buckets, later values never reach earlier outputs (the hash pattern may: see
    # the module docstring).
    qk, v = _normal(rng, 2, 2, 22, 6), _normal(rng, 2, 2, 22, 4)
    rot = _rotations(rng, 6, 4, 3, 2)
    kw = dict(n_hashes=3, n_buckets=4, chunk_len=4, n_chunks_before=1, causal=True)
    o1, _ = lsh_attention(qk, v, rotations=rot, **kw)
    v2 = v.copy()
    v2[:, :, t + 1 :] = 100.0
    o2, _ = lsh_attention(qk, v2, rotations=rot, **kw)
    assert _max_diff(o2[:, :, : t + 1], o1[:, :, : t + 1]) < 1e-6


def test_padding_mask_hides_masked_positions(rng):
    layer = _layer(chunk_len=4, n_buckets=4, n_hashes=2, use_mask=True)
    weights, state = _init(layer, rng)
    x = _normal(rng, 2, 16, D_MODEL)
    mask = rng.random((2, 16)) > 0.3
    mask[:, 0] = True
    y, _ = layer.apply((x, mask), weights, state, None)
    noisy = x + 5 * _normal(rng, 2, 16, D_MODEL) * ~mask[..., None]
    y2, _ = layer.apply((noisy, mask), weights, state, None)
    assert _max_diff(y2, y, mask) < 1e-5
    # In the full-attention configuration it is full attention over the real tokens.
    full = _layer(chunk_len=32, n_buckets=1, use_mask=True)
    y3, _ = full.apply((x, mask.astype(np.int32)), weights, state, None)
    assert _max_diff(y3, layer_reference(full, x, weights, False, mask), mask) < TOL


def test_length_not_multiple_of_chunk_is_padded(rng):
    layer = _layer(causal=True, chunk_len=4, n_chunks_before=2, n_buckets=1)
    weights, state = _init(layer, rng, length=10)
    x = _normal(rng, 2, 10, D_MODEL)
    y, _ = layer.apply(x, weights, state, None)
    assert y.shape == (2, 10, D_MODEL)
    assert _max_diff(y, layer_reference(layer, x, weights, True)) < TOL


# -- gradients -------------------------------------------------------------------------------------
def test_gradients_finite_differences(rng):
    qk, v = _normal(rng, 1, 2, 6, 3), _normal(rng, 1, 2, 6, 2)
    rot = _rotations(rng, 3, 1, 2, 2)

    @jax.jit
    def f(qk, v):
        return lsh_attention(qk, v, rotations=rot, n_hashes=2, n_buckets=1, chunk_len=2,
                             n_chunks_before=1, n_chunks_after=1, causal=True)[0]

    check_grads(f, (qk, v), order=1, modes=["rev"], eps=1e-3, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("one_head_at_a_time", [False, True])
def test_gradients_match_reference(rng, monkeypatch, one_head_at_a_time):
    if one_head_at_a_time:  # the path of long inputs: heads, then rounds, one at a time
        monkeypatch.setattr(lsh, "_HEAD_LOOP_ROWS", 0)
        jax.clear_caches()
    qk, v = _normal(rng, 2, 2, 22, 6), _normal(rng, 2, 2, 22, 4)
    ct = _normal(rng, 2, 2, 22, 4)
    valid = rng.random((2, 22)) > 0.2
    rot = _rotations(rng, 6, 4, 3, 2)
    kw = dict(n_hashes=3, n_buckets=4, chunk_len=4, n_chunks_before=1, causal=True, mask=valid)
    win = window_masks(hash_vectors(qk, 4, rotations=rot), valid, 4, 4, 1, 0)
    sel = valid[:, None, :, None]

    def loss_lsh(qk, v):
        return jnp.sum(jnp.where(sel, lsh_attention(qk, v, rotations=rot, **kw)[0] * ct, 0))

    def loss_ref(qk, v):
        return jnp.sum(jnp.where(sel, dense_reference(qk, v, win, valid, True)[0] * ct, 0))

    g = jax.jit(jax.grad(loss_lsh, argnums=(0, 1)))(qk, v)
    g_ref = jax.grad(loss_ref, argnums=(0, 1))(qk, v)
    for a, b in zip(g, g_ref):
        assert _max_diff(a, b) < 1e-4
    out = lsh_attention(qk, v, rotations=rot, **kw)[0]
    ref = dense_reference(qk, v, win, valid, True)[0]
    assert _max_diff(jnp.where(sel, out, 0), jnp.where(sel, ref, 0)) < TOL
    if one_head_at_a_time:
        jax.clear_caches()


def test_layer_weight_gradients_match_reference(rng):
    layer = _layer(causal=True, chunk_len=16, n_buckets=1, use_bias=True)
    weights, state = _init(layer, rng)
    x = _normal(rng, 2, 16, D_MODEL)
    g = jax.jit(jax.grad(lambda w: jnp.sum(layer.apply(x, w, state, None)[0] ** 2)))(weights)
    g_ref = jax.jit(jax.grad(lambda w: jnp.sum(layer_reference(layer, x, w, True) ** 2)))(weights)
    assert set(g) == {"w_qk", "w_v", "w_o", "b_o"}
    for name in g:
        assert _max_diff(g[name], g_ref[name]) < 1e-4


def test_layer_one_head_at_a_time_equals_all_heads(rng, monkeypatch):
    """The long-input path of the layer (projections, rounds and output projection one head
    at a time, rounds merged as they come, a hand-written round-by-round gradient) gives what
    the projections around `lsh_attention`'s head loop give: output and gradients, with
    attention dropout (the same per head and round keys) and a mask."""
    # One set of rotations for the batch, as lsh_attention draws them.
    layer = _layer("train", causal=True, chunk_len=4, n_buckets=4, n_hashes=3, use_mask=True,
                   attention_dropout=0.3, use_bias=True, hash_per_example=False)
    weights, state = _init(layer, rng, length=24)
    x, valid = _normal(rng, 2, 24, D_MODEL), rng.random((2, 24)) > 0.2
    ct, key = _normal(rng, 2, 24, D_MODEL), _key(rng)
    monkeypatch.setattr(lsh, "_HEAD_LOOP_ROWS", 0)
    assert layer._projects_by_head(x)

    def by_head(w, x_):
        return layer.apply((x_, valid), w, state, key)[0]

    def around_lsh_attention(w, x_):  # lsh_attention's own head loop
        r_hash, r_attn, _ = jax.random.split(key, 3)
        qk, v = layer.project_qk_v(x_, w)
        o, _ = lsh_attention(qk, v, r_hash, n_hashes=3, n_buckets=4, chunk_len=4,
                             causal=True, mask=valid, dropout_rate=0.3, dropout_rng=r_attn)
        return layer.project_output(o, w)

    def grads(f):
        return jax.grad(lambda w, x_: jnp.sum(f(w, x_) * ct), (0, 1))(weights, x)

    assert _max_diff(by_head(weights, x), around_lsh_attention(weights, x)) < 1e-5
    for a, b in zip(jax.tree.leaves(grads(by_head)), jax.tree.leaves(grads(around_lsh_attention)),
                    strict=True):
        assert _max_diff(a, b) < 1e-4


# -- modes, rng, jit ------------------------------------------------------------------------------
def test_rng_in_train_and_eval(rng):
    kw = dict(chunk_len=4, n_buckets=8, n_hashes=2, causal=True, attention_dropout=0.5)
    train = _layer("train", output_dropout=0.1, **kw)
    weights, state = _init(train, rng, length=32)
    x = _normal(rng, 2, 32, D_MODEL)
    r1, r2 = _key(rng), _key(rng)
    y1, _ = train.apply(x, weights, state, r1)
    assert np.isfinite(y1).all()
    np.testing.assert_array_equal(train.apply(x, weights, state, r1)[0], y1)
    assert _max_diff(train.apply(x, weights, state, r2)[0], y1) > 1e-4
    with pytest.raises(ValueError, match="rng"):
        train.apply(x, weights, state, None)
    # eval: rotations from the state's key, no rng needed, no dropout. Train mode hashes with
    # the first of three keys split from its rng, so this eval state hashes like train(r1).
    ev = _layer("eval", **kw)
    same_hash = dict(state, hash_rng=jax.random.split(r1, 3)[0])
    y_ev, _ = ev.apply(x, weights, same_hash, None)
    np.testing.assert_array_equal(ev.apply(x, weights, same_hash, r2)[0], y_ev)
    assert _max_diff(y_ev, y1) > 1e-4  # only dropout differs
    no_dropout = _layer("eval", **{**kw, "attention_dropout": 0.0})
    np.testing.assert_array_equal(no_dropout.apply(x, weights, same_hash, None)[0], y_ev)
    assert _max_diff(ev.apply(x, weights, state, None)[0], y_ev) > 1e-4  # other rotations


def test_train_hashes_each_example_with_its_own_rotations(rng):
    # Two copies of one sequence in a batch: with rotations per example (trax's training) the
    # copies are hashed differently, so their outputs differ; with one set per head they agree.
    kw = dict(chunk_len=4, n_buckets=8, n_hashes=2, causal=True)
    per_example = _layer("train", **kw)
    shared = _layer("train", hash_per_example=False, **kw)
    weights, state = _init(per_example, rng, length=32)
    x = np.repeat(_normal(rng, 1, 32, D_MODEL), 2, axis=0)
    r = _key(rng)
    y_shared = shared.apply(x, weights, state, r)[0]
    np.testing.assert_allclose(y_shared[0], y_shared[1], atol=1e-6)
    y = per_example.apply(x, weights, state, r)[0]
    assert _max_diff(y[0], y[1]) > 1e-4
    # With one bucket, hashing is trivial: both policies compute the same function, in value
    # and in gradient.
    one = dict(kw, n_buckets=1, chunk_len=32)
    f = [jax.jit(jax.value_and_grad(
        lambda w, layer=layer: jnp.sum(layer.apply(x, w, state, r)[0] ** 2)))
         for layer in (_layer("train", **one), _layer("train", hash_per_example=False, **one))]
    (v1, g1), (v2, g2) = f[0](weights), f[1](weights)
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    for name in g1:
        assert _max_diff(g1[name], g2[name]) < 1e-4


def test_per_example_hashing_one_head_at_a_time(rng, monkeypatch):
    # The long-input path (one head at a time) hashes each example with the same keys as the
    # all-heads path: equal outputs and gradients.
    layer = _layer("train", causal=True, chunk_len=4, n_buckets=4, n_hashes=2)
    weights, state = _init(layer, rng, length=16)
    x, key = _normal(rng, 2, 16, D_MODEL), _key(rng)

    def loss(w):
        return jnp.sum(layer.apply(x, w, state, key)[0] ** 2)

    want = jax.value_and_grad(loss)(weights)
    monkeypatch.setattr(lsh, "_HEAD_LOOP_ROWS", 0)
    assert layer._projects_by_head(x)
    got = jax.value_and_grad(loss)(weights)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]), strict=True):
        assert _max_diff(a, b) < 1e-4


def test_jit_and_shapes(rng):
    # n_buckets='chunks': 50 tokens are 7 chunks of 8, so 8 buckets.
    layer = _layer(chunk_len=8, n_buckets="chunks", n_hashes=2, n_chunks_after=1,
                   n_heads=3, d_qk=8)
    weights, state = _init(layer, rng, length=50)
    assert weights["w_qk"].shape == (D_MODEL, 24) and weights["w_o"].shape == (12, D_MODEL)
    x = _normal(rng, 2, 50, D_MODEL)
    y, _ = jax.jit(lambda x: layer.apply(x, weights, state, None))(x)
    assert y.shape == x.shape and np.isfinite(y).all()
    assert layer.output_signature(ShapeDtype(x.shape), weights, state) == ShapeDtype(x.shape)
    short = x[:, :5]  # shorter than a chunk: one chunk of that length
    assert jax.eval_shape(lambda s: layer.apply(s, weights, state, None), short)[0].shape == (
        2, 5, D_MODEL)


def test_invalid_arguments(rng):
    with pytest.raises(ValueError, match="chunk_len"):
        LSHSelfAttention(chunk_len=0)
    with pytest.raises(ValueError, match="n_buckets"):
        LSHSelfAttention(n_buckets=5)
    with pytest.raises(ValueError, match="attention_dropout"):
        LSHSelfAttention(attention_dropout=1.0)
    with pytest.raises(ValueError, match="mode"):
        LSHSelfAttention(mode="decode")
    layer = _layer(use_mask=True)
    weights, state = _init(layer, rng)
    with pytest.raises(ValueError, match="last axis"):
        layer.apply((jnp.zeros((2, 16, 5)), jnp.ones((2, 16))), weights, state, None)
    with pytest.raises(ValueError, match="mask"):
        layer.apply((jnp.zeros((2, 16, D_MODEL)), jnp.ones((2, 15))), weights, state, None)
    with pytest.raises(ValueError, match="2 inputs"):
        layer.apply(jnp.zeros((2, 16, D_MODEL)), weights, state, None)
    with pytest.raises(ValueError, match="qk and v"):
        lsh_attention(jnp.zeros((1, 8, 4)), jnp.zeros((1, 8, 4)), _key(rng))
    with pytest.raises(ValueError, match="rng"):
        lsh_attention(jnp.zeros((1, 1, 8, 4)), jnp.zeros((1, 1, 8, 4)))
    with pytest.raises(ValueError, match="dropout_rng"):
        lsh_attention(jnp.zeros((1, 1, 8, 4)), jnp.zeros((1, 1, 8, 4)), _key(rng),
                      dropout_rate=0.1)


def test_subclass_can_replace_projections(rng):
    class NoValueProjection(LSHSelfAttention):
        """Values are the inputs themselves (n_heads * d_v = d_model)."""

        def init_projections(self, d_model, rng):
            weights = super().init_projections(d_model, rng)
            del weights["w_v"]
            return weights

        def project_qk_v(self, x, weights):
            qk = jnp.dot(x, weights["w_qk"])
            return self._split_heads(qk, self.d_qk), self._split_heads(x, self.d_v)

    layer = NoValueProjection(chunk_len=16, n_buckets=1, mode="eval", **HEADS)
    weights, state = _init(layer, rng)
    assert "w_v" not in weights
    x = _normal(rng, 2, 16, D_MODEL)
    y, _ = layer.apply(x, weights, state, None)
    assert _max_diff(y, layer_reference(layer, x, weights, False)) < TOL


# -- predict mode ---------------------------------------------------------------------------------
def _predict_pair(rng, **kw):
    """An eval and a predict layer with the same weights and hash key."""
    ev, pr = _layer("eval", causal=True, **kw), _layer("predict", causal=True, **kw)
    key = _key(rng)
    weights, state = ev.init(ShapeDtype((2, 16, D_MODEL)), key)
    _, pstate = pr.init(ShapeDtype((2, 1, D_MODEL)), key)
    return ev, pr, weights, state, pstate


def _feed(pr, weights, pstate, x, sizes):
    step = jax.jit(lambda x, s: pr.apply(x, weights, s, None))
    ys, t = [], 0
    for n in sizes:
        y, pstate = step(x[:, t : t + n], pstate)
        ys.append(y)
        t += n
    return np.concatenate(ys, axis=1), pstate


def _bucket_reference(layer, x, weights, state, seen, capacity=None):
    """The predict-mode rule: per round, a query sees the `seen[t]` keys in its own bucket (the
    last `capacity` of them when given)."""
    qk, v = layer.project_qk_v(jnp.asarray(x), weights)
    n_buckets = layer.n_buckets
    rot = random_rotations(state["hash_rng"], layer.d_qk, n_buckets, layer.n_hashes,
                           layer.n_heads)
    buckets = np.asarray(hash_vectors(qk, n_buckets, rotations=rot))  # (B, H, R, L)
    length = x.shape[1]
    window = np.zeros(buckets.shape + (length,), bool)
    for t in range(length):
        window[..., t, seen[t]] = buckets[..., seen[t]] == buckets[..., t : t + 1]
    if capacity is not None:  # count the allowed keys from the newest back
        newer = np.cumsum(window[..., ::-1], axis=-1)[..., ::-1]
        window &= newer <= capacity
    o, _ = dense_reference(qk, v, window, np.ones(x.shape[:2], bool), True, layer.qk_scale)
    return layer.project_output(o, weights)


def test_predict_one_token_at_a_time_equals_eval(rng):
    ev, pr, weights, state, pstate = _predict_pair(
        rng, chunk_len=16, n_buckets=1, n_hashes=2, predict_mem_len=32)
    x = _normal(rng, 2, 14, D_MODEL)
    y_eval, _ = ev.apply(x, weights, state, None)
    y_tok, s = _feed(pr, weights, pstate, x, [1] * 14)
    assert _max_diff(y_tok, y_eval) < TOL
    assert int(s["pos"]) == 14 and int(s["fill"]) == 14
    y_mix, _ = _feed(pr, weights, pstate, x, [6] + [1] * 8)  # a prompt, then tokens
    assert _max_diff(y_mix, y_eval) < TOL


def test_predict_with_buckets_matches_bucket_reference(rng):
    _, pr, weights, _, pstate = _predict_pair(
        rng, chunk_len=4, n_buckets=4, n_hashes=2, predict_mem_len=16)
    x = _normal(rng, 2, 12, D_MODEL)
    y_tok, _ = _feed(pr, weights, pstate, x, [1] * 12)
    want = _bucket_reference(pr, x, weights, pstate, [np.arange(t + 1) for t in range(12)])
    assert _max_diff(y_tok, want) < TOL
    # After a first call, calls of several tokens scan the whole cache by the same rule.
    y_chunks, _ = _feed(pr, weights, pstate, x, [1, 5, 6])
    assert _max_diff(y_chunks, y_tok) < TOL


def test_predict_prompt_is_the_eval_forward_then_own_bucket(rng):
    """A prompt on an empty cache reads as eval does (chunk windows, not buckets); the tokens
    after it follow the own-bucket rule, and the caches it leaves equal token-by-token ones."""
    ev, pr, weights, state, pstate = _predict_pair(
        rng, chunk_len=4, n_buckets=4, n_hashes=2, predict_mem_len=16)
    x = _normal(rng, 2, 11, D_MODEL)
    y, s_prompt = _feed(pr, weights, pstate, x, [7] + [1] * 4)
    y_eval, _ = ev.apply(x[:, :7], weights, state, None)
    assert _max_diff(y[:, :7], y_eval) < TOL
    want = _bucket_reference(pr, x, weights, pstate, [np.arange(t + 1) for t in range(11)])
    assert _max_diff(y[:, 7:], want[:, 7:]) < TOL
    y_eager, _ = pr.apply(x[:, :7], weights, pstate, None)  # fill concrete: no lax.cond
    assert _max_diff(y_eager, y_eval) < TOL
    _, s_tok = _feed(pr, weights, pstate, x, [1] * 11)
    for name in ("k_mem", "v_mem", "buckets", "valid", "bucket_index", "bucket_count", "fill"):
        assert _max_diff(s_prompt[name], s_tok[name]) < 1e-6, name


@pytest.mark.parametrize("drop_len", [0, 3])
def test_predict_bucket_index_forgets_the_oldest_beyond_capacity(rng, drop_len):
    """With 2 buckets and room for 3 keys each, a decoding query sees the last 3 cached keys
    of its bucket; old positions leaving the cache leave the index too."""
    _, pr, weights, _, pstate = _predict_pair(
        rng, chunk_len=4, n_buckets=2, n_hashes=2, predict_mem_len=8 if drop_len else 16,
        predict_drop_len=drop_len, predict_bucket_capacity=3)
    x = _normal(rng, 2, 14, D_MODEL)
    y_tok, _ = _feed(pr, weights, pstate, x, [1] * 14)
    seen, memory = [], []
    for t in range(14):
        if drop_len and len(memory) + 1 > 8:
            memory = memory[drop_len:]
        memory.append(t)
        seen.append(np.array(memory))
    want = _bucket_reference(pr, x, weights, pstate, seen, capacity=3)
    assert _max_diff(y_tok, want) < TOL


def test_predict_attention_blocks_of_queries(rng):
    b, h, r, t, m = 2, 2, 2, 7, 12
    q, k, v = _normal(rng, b, h, t, 4), _normal(rng, b, h, m, 4), _normal(rng, b, h, m, 3)
    qb, kb = rng.integers(0, 2, (b, h, r, t)), rng.integers(0, 2, (b, h, r, m))
    args = (q, qb, np.arange(t) + 3, k, v, kb, rng.random((b, m)) > 0.2, 0.5)
    whole = lsh._predict_attention(*args)
    assert _max_diff(lsh._predict_attention(*args, block=3), whole) < 1e-6  # a lax.map


def test_predict_drops_oldest_positions(rng):
    _, pr, weights, _, pstate = _predict_pair(
        rng, chunk_len=4, n_buckets=1, predict_mem_len=8, predict_drop_len=3)
    x = _normal(rng, 2, 15, D_MODEL)
    y_tok, s = _feed(pr, weights, pstate, x, [1] * 15)
    seen, memory = [], []
    for t in range(15):
        if len(memory) + 1 > 8:
            memory = memory[3:]
        memory.append(t)
        seen.append(np.array(memory))
    assert _max_diff(y_tok, _bucket_reference(pr, x, weights, pstate, seen)) < TOL
    assert int(s["pos"]) == 15 and int(s["fill"]) == len(memory)


def test_predict_errors(rng):
    _, pr, weights, _, pstate = _predict_pair(
        rng, chunk_len=4, n_buckets=1, predict_mem_len=8, predict_drop_len=0)
    x = _normal(rng, 2, 12, D_MODEL)
    with pytest.raises(ValueError, match="predict_mem_len"):
        pr.apply(x[:, :9], weights, pstate, None)
    step = jax.jit(lambda x, s: pr.apply(x, weights, s, None))
    y, s = step(x[:, :6], pstate)
    assert np.isfinite(y).all()
    with pytest.raises(ValueError, match="full"):
        pr.apply(x[:, 6:12], weights, s, None)
    y, _ = step(x[:, 6:12], s)
    assert np.isnan(y).all()  # under jit the overflow cannot raise, so it is made visible
    with pytest.raises(ValueError, match="batch"):
        pr.apply(x[:1, :1], weights, pstate, None)


def test_non_causal_predict_runs_the_eval_forward(rng):
    kw = dict(chunk_len=4, n_buckets=4, n_hashes=2)
    ev, pr = _layer("eval", **kw), _layer("predict", **kw)
    weights, state = _init(ev, rng)
    _, pstate = pr.init(ShapeDtype((2, 16, D_MODEL)), _key(rng))
    assert set(pstate) == {"hash_rng"}
    x = _normal(rng, 2, 16, D_MODEL)
    y_ev, _ = ev.apply(x, weights, state, None)
    y_pr, _ = pr.apply(x, weights, state, None)
    assert _max_diff(y_ev, y_pr) < 1e-6


# -- memory ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_backward_memory_grows_linearly_with_length(rng):
    layer = _layer("train", chunk_len=64, n_buckets=16, n_hashes=2, causal=True)
    weights, state = _init(layer, rng)

    def temp_bytes(length):
        def loss(w, x, r):
            return jnp.sum(layer.apply(x, w, state, r)[0] ** 2)

        x = jax.ShapeDtypeStruct((1, length, D_MODEL), jnp.float32)
        compiled = jax.jit(jax.grad(loss)).lower(weights, x, _key(rng)).compile()
        analysis = compiled.memory_analysis()
        if analysis is None:
            pytest.skip("memory_analysis is not available on this backend")
        return analysis.temp_size_in_bytes

    small, large = temp_bytes(4096), temp_bytes(8192)
    assert large / small < 2.6


def test_gather_rows_and_its_gradient(np_rng):
    groups, rounds, n, d = 2, 3, 7, 4
    x = jnp.asarray(np_rng.standard_normal((groups, n, d)).astype(np.float32))
    perm = np.stack([[np_rng.permutation(n) for _ in range(rounds)] for _ in range(groups)])
    perm = jnp.asarray(perm.astype(np.int32))
    inverse = lsh.inverse_permutation(perm)
    np.testing.assert_array_equal(
        jnp.take_along_axis(perm, inverse, axis=-1), np.broadcast_to(np.arange(n), perm.shape))
    out = lsh.gather_rows(x, perm, inverse)
    np.testing.assert_array_equal(out, jnp.take_along_axis(x[:, None], perm[..., None], axis=2))
    weights = jnp.asarray(np_rng.standard_normal(out.shape).astype(np.float32))
    got = jax.grad(lambda x: jnp.sum(lsh.gather_rows(x, perm, inverse) * weights))(x)
    want = jax.grad(
        lambda x: jnp.sum(jnp.take_along_axis(x[:, None], perm[..., None], axis=2) * weights))(x)
    np.testing.assert_allclose(got, want, atol=1e-5)
