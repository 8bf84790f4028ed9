"""Quantized storage of optimizer slots: bf16 moments, computed in float32.

`quantized_slots(optimizer, "bf16")` wraps an optax transformation so its float state (Adam's
mu and nu) is stored in bfloat16 between steps and computed in float32: half the slot memory.
Each update rounds the new moments to bf16 (relative 2**-8), so updates stay within a few
percent of the float32 optimizer's over a few steps (the tests' tolerance).

Weights for decoding are packed by the layers themselves (`Layer.pack_for_decoding`), in the
one int8 format of `layers.core` (`quantize_int8` / `dequantize_int8`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from terraformer.checks import check_choice, check_int

__all__ = ["SLOT_DTYPES", "quantized_slots"]

# Only bf16 is offered: int8 moments need per-block scales refreshed every step and lose too
# much of `nu`'s dynamic range.
SLOT_DTYPES = ("bf16", "bfloat16")


def _dtype_name(dtype) -> str:
    """'bf16' or a dtype's name ('bfloat16' for jnp.bfloat16) to compare with SLOT_DTYPES."""
    if isinstance(dtype, str):
        return dtype.lower()
    try:
        return jnp.dtype(dtype).name
    except TypeError:
        return repr(dtype)


def quantized_slots(optimizer: optax.GradientTransformation, dtype: str = "bf16",
                    min_size: int = 1) -> optax.GradientTransformation:
    """`optimizer` with its float state stored in bfloat16 (computed in float32).

    Every floating state leaf with at least `min_size` elements and at least one axis (Adam's
    `mu` and `nu`, momentum traces) is kept in bf16 between steps; scalars (step counts,
    the logged learning rate) stay as they are. `dtype`: 'bf16' (or 'bfloat16',
    jnp.bfloat16); see SLOT_DTYPES.
    """
    check_choice("dtype", _dtype_name(dtype), SLOT_DTYPES, "quantized_slots")
    check_int("min_size", min_size, 0, "quantized_slots")

    def small(x):
        return x.ndim >= 1 and math.prod(x.shape) >= min_size and jnp.issubdtype(
            x.dtype, jnp.floating)

    def store(state):
        return jax.tree.map(lambda x: x.astype(jnp.bfloat16) if small(x) else x, state)

    def init_fn(params):
        return store(optimizer.init(params))

    def update_fn(updates, state, params=None):
        if params is not None:
            # Each stored leaf's working dtype, from the shapes of a fresh state (no compute).
            full = jax.eval_shape(optimizer.init, params)
            state = jax.tree.map(lambda s, f: s.astype(f.dtype), state, full)
        else:
            state = jax.tree.map(
                lambda x: x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x, state)
        updates, state = optimizer.update(updates, state, params)
        return updates, store(state)

    return optax.GradientTransformation(init_fn, update_fn)
