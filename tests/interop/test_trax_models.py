"""Whole-model parity with trax 1.4.1 (eval and predict mode), trax's weights loaded into ours.

Our language models return log-probs where trax's return logits: the eval comparisons are
against log_softmax(trax's logits), and one strict xfail names the difference.
"""

import functools

import jax
import numpy as np
import pytest

from terraformer import layers as tl
from terraformer import models
from terraformer.interop import TraxImportError, trax_to_terraformer

ATOL = 1e-5
LOCAL = dict(chunk_len=4, n_chunks_before=1)
LSH = dict(chunk_len=4, n_chunks_before=1, n_hashes=2, n_buckets=4)


def reformer(mode, attention="local"):
    if attention == "local":
        attn = functools.partial(tl.SelfAttention, predict_mem_len=16, **LOCAL)
    else:
        attn = functools.partial(tl.LSHSelfAttention, predict_mem_len=16, **LSH)
    return models.ReformerLM(
        vocab_size=16, d_model=8, d_ff=16, d_attention_key=4, d_attention_value=4, n_layers=2,
        n_heads=2, max_len=16, dropout=0.0, pos_type="axial", pos_axial_shape=(4, 4),
        pos_d_axial_embs=(4, 4), ff_activation=tl.FastGelu, attention_type=attn, mode=mode)


def transformer(mode):
    return models.TransformerLM(vocab_size=16, d_model=8, d_ff=16, n_layers=2, n_heads=2,
                                max_len=32, dropout=0.0, mode=mode)


def loaded(model, case):
    w, s = model.init(tl.signature(case.x))
    return trax_to_terraformer(model, w, case.weights, case.names), s


def eval_log_probs(model, case):
    w, s = loaded(model, case)
    y, _ = model.apply(case.x, w, s, None)
    return np.asarray(y), w


def predict_log_probs(make, weights, feed):
    """Our predict model fed `feed` one token at a time: [len(feed), vocab]."""
    model = make("predict")
    _, state = model.init(tl.signature(np.zeros((1, 1), np.int32)))
    out = []
    for t in feed:
        y, state = model.apply(np.array([[t]], np.int32), weights, state, None)
        out.append(np.asarray(y)[0, -1])
    return np.stack(out)


def greedy(make, weights, prompt, n_new):
    model = make("predict")
    _, state = model.init(tl.signature(np.zeros((1, 1), np.int32)))
    y = None
    for t in np.concatenate([[0], prompt]):
        y, state = model.apply(np.array([[t]], np.int32), weights, state, None)
    new = []
    for _ in range(n_new):
        new.append(int(np.argmax(np.asarray(y)[0, -1])))
        y, state = model.apply(np.array([[new[-1]]], np.int32), weights, state, None)
    return np.array(new)


def log_softmax(logits):
    return np.asarray(jax.nn.log_softmax(logits, axis=-1))


# -- ReformerLM with chunked local attention and axial positions -----------------------------
def test_reformer_local_eval_matches_trax(trax_case):
    case = trax_case("reformer_lm_local")
    y, _ = eval_log_probs(reformer("eval"), case)
    np.testing.assert_allclose(y, log_softmax(case.outputs[0]), atol=ATOL, rtol=0)


@pytest.mark.xfail(strict=True, reason="outputs: trax's ReformerLM returns logits, ours "
                   "log-probs (LogSoftmax last)")
def test_reformer_local_returns_trax_logits(trax_case):
    case = trax_case("reformer_lm_local")
    y, _ = eval_log_probs(reformer("eval"), case)
    np.testing.assert_allclose(y, case.outputs[0], atol=ATOL, rtol=0)


def test_reformer_local_predict_matches_trax_eval(trax_case):
    """Ours in predict mode, fed one token at a time, equals trax's eval forward."""
    case = trax_case("reformer_lm_local")
    _, w = eval_log_probs(reformer("eval"), case)
    tokens = case.x[0]
    feed = np.concatenate([[0], tokens[:-1]])
    y = predict_log_probs(reformer, w, feed)
    np.testing.assert_allclose(y, log_softmax(case.outputs[0][0]), atol=ATOL, rtol=0)


def test_reformer_local_predict_matches_trax_predict_inside_the_window(trax_case):
    """trax's chunked SelfAttention in predict mode attends to its whole predict memory, not to
    the chunk window its eval uses; the two agree while the memory holds no more than the
    window, (n_chunks_before + 1) * chunk_len positions, and ours agrees with both there."""
    case = trax_case("reformer_lm_local")
    _, w = eval_log_probs(reformer("eval"), case)
    feed = np.concatenate([[0], case.x[0][:-1]])
    y = predict_log_probs(reformer, w, feed)
    trax_predict = log_softmax(case.extra["predict_logits"])
    window = (LOCAL["n_chunks_before"] + 1) * LOCAL["chunk_len"]
    np.testing.assert_allclose(y[:window], trax_predict[:window], atol=ATOL, rtol=0)
    assert np.abs(y[window:] - trax_predict[window:]).max() > 1e-2


def test_reformer_local_greedy_tokens_are_trax_eval_greedy(trax_case):
    case = trax_case("reformer_lm_local")
    _, w = eval_log_probs(reformer("eval"), case)
    ours = greedy(reformer, w, case.extra["prompt"], len(case.extra["greedy_eval"]))
    np.testing.assert_array_equal(ours, case.extra["greedy_eval"])
    # trax's own predict-mode greedy tokens, too (its logits drift past the window, not its
    # argmax on this case)
    np.testing.assert_array_equal(ours, case.extra["greedy"])


# -- ReformerLM with LSH attention -------------------------------------------------------------
def test_reformer_lsh_loads_trax_weights(trax_case):
    case = trax_case("reformer_lm_lsh")
    y, w = eval_log_probs(reformer("eval", "lsh"), case)
    assert y.shape == case.outputs[0].shape
    assert np.isfinite(y).all()
    np.testing.assert_allclose(np.exp(y).sum(-1), 1.0, atol=1e-5)


@pytest.mark.xfail(strict=True, reason="LSH eval randomness: trax draws new rotations per "
                   "call from per-(example, head) state keys; ours keeps one key per layer")
def test_reformer_lsh_eval_matches_trax(trax_case):
    case = trax_case("reformer_lm_lsh")
    y, _ = eval_log_probs(reformer("eval", "lsh"), case)
    np.testing.assert_allclose(y, log_softmax(case.outputs[0]), atol=ATOL, rtol=0)


def test_trax_lsh_predict_is_not_its_eval(trax_case):
    """trax's LSH predict mode attends by bucket priority over its memory, ours within the
    query's bucket: neither reproduces trax's eval; recorded so that a change shows."""
    case = trax_case("reformer_lm_lsh")
    gap = np.abs(case.extra["predict_logits"] - case.outputs[0][0]).max()
    assert gap > 1e-2


# -- TransformerLM ---------------------------------------------------------------------------
def test_transformer_positional_table_starts_as_trax(trax_case):
    """trax's PositionalEncoding: a trainable table initialised with interleaved sinusoids
    (sin on even features, cos on odd); ours starts from the same table."""
    case = trax_case("transformer_lm")
    table = case.weights[case.names.index("w/3")]
    w, _ = transformer("eval").init(tl.signature(case.x))
    ours = np.asarray(w[3])
    np.testing.assert_allclose(ours, table.reshape(ours.shape), atol=1e-6)


def test_transformer_eval_matches_trax(trax_case):
    case = trax_case("transformer_lm")
    y, _ = eval_log_probs(transformer("eval"), case)
    np.testing.assert_allclose(y, log_softmax(case.outputs[0]), atol=ATOL, rtol=0)


def test_transformer_predict_matches_trax_predict(trax_case):
    """Fed one token at a time (the table read at the position counter), ours equals trax's
    predict mode."""
    case = trax_case("transformer_lm")
    _, w = eval_log_probs(transformer("eval"), case)
    feed = np.concatenate([[0], case.x[0][:-1]])
    y = predict_log_probs(transformer, w, feed)
    np.testing.assert_allclose(y, log_softmax(case.extra["predict_logits"]), atol=ATOL, rtol=0)
    ours = greedy(transformer, w, case.extra["prompt"], len(case.extra["greedy"]))
    np.testing.assert_array_equal(ours, case.extra["greedy"])


def test_trax_transformer_predict_is_its_eval(trax_case):
    """trax's TransformerLM predict mode reproduces its eval."""
    case = trax_case("transformer_lm")
    np.testing.assert_allclose(case.extra["predict_logits"], case.outputs[0][0], atol=1e-4)


# -- ReformerLM with trax's other pos_type values --------------------------------------------
POS_CASES = {None: "reformer_lm_pos_none", "fixed-base": "reformer_lm_pos_fixed",
             "sin-cos": "reformer_lm_pos_sin_cos"}


def reformer_pos(pos_type, mode="eval"):
    attn = functools.partial(tl.SelfAttention, predict_mem_len=16, **LOCAL)
    return models.ReformerLM(
        vocab_size=16, d_model=8, d_ff=16, d_attention_key=4, d_attention_value=4, n_layers=2,
        n_heads=2, max_len=16, dropout=0.0, pos_type=pos_type, ff_activation=tl.FastGelu,
        attention_type=attn, mode=mode)


def test_reformer_pos_type_none_starts_as_trax_table(trax_case):
    case = trax_case("reformer_lm_pos_none")
    table = case.weights[case.names.index("w/3/1")]
    w, _ = reformer_pos(None).init(tl.signature(case.x))
    np.testing.assert_allclose(np.asarray(w[3]), table, atol=1e-6)


def test_reformer_fixed_base_weights_are_trax_digit_vectors(trax_case):
    """trax's 32 digit vectors (4 bases x 8 digits) and start vector land in ours stacked."""
    case = trax_case("reformer_lm_pos_fixed")
    assert sum(n.startswith("w/3/") for n in case.names) == 33
    w, _ = loaded(reformer_pos("fixed-base"), case)
    digits = np.asarray(w[3]["digits"])
    np.testing.assert_array_equal(digits[2, 5], case.weights[case.names.index("w/3/1/0/2/5")][0])
    np.testing.assert_array_equal(np.asarray(w[3]["start"]),
                                  case.weights[case.names.index("w/3/1/1")].reshape(-1))


@pytest.mark.parametrize("pos_type", list(POS_CASES), ids=str)
def test_reformer_pos_type_matches_trax(pos_type, trax_case):
    """Eval, and predict fed one token at a time, against trax's eval on trax's weights; and
    trax's predict inside the chunk window (beyond it trax's attends to its whole memory)."""
    case = trax_case(POS_CASES[pos_type])
    y, w = eval_log_probs(reformer_pos(pos_type), case)
    np.testing.assert_allclose(y, log_softmax(case.outputs[0]), atol=ATOL, rtol=0)
    feed = np.concatenate([[0], case.x[0][:-1]])
    y_pred = predict_log_probs(functools.partial(reformer_pos, pos_type), w, feed)
    np.testing.assert_allclose(y_pred, log_softmax(case.outputs[0][0]), atol=ATOL, rtol=0)
    window = (LOCAL["n_chunks_before"] + 1) * LOCAL["chunk_len"]
    np.testing.assert_allclose(y_pred[:window], log_softmax(case.extra["predict_logits"])[:window],
                               atol=ATOL, rtol=0)


def test_reformer_sinusoidal_is_not_trax_pos_type(trax_case):
    """Our 'sinusoidal' (fixed concatenated sinusoids) holds no table: trax's pos_type=None
    checkpoint does not load into it."""
    with pytest.raises(TraxImportError, match="expected shape"):
        loaded(reformer_pos("sinusoidal"), trax_case("reformer_lm_pos_none"))


# -- the decoder-only Terraformer: trax's ReformerLM with the sparse layers --------------------
def terraformer(mode, output_merge="concatenate"):
    """Our TerraformerLM as trax's fixture model: SparseFF blocks of 4 (d_lowrank = d_ff / 4, as
    trax derives it), MultiplicativeConvCausalAttention with 2 modules, fixed-base positions,
    the streams concatenated as trax's ReformerLM does."""
    return models.TerraformerLM(
        vocab_size=16, d_model=8, d_ff=24, d_attention_key=4, d_attention_value=4, n_layers=2,
        n_heads=2, max_len=16, dropout=0.0, pos_type="fixed-base", attention_sparsity=2,
        length_kernel_size=3, ff_sparsity=4, d_lowrank=6, output_merge=output_merge, mode=mode)


# The fixture's weights carry noise of 1.0 (so that greedy tokens vary): log-probs reach -25,
# where trax's own float32 forward is up to ~3.5e-4 from its float64 forward (`out64/0`, the
# same weights). Against that float64 forward ours is within ATOL plus a few float32 roundings
# of the value (RTOL_F64); against trax's float32 outputs, within trax's own rounding (RTOL).
RTOL = 5e-5
RTOL_F64 = 5e-6


def test_terraformer_eval_matches_trax(trax_case):
    case = trax_case("terraformer_lm")
    assert "predict_error" not in case.meta, case.meta.get("predict_error")
    y, _ = eval_log_probs(terraformer("eval"), case)
    trax64 = np.asarray(jax.nn.log_softmax(case.extra["out64/0"], axis=-1))
    np.testing.assert_allclose(y, trax64, atol=ATOL, rtol=RTOL_F64)
    np.testing.assert_allclose(y, log_softmax(case.outputs[0]), atol=ATOL, rtol=RTOL)


def test_terraformer_predict_matches_trax_predict(trax_case):
    """Fed one token at a time (the convolutions' and attention's caches), ours equals trax's
    predict mode and trax's eval; greedy tokens after the prompt are trax's."""
    case = trax_case("terraformer_lm")
    _, w = eval_log_probs(terraformer("eval"), case)
    feed = np.concatenate([[0], case.x[0][:-1]])
    y = predict_log_probs(terraformer, w, feed)
    np.testing.assert_allclose(y, log_softmax(case.outputs[0][0]), atol=ATOL, rtol=RTOL)
    # trax's predict itself differs from its eval by float32 rounding (its cache sums in
    # another order): twice the tolerance against it
    np.testing.assert_allclose(y, log_softmax(case.extra["predict_logits"]), atol=2 * ATOL,
                               rtol=2 * RTOL)
    ours = greedy(terraformer, w, case.extra["prompt"], len(case.extra["greedy"]))
    np.testing.assert_array_equal(ours, case.extra["greedy"])
    np.testing.assert_array_equal(ours, case.extra["greedy_eval"])


def test_terraformer_controller_choices_vary(trax_case):
    """The fixture exercises the sparse feed-forward: its controller picks different units at
    different positions (a model whose choices never vary would hide a transposed layout)."""
    case = trax_case("terraformer_lm")
    model = terraformer("eval")
    w, _ = loaded(model, case)
    block = model.sublayers[5]
    ff = block.sublayers[0].sublayers[2].sublayers[0].sublayers[0].sublayers[1]
    assert isinstance(ff, tl.SparseFF)
    ff_w = jax.tree_util.tree_map(lambda a: a[0], w[5][2][0][0][1])
    x = np.random.default_rng(0).standard_normal((2, 16, 8)).astype(np.float32)
    choices = np.asarray(ff.choices(x, ff_w))
    assert len(np.unique(choices.reshape(-1, choices.shape[-1]), axis=0)) > 1


def test_terraformer_average_merge_does_not_load_trax_weights(trax_case):
    """Our default TerraformerLM averages its streams (trax's encoder-decoder Terraformer); trax's
    ReformerLM concatenates them: its output LayerNorm is twice as wide, and the error says so."""
    with pytest.raises(TraxImportError, match=r"LayerNorm.scale: expected shape \(8,\), got "
                       r"\(16,\)"):
        loaded(terraformer("eval", output_merge="average"), trax_case("terraformer_lm"))
