"""BigBird attention against dense softmax attention restricted to its pattern."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from terraformer.layers.attention import merge_heads, split_heads
from terraformer.layers.attention_core import dot_product_attention
from terraformer.layers.efficient.bigbird import BigBirdAttention
from terraformer.shapes import ShapeDtype


def pattern(length, block, window, n_global, table, causal):
    """Per head: window blocks, global blocks (keys and queries), the table's random blocks."""
    i, j = np.arange(length)[:, None], np.arange(length)[None, :]
    g = n_global * block
    base = (np.abs(i // block - j // block) <= window) | (j < g) | (i < g)
    allowed = np.repeat(base[None], table.shape[0], axis=0)
    for h, qb, r in zip(*np.nonzero(table >= 0)):
        allowed[h, qb * block:(qb + 1) * block, table[h, qb, r] * block:
                (table[h, qb, r] + 1) * block] = True
    return allowed & (j <= i) if causal else allowed


def check_table(table, n_blocks, window, n_global, causal):
    """Random blocks are distinct, outside the window and the global blocks, and (causal)
    before the window."""
    for h in range(table.shape[0]):
        for i in range(n_blocks):
            picked = [b for b in table[h, i] if b >= 0]
            assert len(set(picked)) == len(picked)
            for b in picked:
                assert b >= n_global and abs(b - i) > window and (b < i or not causal)


def dense(x, w, n_heads, allowed, mask=None):
    q, k, v = (split_heads(x @ w[n], n_heads) for n in ("wq", "wk", "wv"))
    allowed = jnp.asarray(allowed)
    if mask is not None:
        allowed = allowed & mask[:, None, None, :]
    return merge_heads(dot_product_attention(q, k, v, allowed)) @ w["wo"]


def build(np_rng, shape, **kw):
    layer = BigBirdAttention(n_heads=2, d_qk=4, d_v=3, seed=int(np_rng.integers(1 << 20)), **kw)
    sig = ShapeDtype(shape)
    w, s = layer.init((sig, ShapeDtype(shape[:2], bool)) if kw.get("masked") else sig,
                      jax.random.PRNGKey(int(np_rng.integers(1 << 30))))
    return layer, w, s


@pytest.mark.parametrize("causal", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_equals_dense_attention_on_the_pattern(np_rng, causal):
    # 38 positions in 10 blocks of 4 (the last one padded).
    x = jnp.asarray(np_rng.normal(size=(2, 38, 8)), jnp.float32)
    mask = None if causal else jnp.asarray(np_rng.random((2, 38)) < 0.8).at[:, 0].set(True)
    knobs = dict(block_len=4, n_window_blocks=1, n_global_blocks=1, n_random_blocks=2)
    layer, w, s = build(np_rng, x.shape, causal=causal, mode="eval", masked=mask is not None,
                        **knobs)
    table = layer.random_blocks(10)
    check_table(table, 10, 1, 1, causal)
    assert (table >= 0).sum() > 0

    allowed = pattern(38, 4, 1, 1, table, causal)

    @jax.jit
    def run(x, mask, w):  # one compile for the layer and its reference
        y, _ = layer.apply(x if mask is None else (x, mask), w, s, None)
        return (y if mask is None else y[0]), dense(x, w, 2, allowed, mask)

    y, expected = run(x, mask, w)
    np.testing.assert_allclose(y, expected, atol=2e-5)
    # The choice is the seed's: a layer built again picks the same blocks.
    again = BigBirdAttention(n_heads=2, causal=causal, seed=layer.seed, **knobs)
    np.testing.assert_array_equal(again.random_blocks(10), table)


@pytest.mark.slow
def test_causal_never_looks_ahead_and_decodes_like_eval(np_rng):
    x = np_rng.normal(size=(1, 20, 8)).astype(np.float32)
    knobs = dict(block_len=2, n_window_blocks=1, n_global_blocks=1, n_random_blocks=2,
                 causal=True)
    layer, w, s = build(np_rng, x.shape, mode="eval", **knobs)
    apply = jax.jit(layer.apply)
    y, _ = apply(jnp.asarray(x), w, s, None)
    t = int(np_rng.integers(0, 19))
    x2 = x.copy()
    x2[:, t + 1:] += np_rng.normal(size=x2[:, t + 1:].shape).astype(np.float32)
    y2, _ = apply(jnp.asarray(x2), w, s, None)
    np.testing.assert_allclose(y2[:, :t + 1], y[:, :t + 1], atol=1e-5)

    decoder = BigBirdAttention(n_heads=2, d_qk=4, d_v=3, mode="predict", predict_mem_len=24,
                               seed=layer.seed, **knobs)
    _, state0 = decoder.init(ShapeDtype((1, 1, 8)))
    step = jax.jit(decoder.apply)
    for pieces in ([1] * 20, [7, 1, 9, 3]):
        state, outs, at = state0, [], 0
        for n in pieces:
            out, state = step(jnp.asarray(x[:, at:at + n]), w, state, None)
            outs.append(out)
            at += n
        np.testing.assert_allclose(jnp.concatenate(outs, 1), y, atol=1e-5)


@pytest.mark.slow
def test_jit_grad_vmap(np_rng):
    x = jnp.asarray(np_rng.normal(size=(2, 24, 8)), jnp.float32)
    layer, w, s = build(np_rng, x.shape, block_len=4, n_window_blocks=1, n_global_blocks=1,
                        n_random_blocks=1, mode="eval")
    allowed = pattern(24, 4, 1, 1, layer.random_blocks(6), False)
    r = jnp.asarray(np_rng.normal(size=(2, 24, 8)), jnp.float32)

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
    (dict(n_random_blocks=-1), "n_random_blocks must be an int >= 0"),
    (dict(block_len=2.5), "block_len must be an int"),
    (dict(mode="predict"), "predict mode needs causal=True"),
])
def test_bad_knobs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BigBirdAttention(**kwargs)
