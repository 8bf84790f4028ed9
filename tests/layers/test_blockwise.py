"""Exact blockwise attention against full softmax attention, and its layer against SelfAttention.

References: `attention_core.dot_product_attention` with the same masks (values and JAX's
gradients of it), the dense `SelfAttention` with the same weights, and the eval forward pass
for predict mode. Inputs are fresh random draws (see conftest.py's `seed`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from terraformer.layers import attention as attention_lib
from terraformer.layers.attention import SelfAttention
from terraformer.layers.attention_core import dot_product_attention, position_mask
from terraformer.layers.attention_types import attention_constructor
from terraformer.layers.blockwise import BlockwiseAttention, blockwise_attention
from terraformer.shapes import ShapeDtype


def _normal(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape).astype(np.float32))


def _dense(q, k, v, key_mask, causal):
    """Full attention with every score materialised: [b, h, n_q, d_v]."""
    allowed = position_mask(jnp.arange(q.shape[-2]), jnp.arange(k.shape[-2]), causal)
    if key_mask is not None:
        allowed = allowed[None, None] & key_mask[:, None, None, :]
    return dot_product_attention(q, k, v, allowed)


# (causal, n_q, n_k, block_len): lengths that are and are not multiples of the block, cross
# attention (n_q != n_k), one block longer than the sequence.
CASES = [
    (True, 37, 37, 8),
    pytest.param(False, 13, 32, 8, marks=pytest.mark.slow),
    pytest.param(True, 32, 32, 8, marks=pytest.mark.slow),
    pytest.param(True, 6, 6, 16, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("causal,n_q,n_k,block_len", CASES)
def test_equals_full_attention_in_value_and_gradient(np_rng, causal, n_q, n_k, block_len):
    """Values and gradients, under jit, the blockwise form vmapped over the batch."""
    b, h, d_qk, d_v = 2, 3, 8, 5
    q, k, v = _normal(np_rng, b, h, n_q, d_qk), _normal(np_rng, b, h, n_k, d_qk), \
        _normal(np_rng, b, h, n_k, d_v)
    key_mask = np_rng.random((b, n_k)) > 0.3
    if causal:
        key_mask[0, :2] = False  # queries 0 and 1 of sequence 0 see no key at all
        key_mask[1] = True
    else:
        key_mask[1] = False  # no query of sequence 1 sees a key: uniform weights, as dense
    key_mask = jnp.asarray(key_mask)
    w = _normal(np_rng, b, h, n_q, d_v)

    def one_sequence(q, k, v, key_mask):
        return blockwise_attention(q, k, v, key_mask[None], causal=causal, block_len=block_len)

    def blockwise(q, k, v):
        return jax.vmap(one_sequence)(q, k, v, key_mask)

    def dense(q, k, v):
        return _dense(q, k, v, key_mask, causal)

    def value_and_gradients(fn, q, k, v):
        return fn(q, k, v), jax.grad(lambda *a: jnp.sum(fn(*a) * w), argnums=(0, 1, 2))(q, k, v)

    (got, got_grads), (want, want_grads) = jax.jit(lambda q, k, v: [
        value_and_gradients(blockwise, q, k, v), value_and_gradients(dense, q, k, v)])(q, k, v)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    for g, r in zip(got_grads, want_grads):
        np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_dropout_gradient_is_the_derivative_of_its_forward(np_rng):
    """With attention dropout (masks drawn per block pair from the rng), the custom backward
    equals the directional derivative of the same forward pass: <vjp(w), t> = <w, f'(x) t>."""
    q, k, v = (_normal(np_rng, 1, 2, 21, 4) for _ in range(3))
    rng = jax.random.PRNGKey(int(np_rng.integers(2**31)))

    @jax.jit
    def f(q, k, v):
        return blockwise_attention(q, k, v, causal=True, block_len=8, dropout_rate=0.3,
                                   dropout_rng=rng)

    out = f(q, k, v)
    # Same rng, same masks; and dropout did apply.
    assert np.allclose(out, f(q, k, v)) and not np.allclose(out, _dense(q, k, v, None, True))
    w = _normal(np_rng, *out.shape)
    grads = jax.jit(lambda q, k, v: jax.vjp(f, q, k, v)[1](w))(q, k, v)
    tangents = [_normal(np_rng, *a.shape) for a in (q, k, v)]
    eps = 1e-3
    plus = f(*(a + eps * t for a, t in zip((q, k, v), tangents)))
    minus = f(*(a - eps * t for a, t in zip((q, k, v), tangents)))
    directional = jnp.sum(w * (plus - minus)) / (2 * eps)
    predicted = sum(jnp.sum(g * t) for g, t in zip(grads, tangents))
    np.testing.assert_allclose(predicted, directional, rtol=2e-2)


def test_memory_grows_linearly_with_the_length():
    """The compiled gradient holds no length x length array: its temporaries at 4,096
    positions are a small fraction of the 64 MiB of one head's scores."""
    length = 4096
    shape = jax.ShapeDtypeStruct((1, 1, length, 8), jnp.float32)

    def loss(q, k, v):
        return jnp.sum(blockwise_attention(q, k, v, causal=True, block_len=256))

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(shape, shape, shape).compile()
    analysis = compiled.memory_analysis()
    assert analysis is not None
    assert analysis.temp_size_in_bytes < length * length * 4 // 16


def _layers(kind, **kwargs):
    common = dict(n_heads=2, d_qk=4, d_v=3, causal=True, **kwargs)
    if kind == "blockwise":
        return BlockwiseAttention(block_len=4, **common)
    return SelfAttention(**common)


def _predict_setup(np_rng):
    """(input, weights, the eval forward pass, a compiled predict step, its empty state)."""
    x = _normal(np_rng, 2, 9, 8)
    eval_layer = _layers("blockwise", mode="eval")
    w, s = eval_layer.init(ShapeDtype(x.shape), jax.random.PRNGKey(int(np_rng.integers(2**31))))
    want, _ = jax.jit(eval_layer.apply)(x, w, s, None)
    step = _layers("blockwise", mode="predict", predict_mem_len=16)
    _, state = step.init(ShapeDtype((2, 1, 8)))
    return x, w, want, jax.jit(step.apply), state


def test_predict_token_by_token_equals_eval(np_rng):
    x, w, want, apply, state = _predict_setup(np_rng)
    outs = []
    for t in range(x.shape[1]):
        y, state = apply(x[:, t : t + 1], w, state, None)
        outs.append(y)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), want, atol=1e-5)


@pytest.mark.slow
def test_predict_chunked_prefill_equals_eval(np_rng):
    """Several tokens per call, then one: the same outputs as the eval pass."""
    x, w, want, apply, state = _predict_setup(np_rng)
    parts = []
    for lo, hi in ((0, 4), (4, 8), (8, 9)):
        y, state = apply(x[:, lo:hi], w, state, None)
        parts.append(y)
    np.testing.assert_allclose(jnp.concatenate(parts, 1), want, atol=1e-5)


def test_self_attention_runs_blockwise_from_the_threshold(np_rng, monkeypatch):
    """From `blockwise_min_len` positions on (BLOCKWISE_MIN_LEN by default), SelfAttention (so
    CausalAttention) computes blockwise; it and BlockwiseAttention, padding mask and biases
    included, equal the layer that never does (`blockwise_min_len=None`) with the same
    weights, and the default threshold leaves 10 positions dense."""
    x = _normal(np_rng, 2, 10, 8)
    mask = jnp.asarray(np_rng.random((2, 10)) > 0.25)
    kwargs = dict(n_heads=2, d_qk=4, d_v=3, causal=True, masked=True, use_bias=True,
                  mode="eval")
    dense = SelfAttention(**kwargs, blockwise_min_len=None)
    w, s = dense.init((ShapeDtype(x.shape), ShapeDtype(mask.shape, bool)),
                      jax.random.PRNGKey(int(np_rng.integers(2**31))))
    w = jax.tree.map(lambda a: a + 0.1 * _normal(np_rng, *a.shape), w)
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs["block_len"])
        return blockwise_attention(*args, **kwargs)

    monkeypatch.setattr(attention_lib, "blockwise_attention", spy)
    monkeypatch.setattr(attention_lib, "BLOCKWISE_BLOCK_LEN", 4)
    layers = (dense, SelfAttention(**kwargs), SelfAttention(**kwargs, blockwise_min_len=10),
              BlockwiseAttention(block_len=3, **kwargs))
    want, *got = jax.jit(lambda w: [lyr.apply((x, mask), w, s, None)[0][0]
                                    for lyr in layers])(w)
    assert calls == [4, 3]  # None and the default threshold stay dense at 10 positions
    for y in got:
        np.testing.assert_allclose(y, want, atol=1e-5)
    assert layers[3].name == "BlockwiseAttention"
    with pytest.raises(ValueError, match="blockwise_min_len must be None"):
        SelfAttention(blockwise_min_len=0)


def test_registered_by_name():
    assert attention_constructor("blockwise") is BlockwiseAttention
    from terraformer.bench import build_parser

    args = build_parser().parse_args(["train", "--attention", "blockwise", "--seq_len", "64"])
    assert args.attention == "blockwise"


@pytest.mark.parametrize("build,match", [
    (lambda: BlockwiseAttention(block_len=0), "BlockwiseAttention: block_len must be an int >= 1"),
    (lambda: BlockwiseAttention(block_len=2.5), "block_len must be an int"),
    (lambda: BlockwiseAttention(n_heads=0), "n_heads must be an int >= 1"),
    (lambda: BlockwiseAttention(causal=False, mode="predict"), "predict mode needs causal=True"),
    (lambda: BlockwiseAttention(attention_dropout=1.0), "attention_dropout"),
    (lambda: blockwise_attention(jnp.ones((1, 4, 2)), jnp.ones((1, 4, 2)), jnp.ones((1, 4, 2)),
                                 block_len=0), "blockwise_attention: block_len"),
    (lambda: blockwise_attention(jnp.ones((1, 3, 2)), jnp.ones((1, 4, 2)), jnp.ones((1, 4, 2)),
                                 causal=True), "as many queries as keys"),
    (lambda: blockwise_attention(jnp.ones((1, 4, 2)), jnp.ones((1, 4, 2)), jnp.ones((1, 4, 2)),
                                 dropout_rate=0.1), "needs a dropout_rng"),
    (lambda: blockwise_attention(jnp.ones((1, 4, 2)), jnp.ones((1, 4, 3)), jnp.ones((1, 4, 2))),
     "expected q"),
])
def test_bad_knobs_give_one_line_errors(build, match):
    with pytest.raises(ValueError, match=match) as info:
        build()
    assert "\n" not in str(info.value)


def test_bench_dense_keeps_the_scores(monkeypatch):
    """`bench train --attention dense` is T-full's model without the blockwise path: at 4,096
    positions 'full' runs blockwise_attention and 'dense' does not."""
    from terraformer.bench import build_parser, t_workload_model

    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs["block_len"])
        return blockwise_attention(*args, **kwargs)

    monkeypatch.setattr(attention_lib, "blockwise_attention", spy)
    assert build_parser().parse_args(["train", "--attention", "dense"]).attention == "dense"
    tokens = ShapeDtype((1, 4096), jnp.int32)
    for name, blockwise in (("full", True), ("dense", False)):
        calls.clear()
        model = t_workload_model(4096, 1, name, mode="eval")
        w, s = jax.eval_shape(lambda m=model: m.init(tokens, jax.random.PRNGKey(0)))
        jax.eval_shape(lambda w, s, x, m=model: m.apply(x, w, s, None)[0], w, s,
                       jax.ShapeDtypeStruct(tokens.shape, jnp.int32))
        assert bool(calls) == blockwise, name
