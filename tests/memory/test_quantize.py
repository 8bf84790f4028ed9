"""Quantized weights: round-trip error bounds, a quantized decoder's logits, bf16 Adam slots."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from terraformer.decoding import Decoder
from terraformer.memory.quantize import (
    QuantizedArray,
    QuantizedModel,
    dequantize,
    quantize,
    quantize_array,
    quantized_apply,
    quantized_slots,
    tree_nbytes,
)
from terraformer.models.transformer import TransformerLM
from terraformer.shapes import ShapeDtype
from terraformer.training.optimizers import Adam

# Documented tolerances (module docstring of quantize.py): max |log p - log p~| over a small
# TransformerLM's outputs.
LOGP_TOL = {"bf16": 0.05, "int8": 0.1}


@pytest.mark.parametrize("shape", [(37, 19), (3, 16, 8), (64,), (5, 1)])
def test_int8_round_trip_within_half_a_step(np_rng, shape):
    x = np_rng.normal(size=shape).astype(np.float32) * np_rng.uniform(0.01, 10)
    x[..., 0] = 0.0  # a channel of zeros (stored exactly)
    q = quantize_array(x, "int8")
    assert q.data.dtype == jnp.int8 and q.shape == shape
    axis = -2 if x.ndim >= 2 else -1
    assert q.scale.shape == tuple(1 if a == x.ndim + axis else n for a, n in enumerate(shape))
    err = np.abs(np.asarray(q.dequantize()) - x)
    scale = np.broadcast_to(np.asarray(q.scale), shape)
    assert np.all(err <= scale / 2 * (1 + 1e-6))
    amax = np.max(np.abs(x), axis=axis, keepdims=True)
    np.testing.assert_allclose(np.where(amax > 0, 127 * np.asarray(q.scale), 0), amax, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(q.dequantize())[..., 0], 0.0)


def test_bf16_round_trip_relative(np_rng):
    x = (np_rng.normal(size=(41, 23)) * np.exp(np_rng.uniform(-20, 20, size=(41, 23)))).astype(
        np.float32)
    q = quantize_array(x, "bf16")
    assert q.data.dtype == jnp.bfloat16 and q.scale is None
    err = np.abs(np.asarray(q.dequantize(), np.float32) - x)
    assert np.all(err <= 2.0**-8 * np.abs(x))


def test_quantize_tree(np_rng):
    weights = {"w": jnp.asarray(np_rng.normal(size=(64, 96)), jnp.float32),
               "b": jnp.asarray(np_rng.normal(size=(96,)), jnp.float32),
               "ids": jnp.arange(5000), "inner": ((jnp.ones((80, 80)),), ())}
    for dtype, ratio in (("int8", 4), ("bf16", 2)):
        q = quantize(weights, dtype, min_size=1000)
        assert isinstance(q["w"], QuantizedArray) and isinstance(q["inner"][0][0], QuantizedArray)
        assert q["b"] is weights["b"] and q["ids"] is weights["ids"]  # small / not float
        small = tree_nbytes(q["w"])
        assert small <= weights["w"].nbytes / ratio + 4 * 96
        back = jax.jit(dequantize)(q)  # a pytree: passes through jit
        assert jax.tree.structure(back) == jax.tree.structure(weights)
        assert back["w"].dtype == jnp.float32
        np.testing.assert_allclose(back["w"], weights["w"], atol=0.05, rtol=0.01)
    with pytest.raises(ValueError, match="dtype"):
        quantize(weights, "int4")
    with pytest.raises(ValueError, match="min_size"):
        quantize(weights, "int8", min_size=-1)


@pytest.fixture(scope="module")
def lm():
    model = TransformerLM(64, d_model=64, d_ff=128, n_layers=2, n_heads=2, max_len=64,
                          dropout=0.0, mode="eval")
    seed = int(np.random.SeedSequence().entropy % 2**31)
    print(f"seed={seed}")
    weights, state = model.init(ShapeDtype((2, 24), jnp.int32), jax.random.PRNGKey(seed))
    tokens = jax.random.randint(jax.random.PRNGKey(seed + 1), (2, 24), 1, 64)
    apply = jax.jit(quantized_apply(model.apply))
    ref, _ = apply(tokens, weights, state, None)
    return model, weights, state, tokens, apply, ref


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_quantized_transformer_logits_within_tolerance(lm, dtype):
    model, weights, state, tokens, apply, ref = lm
    q = quantize(weights, dtype, min_size=1024)
    assert tree_nbytes(q) < tree_nbytes(weights) / (1.8 if dtype == "bf16" else 3.0)
    log_probs, _ = apply(tokens, q, state, None)
    diff = float(jnp.max(jnp.abs(log_probs - ref)))
    assert diff < LOGP_TOL[dtype], diff
    agree = float(jnp.mean(jnp.argmax(log_probs, -1) == jnp.argmax(ref, -1)))
    assert agree > 0.9


def test_decoder_takes_quantized_weights(lm):
    """Decoder(QuantizedModel(model)) with int8 weights: prefill log-probs near float32's."""
    model, weights, state, tokens, _, ref = lm
    q = quantize(weights, "int8", min_size=1024)
    predict = TransformerLM(64, d_model=64, d_ff=128, n_layers=2, n_heads=2, max_len=64,
                            dropout=0.0, mode="predict")
    decoder = Decoder(QuantizedModel(predict, "int8", min_size=1024), q, batch_size=2,
                      prefill_chunk=8)
    log_probs, _ = decoder.prefill(tokens[:, :-1])  # feeds [0, t_0 .. t_22]: predicts t_23
    assert float(jnp.max(jnp.abs(log_probs - ref[:, -1]))) < LOGP_TOL["int8"]
    new = decoder.generate(tokens[:, :4], 3)
    assert new.shape == (2, 3)


def test_bf16_adam_slots_close_to_float32(np_rng):
    params = {"w": jnp.asarray(np_rng.normal(size=(32, 16)), jnp.float32),
              "b": jnp.zeros((16,), jnp.float32)}
    target = jnp.asarray(np_rng.normal(size=(32, 16)), jnp.float32)

    def loss(p):
        return jnp.mean((p["w"] + p["b"] - target) ** 2)

    def run(opt, steps=5):
        p, s = params, opt.init(params)
        for _ in range(steps):
            updates, s = opt.update(jax.grad(loss)(p), s, p)
            p = optax.apply_updates(p, updates)
        return p, s

    p32, _ = run(Adam(learning_rate=0.01))
    p16, s16 = run(quantized_slots(Adam(learning_rate=0.01)))
    adam_state = s16[0]
    assert adam_state.mu["w"].dtype == jnp.bfloat16 and adam_state.nu["w"].dtype == jnp.bfloat16
    assert adam_state.count.dtype == jnp.int32
    assert s16[1].learning_rate.dtype == jnp.float32
    for key in params:
        moved32 = p32[key] - params[key]
        moved16 = p16[key] - params[key]
        rel = float(jnp.linalg.norm(moved16 - moved32) / jnp.linalg.norm(moved32))
        assert rel < 0.02, (key, rel)
    with pytest.raises(ValueError, match="bf16"):
        quantized_slots(Adam(), "int8")
