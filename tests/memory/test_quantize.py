"""bf16 optimizer slots: bf16 Adam moments stay close to float32's."""

import jax
import jax.numpy as jnp
import optax
import pytest

from terraformer.memory.quantize import quantized_slots
from terraformer.training.optimizers import Adam


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
