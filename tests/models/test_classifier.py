"""Classifier: masked mean pooling, padding invariance, the classification training step, and
every registered attention mechanism in it and in TransformerLM."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from terraformer.layers.attention import CausalAttention
from terraformer.layers.attention_types import ATTENTION_TYPES, NON_CAUSAL_ONLY
from terraformer.models.classifier import Classifier, masked_mean
from terraformer.models.transformer import TransformerLM
from terraformer.shapes import ShapeDtype
from terraformer.training.optimizers import Adam
from terraformer.training.step import make_eval_step, make_train_step

TINY = dict(vocab_size=16, n_classes=10, d_model=16, d_ff=32, n_layers=2, n_heads=2,
            max_len=64, dropout=0.0)


def _tokens(np_rng, batch, length, real):
    """Token ids [batch, length] in 1..15 on the first real[i] positions, padding (0) after."""
    x = np_rng.integers(1, TINY["vocab_size"], size=(batch, length)).astype(np.int32)
    x[np.arange(length)[None] >= np.asarray(real)[:, None]] = 0
    return x


def test_masked_mean_is_the_mean_over_real_positions(np_rng):
    x = np_rng.normal(size=(3, 7, 4)).astype(np.float32)
    real = [7, 3, 1]
    mask = np.arange(7)[None] < np.asarray(real)[:, None]
    want = np.stack([x[i, :n].mean(0) for i, n in enumerate(real)])
    np.testing.assert_allclose(masked_mean(jnp.asarray(x), jnp.asarray(mask)), want, rtol=1e-6)


@pytest.mark.parametrize("attention_type", ["full"])
def test_padding_changes_nothing(np_rng, attention_type):
    """Mechanisms that take a mask: more padding after the same tokens, same log-probs (the
    pooling and the attention both leave the padding out)."""
    model = Classifier(attention_type=attention_type, mode="eval", **TINY)
    short = _tokens(np_rng, 2, 24, [24, 11])
    long = np.concatenate([short, np.zeros((2, 16), np.int32)], axis=1)
    weights, state = model.init(ShapeDtype(long.shape, jnp.int32), jax.random.PRNGKey(0))
    apply = jax.jit(model.apply)
    y_short, _ = apply(jnp.asarray(short), weights, state, None)
    y_long, _ = apply(jnp.asarray(long), weights, state, None)
    assert y_short.shape == (2, TINY["n_classes"])
    np.testing.assert_allclose(jnp.exp(y_short).sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(y_short, y_long, atol=2e-5)
    # A padded position that became a real token does change the output: the test can fail.
    changed = long.copy()
    changed[1, 11] = 5
    y_changed, _ = apply(jnp.asarray(changed), weights, state, None)
    assert np.abs(np.asarray(y_changed[1] - y_long[1])).max() > 1e-4


def test_classification_step_learns_a_batch(np_rng):
    """The plain training step with labels [batch] as targets: the loss of a fixed batch falls,
    and the eval step's accuracy and sequence accuracy agree (one label per sequence)."""
    model = Classifier(attention_type="full", mode="train", **dict(TINY, n_layers=1))
    tokens = _tokens(np_rng, 8, 32, np_rng.integers(8, 33, size=8))
    labels = np_rng.integers(0, 10, size=8).astype(np.int32)
    batch = (jnp.asarray(tokens), jnp.asarray(labels), jnp.ones((8,), jnp.float32))
    weights, state = model.init(ShapeDtype(tokens.shape, jnp.int32), jax.random.PRNGKey(1))
    step = make_train_step(model, Adam(learning_rate=1e-2))
    opt_state = step.init_opt_state(weights)
    losses = []
    # optax's Adam mixes float and int32 inside (its step count): not clean under the strict
    # dtype promotion of `pytest --jax-strict`, which the model itself runs under elsewhere.
    with jax.numpy_dtype_promotion("standard"):
        for i in range(25):
            weights, state, opt_state, metrics = step(weights, state, opt_state, batch,
                                                      jax.random.PRNGKey(i))
            losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0], losses
    sums = make_eval_step(Classifier(attention_type="full", mode="eval",
                                     **dict(TINY, n_layers=1)))(
        weights, state, batch)
    assert float(sums["weight"]) == 8.0
    # Before a rank-1 target counted as one position per sequence, sequence accuracy was all
    # or nothing over the batch.
    assert float(sums["accuracy"]) == pytest.approx(float(sums["sequence_accuracy"]))


@pytest.mark.parametrize("name", list(ATTENTION_TYPES))
def test_every_registered_mechanism_builds(name):
    """Every name of the registry in the classifier (bidirectional) and in TransformerLM
    (causal), checked abstractly: shapes only, nothing compiled."""
    sig = ShapeDtype((2, 256), jnp.int32)
    structs = jax.ShapeDtypeStruct(sig.shape, sig.dtype)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)

    def language_model():
        return TransformerLM(16, d_model=16, d_ff=32, n_layers=2, n_heads=2, max_len=256,
                             attention_type=[name, "full"], mode="eval")

    models = [(Classifier(attention_type=name, mode="eval", **dict(TINY, max_len=256)), (2, 10))]
    if name in NON_CAUSAL_ONLY:
        with pytest.raises(ValueError, match="causal"):
            language_model()
    else:
        models.append((language_model(), (2, 256, 16)))
    for model, out_shape in models:
        weights, state = jax.eval_shape(
            lambda rng, m=model: m.init_weights_and_state(sig, rng), key)
        out = jax.eval_shape(lambda x, w, s, m=model: m.apply(x, w, s, None)[0], structs,
                             weights, state)
        assert out.shape == out_shape


@pytest.mark.slow  # one more compile; the default run keeps the shapes-only check above
def test_transformer_lm_attention_type_never_looks_ahead(np_rng):
    model = TransformerLM(16, d_model=16, d_ff=32, n_layers=1, n_heads=2, max_len=32,
                          attention_type="full", dropout=0.0, mode="eval")
    x = np_rng.integers(1, 16, size=(1, 12)).astype(np.int32)
    weights, state = model.init(ShapeDtype(x.shape, jnp.int32), jax.random.PRNGKey(0))
    x2 = x.copy()
    x2[:, 7:] = x2[:, 7:] % 15 + 1
    apply = jax.jit(model.apply)
    y1, _ = apply(jnp.asarray(x), weights, state, None)
    y2, _ = apply(jnp.asarray(x2), weights, state, None)
    np.testing.assert_allclose(y1[:, :8], y2[:, :8], atol=1e-5)   # shifted: t sees < t
    assert np.abs(np.asarray(y1[:, 8:] - y2[:, 8:])).max() > 1e-4


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(ValueError, match="causal only"):
        Classifier(attention_type=CausalAttention, **TINY)
    with pytest.raises(ValueError, match="multiple of n_heads"):
        Classifier(**dict(TINY, n_heads=3))
    with pytest.raises(ValueError, match="attention_type must be one of"):
        Classifier(attention_type="nonesuch", **TINY)
    with pytest.raises(ValueError, match="mode"):
        Classifier(mode="predict", **TINY)


@pytest.mark.parametrize("name", ["linformer", "synthesizer", "sinkhorn"])
def test_max_len_reaches_mechanisms_sized_by_length(name):
    """A classifier's max_len sizes the per-position weights of Linformer, Synthesizer and
    Sinkhorn, so inputs longer than those layers' own defaults (2,048 / 512 / 8,192) run."""
    length = 8320  # a multiple of every block length, above every default
    model = Classifier(attention_type=name, mode="eval", **dict(TINY, max_len=length))
    tokens = jax.ShapeDtypeStruct((1, length), jnp.int32)
    w, s = jax.eval_shape(lambda: model.init(ShapeDtype(tokens.shape, jnp.int32),
                                             jax.random.PRNGKey(0)))
    out = jax.eval_shape(lambda w, s, x: model.apply(x, w, s, None)[0], w, s, tokens)
    assert out.shape == (1, TINY["n_classes"])
