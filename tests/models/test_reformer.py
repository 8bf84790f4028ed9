"""ReformerLM and TerraformerLM: predict mode against eval, causality, gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from terraformer.layers.attention import SelfAttention
from terraformer.layers.lsh import LSHSelfAttention
from terraformer.layers.sparsity import SparseFF
from terraformer.models import ReformerLM, TerraformerLM
from terraformer.shapes import ShapeDtype

VOCAB = 23


def _tokens(np_rng, length, batch=2):
    return jnp.asarray(np_rng.integers(1, VOCAB, size=(batch, length)), jnp.int32)


def _local(**kw):
    return functools.partial(SelfAttention, chunk_len=4, n_chunks_before=1, predict_mem_len=16,
                             **kw)


def _lsh_one_bucket(**kw):
    return functools.partial(LSHSelfAttention, chunk_len=64, n_buckets=1, n_hashes=2,
                             predict_mem_len=64, **kw)


def _models(mode):
    small = dict(d_model=16, d_ff=32, n_layers=2, n_heads=2, dropout=0.0, mode=mode)
    return {
        "reformer-local": ReformerLM(VOCAB, d_attention_key=4, d_attention_value=4,
                                     attention_type=_local(), pos_type="axial",
                                     pos_axial_shape=(4, 8), pos_d_axial_embs=(8, 8), **small),
        "reformer-lsh": ReformerLM(VOCAB, d_attention_key=4, d_attention_value=4,
                                   attention_type=_lsh_one_bucket(), max_len=32, **small),
        "reformer-mixed": ReformerLM(VOCAB, d_attention_key=4, d_attention_value=4,
                                     attention_type=[_local(), _lsh_one_bucket()], max_len=32,
                                     **small),
        "terraformer": TerraformerLM(VOCAB, attention_sparsity=4, ff_sparsity=8, d_lowrank=4,
                                     max_len=32, **small),
    }


@pytest.mark.parametrize("name", ["reformer-local", "reformer-lsh", "reformer-mixed",
                                  "terraformer"])
def test_predict_one_token_at_a_time_reproduces_eval(np_rng, name):
    key = jax.random.PRNGKey(int(np_rng.integers(1 << 30)))
    x = _tokens(np_rng, 20)
    model = _models("eval")[name]
    weights, state = model.init(ShapeDtype(x.shape, jnp.int32), key)
    want, _ = model.apply(x, weights, state, None)
    decoder = _models("predict")[name]
    _, pstate = decoder.init(ShapeDtype((2, 1), jnp.int32), key)
    step = jax.jit(decoder.apply)
    inputs = jnp.concatenate([jnp.zeros((2, 1), jnp.int32), x[:, :-1]], axis=1)
    outs = []
    for t in range(x.shape[1]):
        y, pstate = step(inputs[:, t : t + 1], weights, pstate, None)
        outs.append(y)
    got = jnp.concatenate(outs, axis=1)
    assert float(jnp.max(jnp.abs(got - want))) < 1e-4


@pytest.mark.parametrize("name", ["reformer-local", "terraformer"])
def test_never_looks_ahead(np_rng, name):
    model = _models("eval")[name]
    x = np.asarray(_tokens(np_rng, 16))
    weights, state = model.init(ShapeDtype(x.shape, jnp.int32))
    t = int(np_rng.integers(0, 14))
    x2 = x.copy()
    x2[:, t + 1 :] = (x2[:, t + 1 :] % (VOCAB - 1)) + 1
    y1, _ = model.apply(jnp.asarray(x), weights, state, None)
    y2, _ = model.apply(jnp.asarray(x2), weights, state, None)
    np.testing.assert_allclose(y1[:, : t + 2], y2[:, : t + 2], atol=1e-5)


@pytest.mark.slow  # an end-to-end training run
def test_terraformer_uses_sparse_feed_forward_and_trains(np_rng):
    model = _models("train")["terraformer"]
    assert "SparseFF" in repr(model) or any(
        isinstance(layer, SparseFF) for layer in _walk(model))
    x = _tokens(np_rng, 16)
    weights, state = model.init(ShapeDtype(x.shape, jnp.int32))

    def loss(w):
        y, _ = model.apply(x, w, state, jax.random.PRNGKey(0))
        return -jnp.mean(jnp.take_along_axis(y, x[..., None], -1))

    grads = jax.grad(loss)(weights)
    norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(norms)) and sum(n > 0 for n in norms) > 0.8 * len(norms)


def _walk(layer):
    yield layer
    for sub in layer.sublayers:
        yield from _walk(sub)


def test_axial_positions_must_cover_the_length(np_rng):
    model = _models("eval")["reformer-local"]
    x = _tokens(np_rng, 40)  # axial shape (4, 8) covers 32 positions
    weights, state = model.init(ShapeDtype((2, 32), jnp.int32))
    with pytest.raises(ValueError, match="32"):
        model.apply(x, weights, state, None)
