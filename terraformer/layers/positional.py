"""Learned positional embeddings: axial (Reformer).

The fixed sinusoidal encoding lives in `core.PositionalEncoding`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from terraformer.checks import check_int, check_rate
from terraformer.layers import initializers as init_lib
from terraformer.layers.base import EMPTY, Layer, check_mode
from terraformer.layers.core import check_feature_dim


class AxialPositionalEncoding(Layer):
    """Adds learned axial position embeddings: (batch, length, d_model) -> same.

    Positions 0 .. prod(shape)-1 are laid out row-major over `shape`; position p with
    multi-index (i_0, ..., i_{k-1}) gets the concatenation of `table_a[i_a]` over the axes a.
    So k small tables of `shape[a] x d_embs[a]` stand for a full `prod(shape) x d_model`
    table (e.g. 64 x 64 positions from two 64-row tables), and `sum(d_embs)` must equal
    `d_model`. An input of `length <= prod(shape)` gets the first `length` positions; only
    `length x d_model` embedding values are gathered, never the full table.

    Weights: a tuple of k tables, table a of shape `[1]*a + [shape[a]] + [1]*(k-1-a) +
    [d_embs[a]]` (Trax's broadcastable layout), initialised by `kernel_initializer`.

    Dropout (train mode only) is applied to the embeddings before they are added, with a mask
    over `(batch, *shape, d_model)` that is shared along `dropout_broadcast_dims` (indices into
    that shape; the default `(-2,)` shares the mask along the last axial axis).

    In `predict` mode the state is the next position (int32 scalar): feeding a sequence in
    pieces adds the same embeddings as feeding it whole. Positions past `prod(shape)` cannot
    be detected under `jit`; they wrap around.
    """

    def __init__(
        self,
        shape=(64, 64),
        d_embs=(384, 384),
        kernel_initializer=init_lib.random_normal(1.0),
        dropout: float = 0.0,
        dropout_broadcast_dims=(-2,),
        mode: str = "train",
    ):
        who = "AxialPositionalEncoding"
        shape = tuple(check_int(f"shape[{a}]", s, 1, who) for a, s in enumerate(shape))
        d_embs = tuple(check_int(f"d_embs[{a}]", d, 1, who) for a, d in enumerate(d_embs))
        if not shape:
            raise ValueError(f"{who}: shape must be positive ints, got {shape}")
        if len(d_embs) != len(shape):
            raise ValueError(
                f"{who}: d_embs needs one width per axis of shape, got shape={shape} and "
                f"d_embs={d_embs}"
            )
        dropout = check_rate("dropout", dropout, who)
        n_dims = len(shape) + 2
        dims = tuple(int(d) for d in dropout_broadcast_dims)
        if any(not -n_dims <= d < n_dims for d in dims):
            raise ValueError(
                "AxialPositionalEncoding: dropout_broadcast_dims index (batch, *shape, d_model) "
                f"= {n_dims} axes, got {dims}"
            )
        super().__init__(name="AxialPositionalEncoding")
        self._shape = shape
        self._d_embs = d_embs
        self._init = kernel_initializer
        self._dropout = dropout
        self._broadcast_dims = tuple(sorted({d % n_dims for d in dims}))
        self._mode = check_mode(mode)
        # Row-major strides: position p has index (p // stride[a]) % shape[a] on axis a.
        self._strides = tuple(int(np.prod(shape[a + 1 :])) for a in range(len(shape)))

    @property
    def max_len(self) -> int:
        """The number of positions: prod(shape)."""
        return math.prod(self._shape)

    @property
    def d_model(self) -> int:
        return sum(self._d_embs)

    def _check_d_model(self, d_model: int):
        if d_model != self.d_model:
            raise ValueError(
                f"AxialPositionalEncoding: sum(d_embs) = {self.d_model} (d_embs={self._d_embs}) "
                f"must equal the input's d_model, got d_model={d_model}"
            )

    def _check_length(self, length: int):
        if length > self.max_len:
            raise ValueError(
                f"AxialPositionalEncoding: input length {length} exceeds the "
                f"{self.max_len} positions of shape {self._shape}"
            )

    def init_weights_and_state(self, input_signature, rng):
        if isinstance(input_signature, tuple) or len(input_signature.shape) != 3:
            raise ValueError(
                "AxialPositionalEncoding: expects one input of shape (batch, length, d_model), "
                f"got {input_signature}"
            )
        self._check_d_model(input_signature.shape[-1])
        self._check_length(input_signature.shape[1])
        k = len(self._shape)
        tables = []
        for a, (size, d_emb) in enumerate(zip(self._shape, self._d_embs, strict=True)):
            table_shape = (1,) * a + (size,) + (1,) * (k - 1 - a) + (d_emb,)
            tables.append(self._init(jax.random.fold_in(rng, a), table_shape))
        state = jnp.zeros((), jnp.int32) if self._mode == "predict" else EMPTY
        return tuple(tables), state

    def _axis_indices(self, positions):
        return [(positions // stride) % size for stride, size in zip(self._strides, self._shape)]

    def embeddings(self, positions, weights):
        """The embeddings of integer `positions` (any shape): (...,) -> (..., d_model)."""
        indices = self._axis_indices(positions)
        parts = [
            jnp.take(table.reshape(size, d_emb), idx, axis=0)
            for table, idx, size, d_emb in zip(
                weights, indices, self._shape, self._d_embs, strict=True
            )
        ]
        return jnp.concatenate(parts, axis=-1)

    def _dropout_mask(self, positions, batch: int, rng, dtype):
        """Keep-mask / keep_prob for (batch, length, d_model), shared along broadcast dims."""
        k = len(self._shape)
        full = (batch, *self._shape, self.d_model)
        noise_shape = tuple(1 if i in self._broadcast_dims else n for i, n in enumerate(full))
        keep = jax.random.bernoulli(rng, 1.0 - self._dropout, noise_shape)
        # Gather the mask entry of each position: index 0 along broadcast (size-1) axes.
        indices = [
            idx if noise_shape[1 + a] > 1 else jnp.zeros_like(idx)
            for a, idx in enumerate(self._axis_indices(positions))
        ]
        keep = keep.reshape(noise_shape[0], *noise_shape[1 : 1 + k], noise_shape[-1])
        keep = keep[(slice(None), *indices)]  # (batch or 1, length, d_model or 1)
        return keep.astype(dtype) / (1.0 - self._dropout)

    def apply(self, x, weights, state, rng):
        if x.ndim != 3:
            raise ValueError(
                "AxialPositionalEncoding: expects inputs of shape (batch, length, d_model), "
                f"got shape {tuple(x.shape)}"
            )
        check_feature_dim(x, self.d_model, self.name)
        batch, length = x.shape[0], x.shape[1]
        self._check_length(length)
        if self._mode == "predict":
            if not isinstance(state, jax.core.Tracer) and int(state) + length > self.max_len:
                raise ValueError(
                    f"AxialPositionalEncoding: positions {int(state)}..{int(state) + length - 1} "
                    f"exceed the {self.max_len} positions of shape {self._shape}"
                )
            positions = state + jnp.arange(length, dtype=jnp.int32)
            new_state = state + length
        else:
            positions = jnp.arange(length, dtype=jnp.int32)
            new_state = state
        emb = self.embeddings(positions, weights).astype(x.dtype)[None]
        if self._mode == "train" and self._dropout > 0.0:
            if rng is None:
                raise ValueError("AxialPositionalEncoding: dropout in train mode needs an rng")
            emb = emb * self._dropout_mask(positions, batch, rng, x.dtype)
        return x + emb, new_state


__all__ = ["AxialPositionalEncoding"]
