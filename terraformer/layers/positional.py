"""Positional encodings under trax 1.4.1's names, and the axial one of the Reformer.

- `PositionalEncoding`: a trainable [max_len, d] table initialised with interleaved sinusoids
  (trax's `pos_type=None`, TransformerLM's positions);
- `SinCosPositionalEncoding`: fixed concatenated sinusoids, started at a random offset in
  training (trax's 'sin-cos');
- `FixedBasePositionalEncoding`: positions written as digits in several bases, each digit
  scaling a trainable vector (trax's 'fixed-base');
- `AxialPositionalEncoding`: learned axial tables ('axial').
The fixed concatenated sinusoids without any randomness are `core.SinusoidalPositionalEncoding`
('sinusoidal').
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from terraformer.checks import check_int, check_rate
from terraformer.layers import initializers as init_lib
from terraformer.layers.base import EMPTY, Layer, check_mode
from terraformer.layers.core import check_feature_dim, sinusoids


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


def _check_positions(x, who: str):
    if x.ndim != 3:
        raise ValueError(f"{who}: expects inputs of shape (batch, length, d_model), got shape "
                         f"{tuple(x.shape)}")


def _predict_state(mode: str):
    return jnp.zeros((), jnp.int32) if mode == "predict" else EMPTY


def interleaved_sinusoids(max_len: int, d_feature: int) -> np.ndarray:
    """[max_len, d_feature] float32: sin(p w_i) at feature 2i, cos(p w_i) at 2i + 1, with
    w_i = 10000^(-2i / d_feature) (trax's PositionalEncoding table at initialisation)."""
    if d_feature % 2:
        raise ValueError(f"PositionalEncoding: d_feature must be even for interleaved "
                         f"sinusoids, got {d_feature}")
    angles = np.arange(max_len)[:, None] * np.exp(
        np.arange(0, d_feature, 2) * -(np.log(10000.0) / d_feature))
    table = np.zeros((max_len, d_feature), np.float32)
    table[:, 0::2] = np.sin(angles)
    table[:, 1::2] = np.cos(angles)
    return table


def _broadcast_dropout(px, rate: float, broadcast_dims, rng, dtype):
    """px [1, length, d] times a keep-mask / keep_prob shared along `broadcast_dims`."""
    noise_shape = list(px.shape)
    for dim in broadcast_dims:
        noise_shape[dim] = 1
    keep = jax.random.bernoulli(rng, 1.0 - rate, tuple(noise_shape))
    return px * (keep.astype(dtype) / (1.0 - rate))


class PositionalEncoding(Layer):
    """Adds a trainable positional table: (batch, length, d) -> same (trax's `pos_type=None`).

    Weights: the table [max_len, d], initialised with interleaved sinusoids
    (`interleaved_sinusoids`) and trained like any weight. Position p adds row p.

    Train mode: with probability 1 - `start_from_zero_prob` the rows start at a random offset
    in [0, max_offset_to_add) instead of 0 (one offset per call); `dropout` drops whole
    features of the table, one mask shared along `dropout_broadcast_dims` of [1, length, d]
    (the default (-2,): the same features at every position), as trax does. Eval adds rows
    0 .. length - 1. Predict keeps the next position in its state, so feeding a sequence piece
    by piece adds the rows that eval adds.
    """

    def __init__(self, max_len: int = 2048, dropout: float = 0.0, dropout_broadcast_dims=(-2,),
                 start_from_zero_prob: float = 1.0, max_offset_to_add: int = 0,
                 mode: str = "train"):
        who = "PositionalEncoding"
        super().__init__(name=who)
        self._max_len = check_int("max_len", max_len, 1, who)
        self._dropout = check_rate("dropout", dropout, who)
        self._broadcast_dims = tuple(int(d) for d in dropout_broadcast_dims)
        self._start_prob = float(start_from_zero_prob)
        self._max_offset = check_int("max_offset_to_add", max_offset_to_add, 0, who)
        self._mode = check_mode(mode)

    def init_weights_and_state(self, input_signature, rng):
        if isinstance(input_signature, tuple) or len(input_signature.shape) != 3:
            raise ValueError(f"{self.name}: expects one input of shape (batch, length, d_model), "
                             f"got {input_signature}")
        table = jnp.asarray(interleaved_sinusoids(self._max_len, input_signature.shape[-1]))
        return table, _predict_state(self._mode)

    def apply(self, x, weights, state, rng):
        _check_positions(x, self.name)
        check_feature_dim(x, weights.shape[-1], self.name)
        length = x.shape[1]
        if length > self._max_len:
            raise ValueError(f"{self.name}: length {length} exceeds max_len={self._max_len}")
        table = weights.astype(x.dtype)
        if self._mode == "predict":
            px = lax.dynamic_slice_in_dim(table, state, length, axis=0)
            return x + px[None], state + length
        start = 0
        needs_rng = self._mode == "train" and (self._start_prob < 1.0 or self._dropout > 0.0)
        if needs_rng and rng is None:
            raise ValueError(f"{self.name}: train mode with random starts or dropout needs an "
                             "rng; pass rng= to apply")
        if self._mode == "train" and self._start_prob < 1.0:
            rng, rng_offset, rng_zero = jax.random.split(rng, 3)
            offset = jax.random.randint(rng_offset, (), 0, max(self._max_offset, 1))
            from_zero = jax.random.uniform(rng_zero, ()) < self._start_prob
            start = jnp.where(from_zero, 0, offset)
        px = lax.dynamic_slice_in_dim(table, start, length, axis=0)[None]
        if self._mode == "train" and self._dropout > 0.0:
            px = _broadcast_dropout(px, self._dropout, self._broadcast_dims, rng, x.dtype)
        return x + px, state


class SinCosPositionalEncoding(Layer):
    """Adds fixed concatenated sinusoids from a random start: (batch, length, d) -> same
    (trax's 'sin-cos').

    Position p adds `core.sinusoids(start + p, d)` (sines then cosines). In train mode `start`
    is 0 one call in `start_from_zero_one_in`, else uniform in [0, add_offset) (one per
    call); eval starts at 0; predict keeps the next position in its state. `dropout` (train)
    drops features with a mask shared along `dropout_broadcast_dims` of [1, length, d].
    No weights.
    """

    def __init__(self, add_offset: int = 2048, dropout: float = 0.0,
                 dropout_broadcast_dims=(-2,), start_from_zero_one_in: int = 2,
                 mode: str = "train"):
        who = "SinCosPositionalEncoding"
        super().__init__(name=who)
        self._add_offset = check_int("add_offset", add_offset, 1, who)
        self._dropout = check_rate("dropout", dropout, who)
        self._broadcast_dims = tuple(int(d) for d in dropout_broadcast_dims)
        self._one_in = check_int("start_from_zero_one_in", start_from_zero_one_in, 1, who)
        self._mode = check_mode(mode)

    def init_weights_and_state(self, input_signature, rng):
        return EMPTY, _predict_state(self._mode)

    def apply(self, x, weights, state, rng):
        _check_positions(x, self.name)
        length = x.shape[1]
        if self._mode == "predict":
            pe = sinusoids(state + jnp.arange(length, dtype=jnp.int32), x.shape[-1])
            return x + pe.astype(x.dtype)[None], state + length
        start = jnp.zeros((), jnp.int32)
        if self._mode == "train":
            if rng is None:
                raise ValueError(f"{self.name}: train mode needs an rng; pass rng= to apply")
            rng, rng_offset, rng_zero = jax.random.split(rng, 3)
            offset = jax.random.randint(rng_offset, (), 0, self._add_offset)
            nonzero = jnp.minimum(1, jax.random.randint(rng_zero, (), 0, self._one_in))
            start = offset * nonzero
        px = sinusoids(start + jnp.arange(length, dtype=jnp.int32), x.shape[-1])
        px = px.astype(x.dtype)[None]
        if self._mode == "train" and self._dropout > 0.0:
            px = _broadcast_dropout(px, self._dropout, self._broadcast_dims, rng, x.dtype)
        return x + px, state


class FixedBasePositionalEncoding(Layer):
    """Adds positions written in fixed bases: (batch, length, d) -> same (trax's 'fixed-base').

    For each base B of `bases`, position p has `n_digits` digits in base B (least significant
    first); digit i scales a trainable vector s[B, i] of d / n_digits features, and the scaled
    vectors side by side (digit-major) form that base's embedding; the bases' embeddings are
    summed. The first position of each call also adds the trainable `start` vector.

    Train mode draws, per example, a random start (0 one time in `start_from_zero_one_in`, else
    uniform in [0, min(bases)^n_digits - length)) and, one time in `base_dropout_one_in`,
    drops the digit embeddings of every base (the start vector stays). Eval starts at 0;
    predict keeps the next position in its state and adds `start` only at position 0.

    Weights: `{'digits': [n_bases, n_digits, d / n_digits], 'start': [d]}`, both uniform in
    [-1e-4, 1e-4] at initialisation (trax's).
    """

    def __init__(self, bases=(11, 13, 14, 15), n_digits: int = 8,
                 start_from_zero_one_in: int = 2, base_dropout_one_in: int = 100,
                 mode: str = "train", initializer=init_lib.random_uniform(1e-4)):
        who = "FixedBasePositionalEncoding"
        super().__init__(name=who)
        self._bases = tuple(check_int(f"bases[{i}]", b, 2, who) for i, b in enumerate(bases))
        if not self._bases:
            raise ValueError(f"{who}: bases must hold at least one base, got {bases!r}")
        self._n_digits = check_int("n_digits", n_digits, 1, who)
        self._one_in = check_int("start_from_zero_one_in", start_from_zero_one_in, 1, who)
        self._base_dropout_one_in = check_int("base_dropout_one_in", base_dropout_one_in, 1, who)
        self._mode = check_mode(mode)
        self._init = initializer
        self._max_pos = min(self._bases) ** self._n_digits
        if max(self._bases) ** (self._n_digits - 1) >= 2**31:
            raise ValueError(f"{who}: max(bases)^(n_digits - 1) must fit in int32, got bases="
                             f"{self._bases} and n_digits={self._n_digits}")

    def init_weights_and_state(self, input_signature, rng):
        if isinstance(input_signature, tuple) or len(input_signature.shape) != 3:
            raise ValueError(f"{self.name}: expects one input of shape (batch, length, d_model), "
                             f"got {input_signature}")
        d = input_signature.shape[-1]
        if d % self._n_digits:
            raise ValueError(f"{self.name}: d_model must be a multiple of n_digits="
                             f"{self._n_digits}, got d_model={d}")
        rng_digits, rng_start = jax.random.split(rng)
        weights = {
            "digits": self._init(rng_digits, (len(self._bases), self._n_digits,
                                              d // self._n_digits)),
            "start": self._init(rng_start, (d,)),
        }
        return weights, _predict_state(self._mode)

    def apply(self, x, weights, state, rng):
        _check_positions(x, self.name)
        check_feature_dim(x, weights["start"].shape[-1], self.name)
        batch, length = x.shape[0], x.shape[1]
        if length >= self._max_pos:
            raise ValueError(f"{self.name}: length {length} must be below "
                             f"min(bases)^n_digits = {self._max_pos}")
        positions = jnp.arange(length, dtype=jnp.int32)[None]  # [1 or batch, length]
        keep_digits = None
        if self._mode == "train":
            if rng is None:
                raise ValueError(f"{self.name}: train mode needs an rng; pass rng= to apply")
            rng_zero, rng_start, rng_drop = jax.random.split(rng, 3)
            nonzero = jnp.minimum(1, jax.random.randint(rng_zero, (batch,), 0, self._one_in))
            start = jax.random.randint(rng_start, (batch,), 0, self._max_pos - length) * nonzero
            positions = positions + start[:, None]
            keep_digits = jnp.minimum(
                1, jax.random.randint(rng_drop, (batch,), 0, self._base_dropout_one_in))
        elif self._mode == "predict":
            positions = positions + state
        digits = weights["digits"].astype(x.dtype)
        emb = 0.0
        for b, base in enumerate(self._bases):
            powers = jnp.asarray([[[base**i for i in range(self._n_digits)]]], jnp.int32)
            idx = (positions[..., None] // powers) % base  # [., length, n_digits]
            e = (idx.astype(x.dtype)[..., None] * digits[b][None, None]).reshape(
                idx.shape[:2] + (-1,))
            emb = emb + e
        if keep_digits is not None:
            emb = emb * keep_digits.astype(x.dtype)[:, None, None]
        first = emb[:, :1] + lax.broadcast_to_rank(weights["start"].astype(x.dtype), 3)
        if self._mode == "predict":
            first = jnp.where(state == 0, first, emb[:, :1])
            state = state + length
        emb = jnp.concatenate([first, emb[:, 1:]], axis=1)
        return x + emb, state


__all__ = ["AxialPositionalEncoding", "FixedBasePositionalEncoding", "PositionalEncoding",
           "SinCosPositionalEncoding", "interleaved_sinusoids"]
