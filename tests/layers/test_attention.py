"""Dense and chunked attention against a plain softmax(QKᵀ)V reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from terraformer.layers.attention import CausalAttention, SelfAttention
from terraformer.shapes import ShapeDtype


def _reference(x, w, n_heads, causal, allowed_fn=None, bias=False):
    """Plain multi-head attention written with numpy, one head at a time."""
    x = np.asarray(x, np.float64)
    q, k, v = (x @ np.asarray(w[n], np.float64) for n in ("wq", "wk", "wv"))
    if bias:
        q, k, v = (a + np.asarray(w[n]) for a, n in zip((q, k, v), ("bq", "bk", "bv")))
    b, length, _ = x.shape
    d, d_v = q.shape[-1] // n_heads, v.shape[-1] // n_heads
    out = np.zeros((b, length, v.shape[-1]))
    allowed = np.ones((length, length), bool)
    if causal:
        allowed &= np.tril(np.ones((length, length), bool))
    if allowed_fn is not None:
        allowed &= allowed_fn(np.arange(length)[:, None], np.arange(length)[None, :])
    for h in range(n_heads):
        sl, sl_v = slice(h * d, (h + 1) * d), slice(h * d_v, (h + 1) * d_v)
        s = q[..., sl] @ k[..., sl].transpose(0, 2, 1) / np.sqrt(d)
        s = np.where(allowed, s, -1e30)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[..., sl_v] = p @ v[..., sl_v]
    y = out @ np.asarray(w["wo"], np.float64)
    return y + np.asarray(w["bo"]) if bias else y


@pytest.mark.parametrize("causal", [True, False])
def test_full_attention_matches_reference(np_rng, causal):
    x = jnp.asarray(np_rng.normal(size=(2, 11, 12)), jnp.float32)
    layer = SelfAttention(n_heads=3, d_qk=4, d_v=4, causal=causal, mode="eval")
    w, s = layer.init(ShapeDtype(x.shape), jax.random.PRNGKey(int(np_rng.integers(1 << 30))))
    y, _ = layer.apply(x, w, s, None)
    np.testing.assert_allclose(y, _reference(x, w, 3, causal), atol=1e-5)


def test_causal_attention_with_bias_matches_reference(np_rng):
    x = jnp.asarray(np_rng.normal(size=(2, 9, 8)), jnp.float32)
    layer = CausalAttention(8, n_heads=2, mode="eval")
    w, s = layer.init(ShapeDtype(x.shape))
    w = jax.tree.map(lambda a: a + 0.1 * jnp.asarray(np_rng.normal(size=a.shape), a.dtype), w)
    y, _ = layer.apply(x, w, s, None)
    np.testing.assert_allclose(y, _reference(x, w, 2, True, bias=True), atol=1e-5)


@pytest.mark.parametrize("chunk_len,before,after,causal,length", [
    (4, 1, 0, True, 16), (4, 1, 1, False, 16), (5, 2, 0, True, 23), (3, 0, 1, False, 10),
])
def test_chunked_attention_matches_masked_reference(np_rng, chunk_len, before, after, causal,
                                                    length):
    x = jnp.asarray(np_rng.normal(size=(2, length, 8)), jnp.float32)
    layer = SelfAttention(n_heads=2, d_qk=4, d_v=3, causal=causal, chunk_len=chunk_len,
                          n_chunks_before=before, n_chunks_after=after, mode="eval")
    w, s = layer.init(ShapeDtype(x.shape))
    y, _ = layer.apply(x, w, s, None)
    n_chunks = -(-length // chunk_len)
    offsets = np.arange(-before, after + 1) % n_chunks

    def window(qi, ki):
        """As trax: the window wraps round (chunk 0 looks back at the last chunk)."""
        return np.isin((ki // chunk_len - qi // chunk_len) % n_chunks, offsets)

    np.testing.assert_allclose(y, _reference(x, w, 2, causal, window), atol=1e-5)


def test_local_attention_without_wrap_masks_chunks_outside(np_rng):
    """wrap=False: the first chunk sees no chunk before it, the last none after it."""
    from terraformer.layers.attention import local_attention

    q, k, v = (np_rng.normal(size=(1, 1, 12, 4)).astype(np.float32) for _ in range(3))
    y = np.asarray(local_attention(*map(jnp.asarray, (q, k, v)), 4, 1, 1, False, wrap=False))
    chunk = np.arange(12) // 4
    allowed = np.abs(chunk[:, None] - chunk[None, :]) <= 1
    s = np.where(allowed, q[0, 0] @ k[0, 0].T / 2.0, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    np.testing.assert_allclose(y[0, 0], (p / p.sum(-1, keepdims=True)) @ v[0, 0], atol=1e-5)


def test_causal_attention_never_looks_ahead(np_rng):
    x = np_rng.normal(size=(1, 12, 8)).astype(np.float32)
    layer = CausalAttention(8, n_heads=2, mode="eval")
    w, s = layer.init(ShapeDtype(x.shape))
    t = int(np_rng.integers(0, 11))
    x2 = x.copy()
    x2[:, t + 1 :] += np_rng.normal(size=x2[:, t + 1 :].shape).astype(np.float32)
    y1, _ = layer.apply(jnp.asarray(x), w, s, None)
    y2, _ = layer.apply(jnp.asarray(x2), w, s, None)
    np.testing.assert_allclose(y1[:, : t + 1], y2[:, : t + 1], atol=1e-6)
    assert not np.allclose(y1[:, t + 1 :], y2[:, t + 1 :])


def test_padding_mask_hides_padded_keys(np_rng):
    x = np_rng.normal(size=(2, 10, 8)).astype(np.float32)
    mask = np.ones((2, 10), bool)
    mask[:, 7:] = False
    layer = SelfAttention(n_heads=2, d_qk=4, d_v=4, masked=True, chunk_len=4,
                          n_chunks_before=1, n_chunks_after=1, mode="eval")
    w, s = layer.init((ShapeDtype(x.shape), ShapeDtype(mask.shape, bool)))
    x2 = x.copy()
    x2[:, 7:] = np_rng.normal(size=(2, 3, 8))
    (y1, _), _ = layer.apply((jnp.asarray(x), jnp.asarray(mask)), w, s, None)
    (y2, _), _ = layer.apply((jnp.asarray(x2), jnp.asarray(mask)), w, s, None)
    np.testing.assert_allclose(y1[:, :7], y2[:, :7], atol=1e-6)


@pytest.mark.parametrize("chunk_len,mem_len", [(None, 32), (4, 12), (5, 10)])
def test_predict_one_token_at_a_time_equals_eval(np_rng, chunk_len, mem_len):
    x = jnp.asarray(np_rng.normal(size=(2, 20, 8)), jnp.float32)
    kwargs = dict(n_heads=2, d_qk=4, d_v=4, causal=True, chunk_len=chunk_len,
                  n_chunks_before=1)
    full = SelfAttention(mode="eval", **kwargs)
    w, s = full.init(ShapeDtype(x.shape))
    want, _ = full.apply(x, w, s, None)
    step = SelfAttention(mode="predict", predict_mem_len=mem_len, **kwargs)
    _, state = step.init(ShapeDtype((2, 1, 8)))
    apply = jax.jit(step.apply)
    outs = []
    for t in range(20):
        y, state = apply(x[:, t : t + 1], w, state, None)
        outs.append(y)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), want, atol=1e-5)
    # Prefill in two chunks, then continue token by token: same outputs.
    _, state = step.init(ShapeDtype((2, 1, 8)))
    a, state = step.apply(x[:, :6], w, state, None)
    b, state = step.apply(x[:, 6:10], w, state, None)
    c, state = step.apply(x[:, 10:11], w, state, None)
    np.testing.assert_allclose(jnp.concatenate([a, b, c], 1), want[:, :11], atol=1e-5)


def test_predict_errors():
    with pytest.raises(ValueError, match="predict_mem_len"):
        SelfAttention(causal=True, chunk_len=8, n_chunks_before=1, mode="predict",
                      predict_mem_len=10)
    layer = SelfAttention(n_heads=1, d_qk=2, d_v=2, causal=True, mode="predict",
                          predict_mem_len=4)
    w, s = layer.init(ShapeDtype((1, 1, 4)))
    with pytest.raises(ValueError, match="exceed predict_mem_len=4"):
        layer.apply(jnp.ones((1, 5, 4)), w, s, None)
    with pytest.raises(ValueError, match="divisible"):
        CausalAttention(10, n_heads=3)


def test_attention_gradients_match_finite_differences(np_rng):
    from jax.test_util import check_grads

    x = jnp.asarray(np_rng.normal(size=(1, 8, 4)), jnp.float32)
    layer = SelfAttention(n_heads=2, d_qk=2, d_v=2, causal=True, chunk_len=4,
                          n_chunks_before=1, mode="eval")
    w, s = layer.init(ShapeDtype(x.shape))
    w64 = jax.tree.map(lambda a: a.astype(jnp.float64), w) if jax.config.x64_enabled else w
    check_grads(lambda xx, ww: layer.apply(xx, ww, s, None)[0], (x, w64), order=1,
                modes=["rev"], atol=5e-2, rtol=5e-2, eps=1e-2)


@pytest.mark.parametrize("chunk_len,mem_len", [(None, 21), (4, 12)])
def test_predict_cache_in_blocks_equals_eval(np_rng, monkeypatch, chunk_len, mem_len):
    """A cache of several blocks (visited with a running softmax) gives the eval outputs."""
    import terraformer.layers.kv_cache as kv_cache

    monkeypatch.setattr(kv_cache, "PREDICT_BLOCK_LEN", 4)
    monkeypatch.setattr(kv_cache, "DECODING_BLOCK_KEYS", 8)  # one token: blocks of 4 or 8
    x = jnp.asarray(np_rng.normal(size=(2, 20, 8)), jnp.float32)
    kwargs = dict(n_heads=2, d_qk=4, d_v=4, causal=True, chunk_len=chunk_len, n_chunks_before=1)
    w, s = SelfAttention(mode="eval", **kwargs).init(ShapeDtype(x.shape))
    want, _ = SelfAttention(mode="eval", **kwargs).apply(x, w, s, None)
    step = SelfAttention(mode="predict", predict_mem_len=mem_len, **kwargs)
    _, state = step.init(ShapeDtype((2, 1, 8)))
    assert state["k"].shape[2] % 4 == 0 and state["k"].shape[2] >= mem_len
    apply = jax.jit(step.apply)
    outs = []
    for t in range(20):
        y, state = apply(x[:, t : t + 1], w, state, None)
        outs.append(y)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), want, atol=1e-5)
    _, state = step.init(ShapeDtype((2, 1, 8)))
    a, state = step.apply(x[:, :7], w, state, None)
    b, state = step.apply(x[:, 7:8], w, state, None)
    np.testing.assert_allclose(jnp.concatenate([a, b], 1), want[:, :8], atol=1e-5)


def test_predict_sliding_window_beyond_mem_len(np_rng):
    """Past predict_mem_len, full attention sees exactly the last predict_mem_len positions."""
    x = jnp.asarray(np_rng.normal(size=(1, 14, 8)), jnp.float32)
    kwargs = dict(n_heads=2, d_qk=4, d_v=4, causal=True)
    layer = SelfAttention(mode="predict", predict_mem_len=5, **kwargs)
    w, state = layer.init(ShapeDtype((1, 1, 8)))
    apply = jax.jit(layer.apply)
    outs = []
    for t in range(14):
        y, state = apply(x[:, t : t + 1], w, state, None)
        outs.append(y)
    eval_layer = SelfAttention(mode="eval", **kwargs)
    for t in (4, 9, 13):  # the eval pass over the window ending at t, last position
        want, _ = eval_layer.apply(x[:, t - 4 : t + 1], w, (), None)
        np.testing.assert_allclose(outs[t][:, 0], want[:, -1], atol=1e-5)


def test_one_token_predict_step_updates_caches_in_place():
    """A compiled decoding step writes its keys/values into the caches without copying them.

    Reading a cache after updating it, or XLA:CPU's default copy insertion, makes every step
    copy each whole cache (see terraformer/runtime.py); the cost then grows with the context.
    """
    import re

    layer = SelfAttention(n_heads=2, d_qk=8, d_v=8, causal=True, mode="predict",
                          predict_mem_len=96)
    w, state = layer.init(ShapeDtype((1, 1, 16)))
    step = jax.jit(layer.apply, donate_argnums=(2,))
    hlo = step.lower(jnp.ones((1, 1, 16)), w, state, None).compile().as_text()
    cache_shape = ",".join(str(n) for n in state["k"].shape)
    copies = re.findall(rf"= f32\[{cache_shape}\]\S* copy\(", hlo)
    assert not copies, f"{len(copies)} copies of a [{cache_shape}] cache per step"
