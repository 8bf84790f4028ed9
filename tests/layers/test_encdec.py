"""EncDecAttention, Cache and PaddingMask: a numpy reference, predict caches, reversible use."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from terraformer import layers as tl
from terraformer.layers.core import layer_norm
from terraformer.layers.encdec import Cache, EncDecAttention, PaddingMask
from terraformer.layers.reversible import ReversibleHalfResidual, ReversibleSerial
from terraformer.shapes import ShapeDtype


def _inputs(np_rng, batch=2, dec_len=5, enc_len=7, d=12, d_enc=10):
    x = np_rng.normal(size=(batch, dec_len, d)).astype(np.float32)
    enc = np_rng.normal(size=(batch, enc_len, d_enc)).astype(np.float32)
    mask = (np_rng.random((batch, enc_len)) < 0.7).astype(np.float32)
    mask[:, int(np_rng.integers(enc_len))] = 1.0  # at least one real position per row
    return jnp.asarray(x), jnp.asarray(enc), jnp.asarray(mask)


def _reference(x, enc, mask, w, n_heads):
    """Plain numpy multi-head cross attention, in float64."""
    x, enc, mask = (np.asarray(a, np.float64) for a in (x, enc, mask))
    w = {k: np.asarray(v, np.float64) for k, v in w.items()}
    b, ld, _ = x.shape
    le = enc.shape[1]
    q = (x @ w["wq"]).reshape(b, ld, n_heads, -1)
    k = (enc @ w["wk"]).reshape(b, le, n_heads, -1)
    v = (enc @ w["wv"]).reshape(b, le, n_heads, -1)
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(mask[:, None, None, :] > 0, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, ld, -1)
    return out @ w["wo"]


@pytest.mark.parametrize("q_chunk_len", [None, 2])
def test_matches_numpy_reference_and_passes_encoder_through(np_rng, seed, q_chunk_len):
    n_heads = int(np_rng.integers(1, 4))
    x, enc, mask = _inputs(np_rng)
    layer = EncDecAttention(n_heads=n_heads, d_qk=3, d_v=5, mode="eval", q_chunk_len=q_chunk_len)
    w, s = layer.init(tl.signature((x, enc, mask)), jax.random.PRNGKey(seed))
    assert w["wq"].shape == (12, 3 * n_heads) and w["wk"].shape == (10, 3 * n_heads)
    assert w["wv"].shape == (10, 5 * n_heads) and w["wo"].shape == (5 * n_heads, 12)
    (y, enc_out, mask_out), _ = layer.apply((x, enc, mask), w, s, None)
    np.testing.assert_allclose(y, _reference(x, enc, mask, w, n_heads), atol=1e-5, rtol=1e-5)
    assert enc_out is enc and mask_out is mask


def test_padding_is_never_attended(np_rng, seed):
    x, enc, mask = _inputs(np_rng)
    layer = EncDecAttention(n_heads=2, d_qk=4, d_v=4, mode="eval")
    w, s = layer.init(tl.signature((x, enc, mask)), jax.random.PRNGKey(seed))
    noise = jnp.asarray(np_rng.normal(size=enc.shape) * 10, jnp.float32)
    enc2 = jnp.where(mask[..., None] > 0, enc, noise)
    (y1, _, _), _ = layer.apply((x, enc, mask), w, s, None)
    (y2, _, _), _ = layer.apply((x, enc2, mask), w, s, None)
    np.testing.assert_allclose(y1, y2, atol=1e-5)


def test_predict_caches_encoder_keys_and_matches_eval(np_rng, seed):
    x, enc, mask = _inputs(np_rng, dec_len=6)
    key = jax.random.PRNGKey(seed)
    eval_layer = EncDecAttention(n_heads=2, d_qk=4, d_v=3, mode="eval")
    w, s = eval_layer.init(tl.signature((x, enc, mask)), key)
    (want, _, _), _ = eval_layer.apply((x, enc, mask), w, s, None)

    layer = EncDecAttention(n_heads=2, d_qk=4, d_v=3, mode="predict")
    sig = (ShapeDtype((2, 1, 12)), tl.signature(enc), tl.signature(mask))
    w_p, state = layer.init(sig, key)
    assert jax.tree.structure(w_p) == jax.tree.structure(w)
    assert state["k"].shape == (2, 2, 7, 4) and state["v"].shape == (2, 2, 7, 3)
    assert not bool(state["ready"])
    step = jax.jit(layer.apply)
    outs = []
    # First call: two positions with the real encoder; then one at a time with garbage
    # encoders, which a filled cache must ignore.
    (y, _, _), state = step((x[:, :2], enc, mask), w, state, None)
    outs.append(y)
    assert bool(state["ready"])
    k_cached = state["k"]
    for t in range(2, x.shape[1]):
        junk = jnp.asarray(np_rng.normal(size=enc.shape), jnp.float32)
        (y, _, _), state = step((x[:, t : t + 1], junk, jnp.zeros_like(mask)), w, state, None)
        outs.append(y)
    np.testing.assert_array_equal(state["k"], k_cached)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), want, atol=1e-5)


def test_predict_state_is_for_one_encoder_shape(np_rng):
    x, enc, mask = _inputs(np_rng)
    layer = EncDecAttention(n_heads=1, d_qk=4, d_v=4, mode="predict")
    w, state = layer.init(tl.signature((x, enc, mask)))
    with pytest.raises(ValueError, match="init the state"):
        layer.apply((x, enc[:, :-1], mask[:, :-1]), w, state, None)


def test_bad_shapes_and_arguments_raise(np_rng):
    x, enc, mask = _inputs(np_rng)
    layer = EncDecAttention(n_heads=2, d_qk=4, d_v=4, mode="eval")
    w, s = layer.init(tl.signature((x, enc, mask)))
    with pytest.raises(ValueError, match="encoder_mask"):
        layer.apply((x, enc, mask[:, :-1]), w, s, None)
    with pytest.raises(ValueError, match="last axis"):
        layer.apply((x[..., :-1], enc, mask), w, s, None)
    with pytest.raises(ValueError, match="n_heads"):
        EncDecAttention(n_heads=0)
    with pytest.raises(ValueError, match="attention_dropout"):
        EncDecAttention(attention_dropout=1.5)


def test_train_dropout_follows_rng(np_rng, seed):
    x, enc, mask = _inputs(np_rng)
    layer = EncDecAttention(n_heads=2, d_qk=4, d_v=4, attention_dropout=0.3,
                            output_dropout=0.2, mode="train")
    w, s = layer.init(tl.signature((x, enc, mask)), jax.random.PRNGKey(seed))
    # rbg keys: same semantics, and XLA:CPU compiles their draws far faster than threefry's.
    r1, r2 = (jax.random.key(seed + i, impl="unsafe_rbg") for i in (1, 2))
    apply = jax.jit(layer.apply)
    y_a = apply((x, enc, mask), w, s, r1)[0][0]
    y_b = apply((x, enc, mask), w, s, r1)[0][0]
    y_c = apply((x, enc, mask), w, s, r2)[0][0]
    np.testing.assert_array_equal(y_a, y_b)
    assert float(jnp.max(jnp.abs(y_a - y_c))) > 0
    (y_eval, _, _), _ = EncDecAttention(n_heads=2, d_qk=4, d_v=4, attention_dropout=0.3,
                                        output_dropout=0.2, mode="eval").apply(
        (x, enc, mask), w, s, None)
    np.testing.assert_allclose(y_eval, _reference(x, enc, mask, w, 2), atol=1e-5, rtol=1e-5)


def test_gradients_reach_every_weight_but_not_padding(np_rng, seed):
    x, enc, mask = _inputs(np_rng)
    layer = EncDecAttention(n_heads=2, d_qk=4, d_v=4, mode="train")
    w, s = layer.init(tl.signature((x, enc, mask)), jax.random.PRNGKey(seed))

    def loss(w, enc):
        return jnp.sum(jnp.sin(layer.apply((x, enc, mask), w, s, None)[0][0]))

    gw, genc = jax.jit(jax.grad(loss, argnums=(0, 1)))(w, enc)
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in gw.values())
    # Padded encoder positions get no gradient: nothing reads them.
    pad = np.asarray(mask) == 0
    assert float(jnp.max(jnp.abs(genc[pad]), initial=0.0)) == 0.0
    assert float(jnp.max(jnp.abs(genc[~pad]))) > 0


def test_in_a_reversible_half_residual_gradients_equal_the_plain_computation(np_rng, seed):
    """(x1, x2, enc, mask) -> (x1 + A(LN(x2), enc, mask), x2, enc, mask), reversibly."""
    x1, enc, mask = _inputs(np_rng, d=8, d_enc=6)
    x2 = jnp.asarray(np_rng.normal(size=x1.shape), jnp.float32)
    attention = EncDecAttention(n_heads=2, d_qk=4, d_v=4, mode="eval")
    block = ReversibleSerial(ReversibleHalfResidual(tl.LayerNorm(), attention))
    assert block.n_in == 4
    w, s = block.init(tl.signature((x1, x2, enc, mask)), jax.random.PRNGKey(seed))

    def rev_loss(w, x1, x2, enc):
        ys, _ = block.apply((x1, x2, enc, mask), w, s, None)
        return sum(jnp.sum(jnp.sin(y) * (i + 1)) for i, y in enumerate(ys[:3]))

    def plain_loss(w, x1, x2, enc):
        ln, att = w[0][0]
        (a, _, _), _ = attention.apply((layer_norm(x2, ln["scale"], ln["bias"]), enc,
                                        mask), att, (), None)
        ys = (x1 + a, x2, enc)
        return sum(jnp.sum(jnp.sin(y) * (i + 1)) for i, y in enumerate(ys))

    ys, _ = block.apply((x1, x2, enc, mask), w, s, None)
    assert ys[2] is enc or np.array_equal(ys[2], enc)
    g_rev = jax.jit(jax.grad(rev_loss, argnums=(0, 1, 2, 3)))(w, x1, x2, enc)
    g_plain = jax.jit(jax.grad(plain_loss, argnums=(0, 1, 2, 3)))(w, x1, x2, enc)
    for a, b in zip(jax.tree.leaves(g_rev), jax.tree.leaves(g_plain), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_in_a_plain_residual_the_encoder_stays_on_the_stack(np_rng):
    x, enc, mask = _inputs(np_rng)
    attention = EncDecAttention(n_heads=2, d_qk=4, d_v=4, mode="eval")
    residual = tl.Residual(tl.LayerNorm(), attention)
    assert (residual.n_in, residual.n_out) == (3, 3)
    w, s = residual.init(tl.signature((x, enc, mask)))
    (y, enc_out, mask_out), _ = residual.apply((x, enc, mask), w, s, None)
    assert y.shape == x.shape and enc_out is enc and mask_out is mask


def test_cache_runs_its_layer_once_in_predict_and_is_transparent_otherwise(np_rng, seed):
    inner = tl.Serial(tl.Dense(5), tl.Branch(tl.Relu(), tl.Tanh()))
    x = jnp.asarray(np_rng.normal(size=(2, 3, 4)), jnp.float32)
    key = jax.random.PRNGKey(seed)
    plain_w, plain_s = inner.init(tl.signature(x), key)
    for mode in ("train", "eval"):
        w, s = Cache(inner, mode=mode).init(tl.signature(x), key)
        assert jax.tree.structure(w) == jax.tree.structure(plain_w) and s == ((), ((), ()))
    cache = Cache(inner, mode="predict")
    assert (cache.n_in, cache.n_out) == (1, 2)
    w, state = cache.init(tl.signature(x), key)
    assert jax.tree.structure(w) == jax.tree.structure(plain_w)
    want, _ = inner.apply(x, w, plain_s, None)
    step = jax.jit(cache.apply)
    got, state = step(x, w, state, None)
    other = jnp.asarray(np_rng.normal(size=x.shape), jnp.float32)
    again, state = step(other, w, state, None)
    for a, b, c in zip(want, got, again, strict=True):
        np.testing.assert_allclose(b, a, atol=1e-6)
        np.testing.assert_array_equal(c, b)
    with pytest.raises(ValueError, match="init the state"):
        cache.apply(x[:, :2], w, state, None)


def test_padding_mask(np_rng):
    tokens = jnp.asarray(np_rng.integers(0, 3, size=(3, 9)), jnp.int32)
    mask, _ = PaddingMask().apply(tokens, (), (), None)
    np.testing.assert_array_equal(mask, (np.asarray(tokens) != 0).astype(np.float32))
    assert mask.dtype == jnp.float32
