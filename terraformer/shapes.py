"""Shapes and dtypes of layer inputs: what `Layer.init` needs to know.

A *signature* is a `ShapeDtype` for one input, or a tuple of them for several (stack order).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class ShapeDtype:
    """The shape and dtype of one array, without its values.

    Example: `ShapeDtype((8, 1024), jnp.int32)` for a batch of 8 token sequences.
    """

    shape: tuple[int, ...]
    dtype: Any = jnp.float32

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))

    def as_struct(self) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(self.shape, self.dtype)


def signature(obj: Any) -> ShapeDtype | tuple[ShapeDtype, ...]:
    """The signature of an array, a ShapeDtype/ShapeDtypeStruct, or a tuple/list of them."""
    if isinstance(obj, ShapeDtype):
        return obj
    if isinstance(obj, (tuple, list)):
        return tuple(signature(o) for o in obj)
    if hasattr(obj, "shape") and hasattr(obj, "dtype"):
        return ShapeDtype(obj.shape, obj.dtype)
    if isinstance(obj, (int, float, bool, np.number)):
        arr = np.asarray(obj)
        return ShapeDtype(arr.shape, arr.dtype)
    raise TypeError(
        f"signature: expected an array, ShapeDtype or a tuple of them, got {type(obj).__name__}"
    )


def as_structs(sig: ShapeDtype | tuple) -> Any:
    """A signature as jax.ShapeDtypeStruct(s), for `jax.eval_shape`."""
    if isinstance(sig, tuple):
        return tuple(as_structs(s) for s in sig)
    return signature(sig).as_struct()


def from_structs(tree: Any) -> ShapeDtype | tuple:
    """Inverse of `as_structs`: jax.eval_shape output to a signature."""
    if isinstance(tree, (tuple, list)):
        return tuple(from_structs(t) for t in tree)
    return ShapeDtype(tree.shape, tree.dtype)
