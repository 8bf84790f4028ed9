"""Encoder-decoder Reformer and Terraformer: what each side sees, padding, predict, gradients."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from terraformer.layers.attention import CausalAttention, SelfAttention
from terraformer.layers.encdec import Cache, EncDecAttention
from terraformer.layers.lsh import LSHSelfAttention
from terraformer.layers.sparsity import SparseFF
from terraformer.models.encoder_decoder import Reformer, Terraformer
from terraformer.shapes import ShapeDtype

IN_VOCAB, OUT_VOCAB = 21, 13
ENC_LEN, DEC_LEN, BATCH = 16, 8, 2
SMALL = dict(d_model=16, d_ff=32, d_attention_key=4, d_attention_value=4, n_encoder_layers=2,
             n_decoder_layers=2, n_heads=2, max_len=32)


def _build(name, mode, dropout=0.0):
    kw = dict(SMALL, dropout=dropout, mode=mode)
    if name == "reformer":  # full encoder attention, local-attention decoder
        return Reformer(
            IN_VOCAB, OUT_VOCAB, encoder_attention_type=SelfAttention,
            attention_type=functools.partial(
                SelfAttention, chunk_len=4, n_chunks_before=1, predict_mem_len=16),
            **kw)
    if name == "terraformer":  # LSH encoder whose windows cover the input, sparse decoder
        return Terraformer(
            IN_VOCAB, OUT_VOCAB,
            encoder_attention_type=functools.partial(
                LSHSelfAttention, chunk_len=8, n_chunks_before=1, n_chunks_after=1,
                n_buckets=2, n_hashes=2),
            attention_sparsity=4, ff_sparsity=8, d_lowrank=4, **kw)
    if name == "reformer-lsh":  # sparse LSH encoder, one-bucket LSH decoder (slow tests)
        return Reformer(
            IN_VOCAB, OUT_VOCAB,
            encoder_attention_type=functools.partial(
                LSHSelfAttention, chunk_len=4, n_buckets=4, n_hashes=2),
            attention_type=functools.partial(
                LSHSelfAttention, chunk_len=64, n_buckets=1, n_hashes=2, predict_mem_len=64),
            output_merge="concatenate", **kw)
    raise KeyError(name)


def _signature(dec_len=DEC_LEN, enc_len=ENC_LEN):
    return (ShapeDtype((BATCH, enc_len), jnp.int32), ShapeDtype((BATCH, dec_len), jnp.int32))


@pytest.fixture(scope="module")
def module_seed():
    value = int(os.environ.get("TEST_SEED", np.random.SeedSequence().entropy % (2**31)))
    print(f"module seed={value}")
    return value


@pytest.fixture(scope="module")
def built(module_seed):
    """name -> (eval model, weights, state, jitted apply, init key), built once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            key = jax.random.PRNGKey(module_seed + len(cache))
            model = _build(name, "eval")
            weights, state = model.init(_signature(), key)
            cache[name] = (model, weights, state, jax.jit(model.apply), key)
        return cache[name]

    return get


def _inputs(np_rng):
    """Encoder tokens with 1-4 trailing pads (id 0), decoder tokens without pads."""
    enc = np_rng.integers(1, IN_VOCAB, size=(BATCH, ENC_LEN))
    n_real = ENC_LEN - int(np_rng.integers(1, 5))
    enc[:, n_real:] = 0
    dec = np_rng.integers(1, OUT_VOCAB, size=(BATCH, DEC_LEN))
    return enc.astype(np.int32), dec.astype(np.int32), n_real


def _other_token(tokens, vocab):
    return (tokens % (vocab - 1)) + 1  # a different non-pad token


@pytest.mark.parametrize("name, prefill", [
    ("reformer", 1),
    ("terraformer", 1),
    pytest.param("reformer-lsh", 3, marks=pytest.mark.slow),
])
def test_predict_one_token_at_a_time_reproduces_eval(np_rng, built, name, prefill):
    model, weights, state, apply, key = built(name)
    enc, dec, _ = _inputs(np_rng)
    want, _ = apply((enc, dec), weights, state, None)
    assert want.shape == (BATCH, DEC_LEN, OUT_VOCAB)

    decoder = _build(name, "predict")
    p_weights, p_state = decoder.init(_signature(dec_len=1), key)
    assert jax.tree.structure(p_weights) == jax.tree.structure(weights)
    step = jax.jit(decoder.apply)
    fed = np.concatenate([np.zeros((BATCH, 1), np.int32), dec[:, :-1]], axis=1)
    # `prefill` tokens first, then one at a time. After the first call the encoder tokens are
    # ignored (the encoder and the enc-dec keys are cached), so later calls pass junk.
    outs = []
    y, p_state = step((enc, fed[:, :prefill]), weights, p_state, None)
    outs.append(y)
    junk = np_rng.integers(0, IN_VOCAB, size=enc.shape).astype(np.int32)
    for t in range(prefill, DEC_LEN):
        y, p_state = step((junk, fed[:, t : t + 1]), weights, p_state, None)
        outs.append(y)
    got = jnp.concatenate(outs, axis=1)
    assert float(jnp.max(jnp.abs(got - want))) < 1e-4


@pytest.mark.parametrize("name", ["reformer", "terraformer"])
def test_decoder_sees_only_the_past(np_rng, built, name):
    _, weights, state, apply, _ = built(name)
    enc, dec, _ = _inputs(np_rng)
    t = int(np_rng.integers(0, DEC_LEN - 2))
    dec2 = dec.copy()
    dec2[:, t + 1 :] = _other_token(dec2[:, t + 1 :], OUT_VOCAB)
    y1, _ = apply((enc, dec), weights, state, None)
    y2, _ = apply((enc, dec2), weights, state, None)
    # Targets are shifted right: output s reads decoder tokens < s.
    np.testing.assert_allclose(y1[:, : t + 2], y2[:, : t + 2], atol=1e-5)
    assert float(jnp.max(jnp.abs(y1[:, t + 2 :] - y2[:, t + 2 :]))) > 1e-6


@pytest.mark.parametrize("name", ["reformer", "terraformer"])
def test_first_output_depends_on_the_last_input_token(np_rng, built, name):
    _, weights, state, apply, _ = built(name)
    enc, dec, n_real = _inputs(np_rng)
    enc2 = enc.copy()
    enc2[:, n_real - 1] = _other_token(enc2[:, n_real - 1], IN_VOCAB)
    y1, _ = apply((enc, dec), weights, state, None)
    y2, _ = apply((enc2, dec), weights, state, None)
    assert float(jnp.min(jnp.max(jnp.abs(y1[:, 0] - y2[:, 0]), axis=-1))) > 1e-6


@pytest.mark.parametrize("name", ["reformer"])
def test_encoder_is_bidirectional(np_rng, built, name):
    """The encoder alone: its first position changes with the last real input token."""
    model, weights, state, _, _ = built(name)
    encoder = model.sublayers[0]
    assert isinstance(encoder, Cache)
    enc, _, n_real = _inputs(np_rng)
    enc2 = enc.copy()
    enc2[:, n_real - 1] = _other_token(enc2[:, n_real - 1], IN_VOCAB)
    run = jax.jit(encoder.apply)
    (v1, m1), _ = run(jnp.asarray(enc), weights[0], state[0], None)
    (v2, _), _ = run(jnp.asarray(enc2), weights[0], state[0], None)
    assert v1.shape == (BATCH, ENC_LEN, SMALL["d_model"])
    np.testing.assert_array_equal(m1, (enc != 0).astype(np.float32))
    assert float(jnp.min(jnp.max(jnp.abs(v1[:, 0] - v2[:, 0]), axis=-1))) > 1e-6


def _with_pad_embedding(weights, np_rng):
    """`weights` with the encoder embedding's pad row (id 0) replaced by noise."""
    found = []

    def replace(path, leaf):
        if leaf.shape == (IN_VOCAB, SMALL["d_model"]):
            found.append(path)
            return leaf.at[0].set(jnp.asarray(np_rng.normal(size=leaf.shape[1:]) * 5))
        return leaf

    new = jax.tree_util.tree_map_with_path(replace, weights)
    assert len(found) == 1, found
    return new


@pytest.mark.parametrize("name", [
    "terraformer", pytest.param("reformer-lsh", marks=pytest.mark.slow)])
def test_padding_content_does_not_reach_the_outputs(np_rng, built, name):
    _, weights, state, apply, _ = built(name)
    enc, dec, _ = _inputs(np_rng)
    y1, _ = apply((enc, dec), weights, state, None)
    y2, _ = apply((enc, dec), _with_pad_embedding(weights, np_rng), state, None)
    np.testing.assert_allclose(y1, y2, atol=1e-5)


@pytest.mark.parametrize("name", ["reformer"])
def test_more_trailing_padding_changes_nothing(np_rng, built, name):
    _, weights, state, apply, _ = built(name)
    enc, dec, _ = _inputs(np_rng)
    extra = int(np_rng.integers(1, 6))
    longer = np.concatenate([enc, np.zeros((BATCH, extra), np.int32)], axis=1)
    y1, _ = apply((enc, dec), weights, state, None)
    y2, _ = jax.jit(_build(name, "eval").apply)((longer, dec), weights, state, None)
    np.testing.assert_allclose(y1, y2, atol=1e-5)


@pytest.mark.parametrize("name, dropout", [
    pytest.param("terraformer", 0.0, marks=pytest.mark.slow),
    pytest.param("reformer-lsh", 0.1, marks=pytest.mark.slow),
])
def test_gradients_reach_every_weight(np_rng, built, name, dropout):
    _, weights, _, _, key = built(name)
    model = _build(name, "train", dropout=dropout)
    _, state = model.init(_signature(), key)
    enc, dec, _ = _inputs(np_rng)
    rng = jax.random.PRNGKey(int(np_rng.integers(1 << 30)))

    def loss(w):
        log_probs, _ = model.apply((enc, dec), w, state, rng)
        return -jnp.mean(jnp.take_along_axis(log_probs, dec[..., None], axis=-1))

    value, grads = jax.jit(jax.value_and_grad(loss))(weights)
    assert np.isfinite(float(value))
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    dead = [jax.tree_util.keystr(p) for p, g in leaves
            if not np.all(np.isfinite(g)) or float(jnp.max(jnp.abs(g))) == 0.0]
    assert not dead, dead
    if name == "terraformer":
        assert any(isinstance(layer, SparseFF) for layer in _walk(model))
    assert any(isinstance(layer, EncDecAttention) for layer in _walk(model))


def _walk(layer):
    yield layer
    for sub in layer.sublayers:
        yield from _walk(sub)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="causal only"):
        Reformer(IN_VOCAB, encoder_attention_type=CausalAttention)
    with pytest.raises(ValueError, match="n_encoder_layers"):
        Reformer(IN_VOCAB, n_encoder_layers=-1)
    with pytest.raises(ValueError, match="output_merge"):
        Reformer(IN_VOCAB, output_merge="sum")
