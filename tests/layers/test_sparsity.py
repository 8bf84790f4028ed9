"""Tests of terraformer/layers/sparsity.py against plain references (fresh random inputs)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from terraformer.layers.base import EMPTY
from terraformer.layers.sparsity import (
    FactoredDense,
    LocallyConvDense,
    MultiplicativeConvCausalAttention,
    MultiplicativeModularSparseDense,
    SparseFF,
)


@pytest.fixture
def seed():
    s = int(np.random.default_rng().integers(2**31))
    print(f"seed={s}")  # shown by pytest on failure
    return s


def _normal(rng, shape, scale=1.0):
    return jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)


def _as_f64(tree):
    return jax.tree_util.tree_map(
        lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree
    )


# ------------------------------------------------------------------------------------------------
# SparseFF (shared sizes keep the number of XLA compilations, and so the test time, down)
# ------------------------------------------------------------------------------------------------

D_MODEL, D_FF, N_EL, D_LOWRANK = 16, 64, 8, 4
N_BLOCKS = D_FF // N_EL


def _ff(mode, **kwargs):
    # With our optional first-layer bias, so that these tests cover it (trax's has none).
    kwargs = {"n_elements_in_block": N_EL, "d_lowrank": D_LOWRANK, "first_layer_bias": True,
              **kwargs}
    return SparseFF(D_FF, mode=mode, **kwargs)


def _ff_setup(seed, shape=(2, 6, D_MODEL)):
    """Random input and SparseFF weights (biases made large enough to matter)."""
    rng = np.random.default_rng(seed)
    x = _normal(rng, shape)
    weights, state = _ff("eval").init(x, jax.random.PRNGKey(seed))
    weights = dict(weights, b1=_normal(rng, (D_FF,), 0.3), b2=_normal(rng, (D_MODEL,)))
    return rng, x, weights, state


def _sparse_ff_reference(x, w, n_el):
    """Dense FF in float64 with every unit the controller did not pick zeroed out."""
    x = np.asarray(x, np.float64)
    w = {k: np.asarray(v, np.float64) for k, v in w.items()}
    logits = x @ w["m1"] @ w["m2"] + w["mb"]
    d_ff = logits.shape[-1]
    logits = logits.reshape(x.shape[:-1] + (d_ff // n_el, n_el))
    chosen = np.argmax(logits, axis=-1)
    mask = (np.arange(n_el) == chosen[..., None]).reshape(x.shape[:-1] + (d_ff,))
    h = np.maximum(x @ w["w1"].T + w.get("b1", 0.0), 0.0) * mask
    return h @ w["w2"] + w["b2"]


def test_sparse_ff_shapes_and_weights(seed):
    _, x, weights, state = _ff_setup(seed)
    layer = _ff("eval")
    assert state == EMPTY
    assert layer.n_blocks == N_BLOCKS
    assert {k: v.shape for k, v in weights.items()} == {
        "m1": (D_MODEL, D_LOWRANK),
        "m2": (D_LOWRANK, D_FF),
        "mb": (D_FF,),
        "w1": (D_FF, D_MODEL),
        "b1": (D_FF,),
        "w2": (D_FF, D_MODEL),
        "b2": (D_MODEL,),
    }
    assert layer.apply(x, weights, state, None)[0].shape == x.shape
    assert layer.choices(x, weights).shape == x.shape[:-1] + (N_BLOCKS,)


def test_sparse_ff_has_no_first_layer_bias_by_default(seed):
    """trax's SparseFF: relu(x @ w1) without a bias; eval and predict both."""
    _, x, weights, state = _ff_setup(seed)
    del weights["b1"]
    layer = _ff("eval", first_layer_bias=False)
    assert set(layer.init(x, jax.random.PRNGKey(seed))[0]) == set(weights)
    y, _ = layer.apply(x, weights, state, None)
    np.testing.assert_allclose(y, _sparse_ff_reference(x, weights, N_EL), atol=2e-5, rtol=1e-5)
    y_pred, _ = _ff("predict", first_layer_bias=False).apply(x, weights, state, None)
    np.testing.assert_allclose(y_pred, y, atol=1e-5, rtol=0)


def test_sparse_ff_argument_errors(seed):
    with pytest.raises(ValueError, match="n_elements_in_block"):
        SparseFF(100, n_elements_in_block=32)
    with pytest.raises(ValueError, match="temperature"):
        SparseFF(64, temperature=0.0)
    with pytest.raises(ValueError, match="quant_prob"):
        SparseFF(64, quant_prob=1.5)
    with pytest.raises(ValueError, match="mode"):
        SparseFF(64, mode="decode")
    _, x, weights, state = _ff_setup(seed)
    with pytest.raises(ValueError, match="rng"):
        _ff("train").apply(x, weights, state, None)
    with pytest.raises(ValueError, match=f"last axis {D_MODEL}"):
        _ff("eval").apply(x[..., :-1], weights, state, None)


def test_sparse_ff_eval_matches_masked_dense_reference(seed):
    _, x, weights, state = _ff_setup(seed)
    y, _ = _ff("eval").apply(x, weights, state, None)
    np.testing.assert_allclose(y, _sparse_ff_reference(x, weights, N_EL), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [0, 4])
def test_sparse_ff_predict_gather_equals_eval(seed, chunk):
    _, x, weights, state = _ff_setup(seed)
    pred_layer = _ff("predict", ff_chunk_size=chunk)
    y_eval, _ = _ff("eval").apply(x, weights, state, None)
    y_pred, _ = pred_layer.apply(x, weights, state, None)
    np.testing.assert_allclose(y_pred, y_eval, atol=1e-5, rtol=0)
    # one token at a time (the layer is position-wise and stateless)
    step = jax.jit(pred_layer.apply)
    length = x.shape[1]
    y_steps = [step(x[:, t : t + 1], weights, state, None)[0] for t in range(length)]
    np.testing.assert_allclose(jnp.concatenate(y_steps, 1), y_eval, atol=1e-5, rtol=0)
    # weights packed for decoding (w1 and w2 as one table of rows): the same outputs, for
    # many tokens at once (batched products) and for one (matrix-vector products)
    packed = pred_layer.pack_for_decoding(weights, "float32")
    assert "w12" in packed and "w1" not in packed
    np.testing.assert_allclose(step(x, packed, state, None)[0], y_eval, atol=1e-5, rtol=0)
    y_one = [step(x[:1, t : t + 1], packed, state, None)[0] for t in range(length)]
    np.testing.assert_allclose(jnp.concatenate(y_one, 1), y_eval[:1], atol=1e-5, rtol=0)


def test_sparse_ff_predict_reads_only_chosen_rows(seed):
    """Rows of w1/b1/w2 of units the controller did not choose may be garbage (NaN)."""
    _, x, weights, state = _ff_setup(seed)
    x = x[:1, :1]  # one token
    layer = _ff("predict")
    y, _ = layer.apply(x, weights, state, None)
    ids = np.asarray(layer.choices(x, weights)).reshape(-1) + N_EL * np.arange(N_BLOCKS)
    unused = np.setdiff1d(np.arange(D_FF), ids)
    assert len(unused) == D_FF - N_BLOCKS
    poisoned = dict(weights)
    for name in ("w1", "b1", "w2"):
        poisoned[name] = np.asarray(weights[name]).copy()
        poisoned[name][unused] = np.nan
    y_poisoned, _ = layer.apply(x, poisoned, state, None)
    assert np.all(np.isfinite(y_poisoned))
    np.testing.assert_array_equal(y_poisoned, y)


def test_sparse_ff_chunked_equals_unchunked(seed):
    _, x, weights, state = _ff_setup(seed, shape=(2, 10, D_MODEL))  # 10 is not a multiple of 4
    np.testing.assert_allclose(
        _ff("eval", ff_chunk_size=4).apply(x, weights, state, None)[0],
        _ff("eval").apply(x, weights, state, None)[0],
        atol=1e-6,
    )


def test_sparse_ff_train_controller_gets_gradients(seed):
    rng, x, weights, state = _ff_setup(seed)
    target = _normal(rng, x.shape)
    for quant_prob in (0.0, 0.3, 1.0):
        layer = _ff("train", quant_prob=quant_prob, temperature=0.5)

        def loss(w, layer=layer):
            y, _ = layer.apply(x, w, state, jax.random.PRNGKey(seed + 1))
            return jnp.sum((y - target) ** 2)

        grads = jax.grad(loss)(weights)
        for name in ("m1", "m2", "mb", "w1", "b1", "w2", "b2"):
            g = np.asarray(grads[name])
            assert np.all(np.isfinite(g)), name
            assert np.abs(g).max() > 0, f"{name} got no gradient at quant_prob={quant_prob}"


def test_sparse_ff_train_rng_determinism_and_temperature(seed):
    _, x, weights, state = _ff_setup(seed)
    key = jax.random.PRNGKey(seed)

    def train_out(temperature, quant_prob, key=key):
        layer = _ff("train", temperature=temperature, quant_prob=quant_prob)
        return np.asarray(layer.apply(x, weights, state, key)[0])

    a = train_out(0.1, 0.3)
    np.testing.assert_array_equal(a, train_out(0.1, 0.3))  # same rng, same output
    assert not np.allclose(a, train_out(0.1, 0.3, jax.random.PRNGKey(seed + 1)))
    hard = train_out(0.1, 1.0)  # every token uses the one-hot (Gumbel-argmax) mask
    # quant_prob=1 values do not depend on the temperature (only their gradient does)
    np.testing.assert_allclose(train_out(3.0, 1.0), hard, atol=1e-6)
    # the soft mask tends to the one-hot mask as temperature -> 0 ...
    np.testing.assert_allclose(train_out(1e-6, 0.0), hard, atol=1e-4)
    # ... and is a real mixture at a high temperature
    assert np.abs(train_out(10.0, 0.0) - hard).max() > 1e-2


def test_sparse_ff_train_dropout(seed):
    _, x, weights, state = _ff_setup(seed)
    key = jax.random.PRNGKey(seed)
    y_plain = _ff("train", quant_prob=1.0).apply(x, weights, state, key)[0]
    y_drop = _ff("train", quant_prob=1.0, dropout_rate=0.5).apply(x, weights, state, key)[0]
    assert not np.allclose(y_drop, y_plain)
    np.testing.assert_array_equal(
        _ff("eval", dropout_rate=0.5).apply(x, weights, state, key)[0],
        _ff("eval").apply(x, weights, state, None)[0],
    )


def test_sparse_ff_bfloat16_options(seed):
    _, x, _, state = _ff_setup(seed)
    kwargs = {"use_bfloat16": True, "big_weights_in_bfloat16": True}
    w16, _ = _ff("eval", **kwargs).init(x, jax.random.PRNGKey(seed))
    assert w16["w1"].dtype == jnp.bfloat16 and w16["w2"].dtype == jnp.bfloat16
    assert w16["m1"].dtype == jnp.float32
    w32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), w16)
    y16 = _ff("eval", **kwargs).apply(x, w16, state, None)[0]
    assert y16.dtype == jnp.float32
    y32 = _ff("eval").apply(x, w32, state, None)[0]
    np.testing.assert_allclose(y16, y32, atol=5e-2, rtol=5e-2)
    y16_pred = _ff("predict", **kwargs).apply(x, w16, state, None)[0]
    np.testing.assert_allclose(y16_pred, y16, atol=5e-2, rtol=5e-2)


def test_sparse_ff_gradients_finite_differences(seed):
    """Soft mask (quant_prob=0) with a fixed rng is a smooth function: check its gradients."""
    _, x, weights, state = _ff_setup(seed, shape=(1, 2, D_MODEL))
    layer = _ff("train", temperature=1.0, quant_prob=0.0)
    with jax.enable_x64(True):
        key = jax.random.PRNGKey(seed + 1)

        def f(x, w):
            return layer.apply(x, w, state, key)[0]

        args = (x.astype(jnp.float64), _as_f64(weights))
        check_grads(jax.jit(f), args, order=1, modes=("rev",), eps=1e-6, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# FactoredDense and MultiplicativeModularSparseDense
# ------------------------------------------------------------------------------------------------


def test_multiplicative_dense_equals_full_matrix_and_loops(seed):
    rng = np.random.default_rng(seed)
    S, d_feature, d_in = 4, 12, 10
    M = d_feature // S
    x = _normal(rng, (2, 3, d_in))
    layer = FactoredDense(S, None, d_feature)
    weights, state = layer.init(x, jax.random.PRNGKey(seed))
    assert {k: v.shape for k, v in weights.items()} == {
        "D": (d_in, S),
        "E": (d_in, M),
        "b": (d_feature,),
    }
    assert sum(v.size for v in weights.values()) == d_in * (S + M) + d_feature
    weights = dict(weights, b=_normal(rng, (d_feature,)))
    y, _ = layer.apply(x, weights, state, None)
    D, E, b = (np.asarray(weights[k], np.float64) for k in "DEb")
    W = np.zeros((d_in, d_feature))
    for i in range(d_in):
        for s in range(S):
            for m in range(M):
                W[i, s * M + m] = D[i, s] * E[i, m]
    np.testing.assert_allclose(y, np.asarray(x, np.float64) @ W + b, atol=1e-5, rtol=1e-5)
    # one output entry by the explicit sum
    s, m = int(rng.integers(S)), int(rng.integers(M))
    xv = np.asarray(x[1, 2], np.float64)
    direct = sum(xv[i] * D[i, s] * E[i, m] for i in range(d_in)) + b[s * M + m]
    np.testing.assert_allclose(y[1, 2, s * M + m], direct, atol=1e-5, rtol=1e-5)
    # packed for decoding (D stored as rows): the same outputs
    y_packed, _ = layer.apply(x, layer.pack_for_decoding(weights, "float32"), state, None)
    np.testing.assert_allclose(y_packed, y, atol=1e-6, rtol=1e-6)


def test_multiplicative_dense_errors_and_no_bias():
    with pytest.raises(ValueError, match="multiple of n_modules"):
        FactoredDense(5, None, 12)
    with pytest.raises(ValueError, match="d_in=7"):
        FactoredDense(2, 7, 8).init(jnp.zeros((1, 6)))
    layer = FactoredDense(2, 6, 8, use_bias=False)
    w, _ = layer.init(jnp.zeros((1, 6)))
    assert set(w) == {"D", "E"}
    assert layer(jnp.zeros((3, 6))).shape == (3, 8)


def test_multiplicative_dense_gradients(seed):
    rng = np.random.default_rng(seed)
    layer = FactoredDense(2, None, 6)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(2, 5)))
        w, s = layer.init(jnp.zeros((2, 5), jnp.float32), jax.random.PRNGKey(seed))
        check_grads(
            jax.jit(lambda x, w: layer.apply(x, w, s, None)[0]),
            (x, _as_f64(w)),
            order=1,
            modes=("rev",),
            eps=1e-6,
            atol=1e-5,
            rtol=1e-5,
        )


# ------------------------------------------------------------------------------------------------
# LocallyConvDense
# ------------------------------------------------------------------------------------------------


def _conv_reference(x, w, b, n_modules):
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    b = np.asarray(b, np.float64)
    batch, length, d = x.shape
    lk, k, d_in, n_units = w.shape
    xm = x.reshape(batch, length, n_modules, d_in)
    y = np.zeros((batch, length, n_modules, n_units)) + b
    for t in range(length):
        for s in range(n_modules):
            for j in range(lk):
                for c in range(k):
                    tt, ss = t - j, s + c - (k - 1) // 2
                    if 0 <= tt and 0 <= ss < n_modules:
                        y[:, t, s] += xm[:, tt, ss] @ w[lk - 1 - j, c]
    return y.reshape(batch, length, n_modules * n_units)


@pytest.mark.parametrize("kernel_size,length_kernel_size", [(1, 1), (3, 3), (2, 4)])
def test_locally_conv_dense_matches_reference(seed, kernel_size, length_kernel_size):
    rng = np.random.default_rng(seed)
    n_modules, d_in, n_units = 4, 3, 5
    x = _normal(rng, (2, 6, n_modules * d_in))
    layer = LocallyConvDense(n_modules, n_units, kernel_size, length_kernel_size, mode="eval")
    w, s = layer.init(x, jax.random.PRNGKey(seed))
    assert w["w"].shape == (length_kernel_size, kernel_size, d_in, n_units)
    w = dict(w, b=_normal(rng, (n_units,)))
    y, _ = layer.apply(x, w, s, None)
    assert y.shape == (2, 6, n_modules * n_units)
    np.testing.assert_allclose(
        y, _conv_reference(x, w["w"], w["b"], n_modules), atol=1e-5, rtol=1e-5
    )


def test_locally_conv_dense_never_looks_ahead(seed):
    rng = np.random.default_rng(seed)
    x = _normal(rng, (2, 9, 8))
    layer = LocallyConvDense(4, 3, kernel_size=3, length_kernel_size=3, mode="eval")
    w, s = layer.init(x, jax.random.PRNGKey(seed))
    y = layer.apply(x, w, s, None)[0]
    t = int(rng.integers(0, 8))
    x2 = x.at[:, t + 1 :].add(_normal(rng, (2, 8 - t, 8)))
    y2 = layer.apply(x2, w, s, None)[0]
    np.testing.assert_array_equal(y2[:, : t + 1], y[:, : t + 1])
    assert not np.allclose(y2[:, t + 1 :], y[:, t + 1 :])


@pytest.mark.parametrize("pieces", [[1] * 7, [3, 1, 2, 1]])
def test_locally_conv_dense_predict_cache_reproduces_full(seed, pieces):
    rng = np.random.default_rng(seed)
    x = _normal(rng, (2, 7, 6))
    eval_layer = LocallyConvDense(3, 4, kernel_size=3, length_kernel_size=3, mode="eval")
    pred_layer = LocallyConvDense(3, 4, kernel_size=3, length_kernel_size=3, mode="predict")
    w, _ = eval_layer.init(x, jax.random.PRNGKey(seed))
    _, state = pred_layer.init(x[:, :1], jax.random.PRNGKey(seed))
    assert state.shape == (2, 2, 3, 2) and not np.any(state)
    y_full = eval_layer.apply(x, w, EMPTY, None)[0]
    step = jax.jit(pred_layer.apply)
    outs, t = [], 0
    for n in pieces:
        y, state = step(x[:, t : t + n], w, state, None)
        outs.append(y)
        t += n
    np.testing.assert_allclose(jnp.concatenate(outs, 1), y_full, atol=1e-5, rtol=0)


def test_locally_conv_dense_errors():
    with pytest.raises(ValueError, match="multiple of n_modules"):
        LocallyConvDense(4, 2).init(jnp.zeros((1, 3, 10)))
    with pytest.raises(ValueError, match="batch, length, features"):
        LocallyConvDense(2, 2).init(jnp.zeros((3, 10)))
    with pytest.raises(ValueError, match="kernel_size"):
        LocallyConvDense(2, 2, kernel_size=0)


def test_locally_conv_dense_gradients(seed):
    rng = np.random.default_rng(seed)
    layer = LocallyConvDense(2, 3, kernel_size=3, length_kernel_size=2, mode="eval")
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(1, 4, 4)))
        w, s = layer.init(jnp.zeros((1, 4, 4), jnp.float32), jax.random.PRNGKey(seed))
        check_grads(
            jax.jit(lambda x, w: layer.apply(x, w, s, None)[0]),
            (x, _as_f64(w)),
            order=1,
            modes=("rev",),
            eps=1e-6,
            atol=1e-5,
            rtol=1e-5,
        )


def test_modular_sparse_dense_equals_loops(seed):
    """Trax's MultiplicativeModularSparseDense: per module h, the input gated by multiplier[h],
    projected by kmult, then mixed by the module's own kmod[h]."""
    rng = np.random.default_rng(seed)
    S, d, d_in = 3, 6, 5
    M = d // S
    x = _normal(rng, (2, d_in))
    layer = MultiplicativeModularSparseDense(S, d)
    w, state = layer.init(x, jax.random.PRNGKey(seed))
    assert {k: v.shape for k, v in w.items()} == {
        "multiplier": (S, d_in), "kmult": (d_in, M), "kmod": (S, M, M), "b": (d,)}
    w = jax.tree.map(lambda a: _normal(rng, a.shape), w)
    y, _ = layer.apply(x, w, state, None)
    mult, kmult, kmod, b = (np.asarray(w[k], np.float64) for k in ("multiplier", "kmult",
                                                                     "kmod", "b"))
    xv = np.asarray(x, np.float64)
    ref = np.zeros((2, d))
    for n in range(2):
        for h in range(S):
            for o in range(M):
                ref[n, h * M + o] = b[h * M + o] + sum(
                    xv[n, i] * mult[h, i] * kmult[i, j] * kmod[h, j, o]
                    for i in range(d_in) for j in range(M))
    np.testing.assert_allclose(y, ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="multiple of sparsity"):
        MultiplicativeModularSparseDense(4, 6)


# ------------------------------------------------------------------------------------------------
# MultiplicativeConvCausalAttention
# ------------------------------------------------------------------------------------------------


def _attention_reference(x, weights, n_heads, sparsity, output_layer_type="none"):
    """Sublayers in eval mode, then plain causal softmax attention in float64 numpy."""
    w_mult, (w_q, w_k, w_v), _, *w_out = weights
    d_feature = w_mult["b"].shape[0]
    mult = FactoredDense(sparsity, None, d_feature)
    conv3 = LocallyConvDense(sparsity, d_feature // sparsity, 3, 3, mode="eval")
    conv1 = LocallyConvDense(sparsity, d_feature // sparsity, 1, 3, mode="eval")
    h = mult.apply(x, w_mult, EMPTY, None)[0]
    q, k, v = (np.asarray(conv.apply(h, w, EMPTY, None)[0], np.float64)
               for conv, w in ((conv3, w_q), (conv3, w_k), (conv1, w_v)))
    batch, length, _ = q.shape
    dh = d_feature // n_heads
    out = np.zeros_like(q)
    for hd in range(n_heads):
        sl = slice(hd * dh, (hd + 1) * dh)
        scores = np.einsum("bqd,bkd->bqk", q[..., sl], k[..., sl]) / np.sqrt(dh)
        scores = np.where(np.tril(np.ones((length, length), bool)), scores, -np.inf)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[..., sl] = p @ v[..., sl]
    if output_layer_type == "dense":
        return out @ np.asarray(w_out[0]["w"], np.float64) + np.asarray(w_out[0]["b"], np.float64)
    assert output_layer_type == "none" and not w_out
    return out


ATTN = {"d_feature": 8, "n_heads": 2, "sparsity": 4, "max_inference_length": 16}


def _attention_setup(seed, mode="eval", **kwargs):
    rng = np.random.default_rng(seed)
    x = _normal(rng, (2, 9, 12))
    layer = MultiplicativeConvCausalAttention(**{**ATTN, **kwargs}, mode=mode)
    weights, state = layer.init(x, jax.random.PRNGKey(seed))
    return rng, x, layer, weights, state


@pytest.mark.parametrize("output_layer_type", ["none", "dense"])
def test_conv_attention_matches_reference_and_is_causal(seed, output_layer_type):
    rng, x, layer, weights, state = _attention_setup(seed, output_layer_type=output_layer_type)
    y = layer.apply(x, weights, state, None)[0]
    assert y.shape == (2, 9, 8)
    np.testing.assert_allclose(y, _attention_reference(x, weights, 2, 4, output_layer_type),
                               atol=1e-5, rtol=1e-4)
    t = int(rng.integers(0, 8))
    x2 = x.at[:, t + 1 :].set(_normal(rng, (2, 8 - t, 12)))
    y2 = layer.apply(x2, weights, state, None)[0]
    np.testing.assert_allclose(y2[:, : t + 1], y[:, : t + 1], atol=1e-6, rtol=0)
    assert not np.allclose(y2[:, t + 1 :], y[:, t + 1 :])


@pytest.mark.parametrize("pieces,output_layer_type", [([1] * 9, "none"),
                                                      ([4, 1, 3, 1], "multconv")])
def test_conv_attention_predict_reproduces_eval(seed, pieces, output_layer_type):
    _, x, eval_layer, weights, eval_state = _attention_setup(
        seed, output_layer_type=output_layer_type)
    pred_layer = MultiplicativeConvCausalAttention(**ATTN, output_layer_type=output_layer_type,
                                                   mode="predict")
    _, state = pred_layer.init(x[:, :1], jax.random.PRNGKey(seed))
    y_eval = eval_layer.apply(x, weights, eval_state, None)[0]
    step = jax.jit(pred_layer.apply)
    outs, t = [], 0
    for n in pieces:
        y, state = step(x[:, t : t + n], weights, state, None)
        outs.append(y)
        t += n
    np.testing.assert_allclose(jnp.concatenate(outs, 1), y_eval, atol=1e-5, rtol=0)
    assert int(state[2]["pos"]) == 9
    with pytest.raises(ValueError, match="max_inference_length"):
        pred_layer.apply(x, weights, state, None)  # 9 + 9 > 16


def test_conv_attention_train_dropout_and_errors(seed):
    _, x, layer, weights, state = _attention_setup(seed, mode="train", dropout=0.5)
    k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    y1 = layer.apply(x, weights, state, k1)[0]
    np.testing.assert_array_equal(y1, layer.apply(x, weights, state, k1)[0])
    assert not np.allclose(y1, layer.apply(x, weights, state, k2)[0])
    with pytest.raises(ValueError, match="multiple of sparsity"):
        MultiplicativeConvCausalAttention(10, n_heads=2, sparsity=4)
    with pytest.raises(ValueError, match="multiple of n_heads"):
        MultiplicativeConvCausalAttention(10, n_heads=4, sparsity=2)
    with pytest.raises(ValueError, match="output_layer_type must be one of"):
        MultiplicativeConvCausalAttention(8, n_heads=2, output_layer_type="Dense")


def test_conv_attention_gradients(seed):
    rng = np.random.default_rng(seed)
    layer = MultiplicativeConvCausalAttention(4, n_heads=2, sparsity=2, mode="eval")
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(1, 3, 4)))
        w, s = layer.init(jnp.zeros((1, 3, 4), jnp.float32), jax.random.PRNGKey(seed))
        check_grads(
            jax.jit(lambda x, w: layer.apply(x, w, s, None)[0]),
            (x, _as_f64(w)),
            order=1,
            modes=("rev",),
            eps=1e-6,
            atol=1e-5,
            rtol=1e-5,
        )
