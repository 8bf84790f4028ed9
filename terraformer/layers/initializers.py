"""Weight initializers: `init(rng, shape, dtype) -> array`."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def glorot_uniform(rng, shape, dtype=jnp.float32):
    """Uniform in ±sqrt(6 / (fan_in + fan_out)); fans from the last two axes."""
    fan_in, fan_out = shape[-2], shape[-1]
    limit = jnp.sqrt(6.0 / (fan_in + fan_out))
    return jax.random.uniform(rng, shape, dtype, -limit, limit)


def random_normal(stddev: float = 1.0):
    """Normal with the given standard deviation."""

    def init(rng, shape, dtype=jnp.float32):
        return stddev * jax.random.normal(rng, shape, dtype)

    return init


def random_uniform(limit: float = 1.0):
    """Uniform in [-limit, limit)."""

    def init(rng, shape, dtype=jnp.float32):
        return jax.random.uniform(rng, shape, dtype, -limit, limit)

    return init


def zeros(rng, shape, dtype=jnp.float32):
    del rng
    return jnp.zeros(shape, dtype)


def ones(rng, shape, dtype=jnp.float32):
    del rng
    return jnp.ones(shape, dtype)
