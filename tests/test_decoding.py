"""The decoding loop: prefill, greedy against the eval forward pass, sampling rules."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from terraformer.decoding import Decoder, Sampling, filter_logits, sample
from terraformer.models import TransformerLM
from terraformer.shapes import ShapeDtype

CFG = dict(vocab_size=17, d_model=16, d_ff=32, n_layers=2, n_heads=2, max_len=48, dropout=0.0)


@pytest.fixture(scope="module")
def trained_like():
    """An eval model with random weights, and a decoder over the same weights."""
    model = TransformerLM(mode="eval", **CFG)
    weights, state = model.init(ShapeDtype((1, 8), jnp.int32), jax.random.PRNGKey(7))
    return model, weights, state


def _decoder(weights, batch=2, prefill_chunk=4):
    return Decoder(TransformerLM(mode="predict", **CFG), weights, batch_size=batch,
                   prefill_chunk=prefill_chunk, max_len=CFG["max_len"])


@pytest.mark.slow
def test_greedy_equals_argmax_of_eval_forward(np_rng, trained_like):
    model, weights, state = trained_like
    prompt = np_rng.integers(1, CFG["vocab_size"], size=(2, int(np_rng.integers(1, 12))))
    out = _decoder(weights).generate(prompt, 10)
    seq = prompt.copy()
    for _ in range(10):
        log_probs, _ = model.apply(jnp.asarray(np.pad(seq, [(0, 0), (0, 1)])), weights, state,
                                   None)
        seq = np.concatenate([seq, np.argmax(log_probs[:, -1], -1)[:, None]], axis=1)
    np.testing.assert_array_equal(out, seq[:, prompt.shape[1]:])


def test_chunked_prefill_equals_token_by_token(np_rng, trained_like):
    _, weights, _ = trained_like
    prompt = np_rng.integers(1, CFG["vocab_size"], size=(2, 13))
    by_token = _decoder(weights, prefill_chunk=1).generate(prompt, 8)
    for chunk in (3, 5, 64):
        np.testing.assert_array_equal(_decoder(weights, prefill_chunk=chunk).generate(prompt, 8),
                                      by_token)


def test_same_seed_same_samples_and_streaming_matches(np_rng, trained_like):
    _, weights, _ = trained_like
    prompt = np_rng.integers(1, CFG["vocab_size"], size=(2, 5))
    dec = _decoder(weights)
    seed = int(np_rng.integers(1 << 20))
    a = dec.generate(prompt, 12, temperature=1.0, seed=seed)
    b = dec.generate(prompt, 12, temperature=1.0, seed=seed)
    np.testing.assert_array_equal(a, b)
    c = dec.generate(prompt, 12, temperature=1.0, seed=seed + 1)
    assert not np.array_equal(a, c)
    greedy = dec.generate(prompt, 12)
    streamed = np.concatenate(list(dec.stream(prompt, 12, block_size=5)), axis=1)
    np.testing.assert_array_equal(streamed, greedy)


def test_stop_tokens_end_sequences(np_rng, trained_like):
    _, weights, _ = trained_like
    prompt = np_rng.integers(1, CFG["vocab_size"], size=(2, 5))
    dec = _decoder(weights)
    free = dec.generate(prompt, 12)
    stop = int(free[0, 3])
    out = dec.generate(prompt, 12, stop_ids=[stop])
    first = int(np.argmax(out[0] == stop))
    np.testing.assert_array_equal(out[0, : first + 1], free[0, : first + 1])
    assert (out[0, first + 1 :] == 0).all()


def test_top_k_and_top_p_never_emit_excluded_tokens(np_rng):
    logits = jnp.asarray(np_rng.normal(size=(4, 30)) * 3, jnp.float32)
    log_probs = jax.nn.log_softmax(logits)
    k = int(np_rng.integers(1, 6))
    top = np.argsort(-np.asarray(logits), axis=-1)[:, :k]
    keys = jax.random.split(jax.random.PRNGKey(int(np_rng.integers(1 << 20))), 200)
    draws = np.stack([sample(log_probs, key, Sampling(1.0, top_k=k)) for key in keys[:100]])
    for row in range(4):
        assert set(draws[:, row]) <= set(top[row])
    p = float(np_rng.uniform(0.2, 0.9))
    probs = np.asarray(jax.nn.softmax(logits))
    order = np.argsort(-probs, axis=-1)
    draws = np.stack([sample(log_probs, key, Sampling(1.0, top_p=p)) for key in keys[100:]])
    for row in range(4):
        mass = np.cumsum(probs[row, order[row]])
        n_keep = int(np.searchsorted(mass, p) + 1)
        assert set(draws[:, row]) <= set(order[row, :n_keep])
    kept = np.isfinite(np.asarray(filter_logits(logits, top_p=1e-6)))
    assert (kept.sum(-1) == 1).all()


def test_bad_requests_are_clear_errors(trained_like):
    _, weights, _ = trained_like
    dec = _decoder(weights)
    with pytest.raises(ValueError, match="max_len=48"):
        dec.generate(np.ones((2, 40), np.int32), 10)
    with pytest.raises(ValueError, match="batch_size=2"):
        dec.generate(np.ones((3, 4), np.int32), 2)
    with pytest.raises(ValueError, match="top_p"):
        Sampling(1.0, top_p=1.5)


@pytest.mark.slow
def test_encoder_decoder_greedy_equals_eval_forward(np_rng):
    import functools

    from terraformer.layers.attention import SelfAttention
    from terraformer.models import Reformer

    cfg = dict(input_vocab_size=13, d_model=16, d_ff=32, n_encoder_layers=1, n_decoder_layers=1,
               n_heads=2, d_attention_key=4, d_attention_value=4, dropout=0.0, max_len=32,
               encoder_attention_type=SelfAttention,
               attention_type=functools.partial(SelfAttention, predict_mem_len=32))
    key = jax.random.PRNGKey(int(np_rng.integers(1 << 20)))
    model = Reformer(mode="eval", **cfg)
    source = jnp.asarray(np_rng.integers(1, 13, size=(1, 10)), jnp.int32)
    weights, state = model.init((ShapeDtype((1, 10), jnp.int32), ShapeDtype((1, 4), jnp.int32)),
                                key)
    dec = Decoder(Reformer(mode="predict", **cfg), weights, batch_size=1, rng=key)
    out = dec.generate(np.zeros((1, 0), np.int32), 6, encoder_inputs=source)
    seq = np.zeros((1, 0), np.int32)
    for _ in range(6):
        log_probs, _ = model.apply((source, jnp.asarray(np.pad(seq, [(0, 0), (0, 1)]))), weights,
                                   state, None)
        seq = np.concatenate([seq, np.argmax(log_probs[:, -1], -1)[:, None]], axis=1)
    np.testing.assert_array_equal(out, seq)
    with pytest.raises(ValueError, match="encoder_inputs"):
        dec.generate(np.zeros((1, 0), np.int32), 2)


def _lm(kind, mode):
    from terraformer.layers.attention import SelfAttention
    from terraformer.models import ReformerLM, TerraformerLM

    common = dict(vocab_size=19, d_model=16, d_ff=32, n_layers=2, n_heads=2, max_len=24,
                  dropout=0.0, mode=mode)
    if kind == "transformer":
        return TransformerLM(**common)
    if kind == "reformer_local":
        import functools

        attn = functools.partial(SelfAttention, chunk_len=4, n_chunks_before=1,
                                 predict_mem_len=12)
        return ReformerLM(d_attention_key=4, d_attention_value=4, attention_type=attn, **common)
    return TerraformerLM(attention_sparsity=2, ff_sparsity=4, d_lowrank=4, **common)


@pytest.mark.parametrize("kind", ["transformer",
                                  pytest.param("reformer_local", marks=pytest.mark.slow),
                                  pytest.param("terraformer", marks=pytest.mark.slow)])
def test_step_by_step_log_probs_equal_eval(np_rng, kind):
    """The decoder's packed-weight steps reproduce the eval forward pass (< 1e-4)."""
    key = jax.random.PRNGKey(int(np_rng.integers(1 << 20)))
    tokens = np_rng.integers(1, 19, size=(1, 14)).astype(np.int32)
    model = _lm(kind, "eval")
    weights, state = model.init(ShapeDtype((1, 14), jnp.int32), key)
    want, _ = model.apply(jnp.asarray(tokens), weights, state, None)
    dec = Decoder(_lm(kind, "predict"), weights, rng=key)
    step_state = dec.initial_state()
    inputs = np.concatenate([np.zeros((1, 1), np.int32), tokens[:, :-1]], axis=1)
    got = []
    for t in range(14):
        log_probs, step_state = dec._apply(jnp.asarray(inputs[:, t : t + 1]), dec.weights,
                                           step_state, None)
        got.append(log_probs)
    np.testing.assert_allclose(jnp.concatenate(got, 1), want, atol=1e-4)
    by_token = Decoder(_lm(kind, "predict"), weights, rng=key, prefill_chunk=1)
    chunked = Decoder(_lm(kind, "predict"), weights, rng=key, prefill_chunk=5)
    np.testing.assert_array_equal(chunked.generate(tokens[:, :8], 8),
                                  by_token.generate(tokens[:, :8], 8))


@pytest.mark.parametrize("dtype,tol", [("int8", 0.1), ("bf16", 0.05)])
@pytest.mark.parametrize("kind,option", [("terraformer", "output_dtype"),
                                         ("transformer", "weight_dtype")])
def test_quantized_decoding_weights_within_tolerance(np_rng, dtype, tol, kind, option):
    """int8 / bf16 kernels: log-probs near float32 at every position, greedy choices agree.

    The whole-model case uses the dense TransformerLM: in a Terraformer, quantized controller
    kernels may flip a SparseFF unit choice, a discrete change a tolerance cannot bound.
    """
    key = jax.random.PRNGKey(int(np_rng.integers(1 << 20)))
    weights, _ = _lm(kind, "eval").init(ShapeDtype((1, 8), jnp.int32), key)
    inputs = jnp.asarray(np_rng.integers(1, 19, size=(1, 20)), jnp.int32)

    def log_probs(**kwargs):
        dec = Decoder(_lm(kind, "predict"), weights, rng=key, **kwargs)
        return dec._apply(inputs, dec.weights, dec.initial_state(), None)[0]

    want, got = log_probs(), log_probs(**{option: dtype})
    assert float(jnp.max(jnp.abs(got - want))) < tol
    assert (jnp.argmax(got, -1) == jnp.argmax(want, -1)).mean() >= 0.8


@pytest.mark.parametrize("new_tokens,block_size", [(2, None), (40, None), (6, 3), (4, 5)])
def test_time_per_token_blocks(trained_like, new_tokens, block_size):
    """Default blocks are STREAM_BLOCK tokens, fewer for short runs (at least four blocks);
    a block larger than the run is a clear error."""
    from terraformer.decoding import STREAM_BLOCK, time_per_token

    _, weights, _ = trained_like
    dec = _decoder(weights, batch=1)
    prompt = np.ones((1, 3), np.int32)
    if block_size is not None and block_size > new_tokens:
        with pytest.raises(ValueError, match="block_size must be in"):
            time_per_token(dec, prompt, new_tokens, block_size)
        return
    got = time_per_token(dec, prompt, new_tokens, block_size)
    assert got["prefill_s"] > 0 and 0 < got["s_per_token"] <= got["first_token_s"] * 10
    want_block = block_size or max(1, min(STREAM_BLOCK, new_tokens // 4))
    assert len(dec._loops) == 1 and next(iter(dec._loops))[0] == want_block


def test_prompt_longer_than_the_cache_warns_once(np_rng, trained_like):
    """Without max_len, a request longer than the model's caches decodes with one warning
    that gives the prompt's length, the cache length and the sliding window."""
    _, weights, _ = trained_like
    cache = CFG["max_len"]
    dec = Decoder(TransformerLM(mode="predict", **CFG), weights, batch_size=1, prefill_chunk=16)
    assert dec.context == cache
    prompt = np_rng.integers(1, CFG["vocab_size"], size=(1, cache + int(np_rng.integers(0, 9))))
    with pytest.warns(UserWarning) as caught:
        out = dec.generate(prompt, 3)
    assert out.shape == (1, 3) and len(caught) == 1
    message = str(caught[0].message)
    assert f"a prompt of {prompt.shape[1]} tokens plus 3 new tokens" in message
    assert f"cache length of {cache}" in message
    assert f"slides over the last {cache} positions" in message
    with pytest.warns(UserWarning, match=f"a prompt of {prompt.shape[1]} tokens \\(with"):
        dec.prefill(prompt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dec.generate(prompt[:, : cache - 4], 3)  # start + prompt + 2 fed tokens fit
        dec.prefill(prompt[:, : cache - 1])


def test_predict_context_is_the_least_cache_of_the_model():
    """Full attention's ring bounds the context, local attention does not, eval has none."""
    import functools

    from terraformer.layers.attention import SelfAttention
    from terraformer.layers.combinators import Serial
    from terraformer.models import ReformerLM

    assert TransformerLM(mode="predict", **CFG).predict_context() == CFG["max_len"]
    assert TransformerLM(mode="eval", **CFG).predict_context() is None
    full = SelfAttention(causal=True, mode="predict", predict_mem_len=20)
    local = SelfAttention(causal=True, chunk_len=4, mode="predict", predict_mem_len=12)
    assert Serial(local, Serial(full)).predict_context() == 20
    assert local.predict_context() is None
    attn = functools.partial(SelfAttention, chunk_len=4, n_chunks_before=1, predict_mem_len=12)
    assert ReformerLM(vocab_size=19, d_model=16, d_ff=32, n_layers=2, n_heads=2, max_len=24,
                      attention_type=attn, mode="predict").predict_context() is None
    assert _lm("terraformer", "predict").predict_context() == 24


def test_lsh_prompt_read_in_one_call_equals_the_eval_forward(np_rng):
    """A Reformer with LSH attention (several buckets) reads the whole prompt in one call: the
    next-token log-probs equal the eval forward pass's, computed on the last position only."""
    import functools

    from terraformer.layers.lsh import LSHSelfAttention
    from terraformer.models import ReformerLM

    attn = functools.partial(LSHSelfAttention, chunk_len=4, n_buckets=4, n_hashes=2,
                             predict_mem_len=32)

    def lm(mode):
        return ReformerLM(vocab_size=19, d_model=16, d_ff=32, n_layers=2, n_heads=2,
                          d_attention_key=4, d_attention_value=4, attention_type=attn,
                          max_len=32, dropout=0.0, mode=mode)

    key = jax.random.PRNGKey(int(np_rng.integers(1 << 20)))
    prompt = np_rng.integers(1, 19, size=(1, 13)).astype(np.int32)
    model = lm("eval")
    weights, state = model.init(ShapeDtype((1, 14), jnp.int32), key)
    want, _ = model.apply(jnp.asarray(np.pad(prompt, [(0, 0), (0, 1)])), weights, state, None)
    dec = Decoder(lm("predict"), weights, rng=key)
    assert dec.prefill_chunk is None  # the model asks for one call
    log_probs, pstate = dec.prefill(prompt)
    np.testing.assert_allclose(log_probs, want[:, -1], atol=1e-4)
    assert int(jax.tree.leaves(pstate)[0].size) > 0
    chunked = Decoder(lm("predict"), weights, rng=key, prefill_chunk=5)
    assert np.abs(chunked.prefill(prompt)[0] - want[:, -1]).max() > 1e-3  # pieces: own bucket


def test_initial_state_equals_the_models_init_state(np_rng):
    """The compiled initial state (weights left out) is the state `model.init` returns, for a
    fresh key (LSH attention's state holds random hash seeds)."""
    from terraformer.models import ReformerLM

    key = jax.random.PRNGKey(int(np_rng.integers(1 << 20)))
    model = ReformerLM(vocab_size=11, d_model=8, d_ff=16, n_layers=1, n_heads=2,
                       d_attention_key=4, d_attention_value=4, max_len=16, dropout=0.0,
                       attention_type="lsh", mode="predict")
    dec = Decoder(model, None, batch_size=2, rng=key, weight_dtype=None)
    _, want = model.init(ShapeDtype((2, 1), jnp.int32), key)
    got = dec.initial_state()
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
