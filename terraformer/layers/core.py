"""Core layers: Dense, Embedding, Dropout, LayerNorm, activations, shifts, positions.

Also the one int8 format (`quantize_int8` / `dequantize_int8`: symmetric, one float32 scale
per slice) and `PackedKernel`, the Dense kernel layout that decoding multiplies by.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from terraformer.checks import check_choice, check_int, check_rate
from terraformer.layers import initializers as init_lib
from terraformer.layers.base import EMPTY, Layer, PureLayer, check_mode


def _last_dim(input_signature, who: str) -> int:
    if isinstance(input_signature, tuple):
        raise ValueError(f"{who}: takes one input, got a signature of {len(input_signature)}")
    if len(input_signature.shape) < 1:
        raise ValueError(f"{who}: input must have at least 1 axis, got shape ()")
    return input_signature.shape[-1]


def check_feature_dim(x, expected: int, who: str) -> None:
    """Raises a ValueError naming `who` when x's last axis is not `expected`."""
    if x.shape[-1] != expected:
        raise ValueError(
            f"{who}: expected inputs with last axis {expected}, got shape {tuple(x.shape)}"
        )


def check_token_ids(ids, vocab_size: int, who: str) -> None:
    """Raises a ValueError when concrete integer `ids` fall outside [0, vocab_size).

    Traced values (inside jit) cannot be checked here; the data pipeline checks them first.
    """
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"{who}: expected integer token ids, got dtype {ids.dtype}")
    if isinstance(ids, jax.core.Tracer):
        return
    values = np.asarray(ids)
    if values.size and (values.min() < 0 or values.max() >= vocab_size):
        raise ValueError(
            f"{who}: token ids must be in [0, {vocab_size}), got values in "
            f"[{values.min()}, {values.max()}]"
        )


DECODE_DTYPES = ("float32", "bf16", "int8")
INT8_MAX = 127


def quantize_int8(x, axis: int = -1):
    """Symmetric int8 quantization of `x` with one scale per slice along `axis`.

    Returns `(q, scale)`: q int8 of x's shape, scale float32 of x's shape without `axis`,
    `scale = max|x| / INT8_MAX` over the slice (1 for a slice of zeros, stored exactly) and
    `q = round(x / scale)`, so `|x - dequantize_int8(q, scale, axis)| <= scale / 2` entrywise.
    """
    x32 = jnp.asarray(x, jnp.float32)
    amax = jnp.max(jnp.abs(x32), axis=axis)
    scale = jnp.where(amax > 0, amax / INT8_MAX, 1.0).astype(jnp.float32)
    q = jnp.clip(jnp.round(x32 / jnp.expand_dims(scale, axis)), -INT8_MAX, INT8_MAX)
    return q.astype(jnp.int8), scale


def dequantize_int8(q, scale, axis: int = -1):
    """The float32 array `quantize_int8` stored as `(q, scale)` (scales along `axis`)."""
    return q.astype(jnp.float32) * jnp.expand_dims(scale, axis)


@jax.tree_util.register_pytree_node_class
class PackedKernel:
    """A Dense kernel [..., d_in, d_out] stored for decoding as rows [..., d_out, d_in].

    `rows` is float32, bfloat16, or int8 with `scale` [..., d_out] (float32, one per output
    unit, from `quantize_int8` over each row: |w - rows * scale| <= scale / 2). XLA:CPU fuses
    the conversion of `rows` into a matrix-vector product whose contraction is the minor axis,
    so a decoding step reads only the stored bytes (the [d_in, d_out] layout, or an int8
    table dequantized first, materialises a float32 copy per step), and inside `lax.scan` over
    stacked layers the layer's slice is read in place instead of copied out first.
    """

    def __init__(self, rows, scale=None):
        self.rows = rows
        self.scale = scale

    def tree_flatten(self):
        return (self.rows, self.scale), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        del aux
        return cls(*children)

    @property
    def shape(self) -> tuple:
        """The logical kernel shape [..., d_in, d_out]."""
        shape = tuple(self.rows.shape)
        return shape[:-2] + (shape[-1], shape[-2])

    @property
    def ndim(self) -> int:
        return len(self.rows.shape)

    @property
    def nbytes(self) -> int:
        total = math.prod(self.rows.shape) * jnp.dtype(self.rows.dtype).itemsize
        if self.scale is not None:
            total += math.prod(self.scale.shape) * jnp.dtype(self.scale.dtype).itemsize
        return total

    def matmul(self, x):
        """x [..., d_in] -> x @ kernel [..., d_out], computed in x's dtype."""
        if self.rows.dtype == x.dtype:  # a plain matrix-vector product, no copy of rows
            return jax.lax.dot_general(x, self.rows, (((x.ndim - 1,), (1,)), ((), ())))
        if self.rows.ndim == 2:
            y = _converting_matmul_blocked(x, self.rows)
        else:
            y = _converting_matmul(x, self.rows)
        return y if self.scale is None else y * jax.lax.broadcast_to_rank(
            self.scale.astype(x.dtype), y.ndim)

    def dense(self):
        """The float32 kernel [..., d_in, d_out] this stands for."""
        if self.scale is None:
            rows = self.rows.astype(jnp.float32)
        else:
            rows = dequantize_int8(self.rows, self.scale)
        return jnp.swapaxes(rows, -1, -2)


_CONVERT_BLOCK_ELEMENTS = 1 << 21  # kernel entries converted per block (2 MiB of int8)


def _converting_matmul(x, rows):
    """x [..., d_in] @ rows[..., d_out, d_in].T in x's dtype, converting rows as they are read.

    Written as x @ rows.T: the form XLA:CPU turns into one fused loop that converts `rows` as
    it reads them; a dot_general contracting rows' minor axis directly gets a materialised
    float32 copy instead. The barrier keeps a following bias add from claiming the dot as an
    output fusion, which also materialises the copy.
    """
    return jax.lax.optimization_barrier(jnp.matmul(x, rows.astype(x.dtype).T))


def _converting_matmul_blocked(x, rows):
    """`_converting_matmul` over blocks of at least two row ranges, under `lax.map`.

    Inside a compiled loop (the decoding loop) XLA:CPU materialises the converted float32
    kernel of a whole-matrix product every step; the same product split into row blocks
    under `lax.map` keeps the conversion fused (figures: benchmarks/RESULTS.md). A single
    block would be simplified back into the whole-matrix product.
    """
    d_out, d_in = rows.shape
    n_blocks = max(2, -(-rows.size // _CONVERT_BLOCK_ELEMENTS))
    while n_blocks < d_out and d_out % n_blocks:
        n_blocks += 1
    if n_blocks >= d_out:  # no useful split (d_out prime, or tiny): one fused product
        return _converting_matmul(x, rows)
    blocks = rows.reshape(n_blocks, d_out // n_blocks, d_in)
    y = jax.lax.map(lambda block: jnp.matmul(x, block.astype(x.dtype).T), blocks)
    return jnp.moveaxis(y, 0, -2).reshape(x.shape[:-1] + (d_out,))


def pack_kernel(w, dtype: str = "float32") -> PackedKernel:
    """A Dense kernel [..., d_in, d_out] as a PackedKernel of `dtype` ('float32', 'bf16',
    'int8': `quantize_int8`, one scale per output unit)."""
    check_choice("dtype", dtype, DECODE_DTYPES, "pack_kernel")
    if isinstance(w, PackedKernel):
        w = w.dense()
    rows = jnp.swapaxes(jnp.asarray(w, jnp.float32), -1, -2)
    if dtype == "float32":
        return PackedKernel(rows)
    if dtype == "bf16":
        return PackedKernel(rows.astype(jnp.bfloat16))
    return PackedKernel(*quantize_int8(rows))


def argmax(x, axis: int = -1):
    """jnp.argmax (int32, ties to the lowest index) as a max and a min reduction.

    XLA:CPU runs argmax's value-and-index reduction element by element; two plain reductions
    vectorise (a sparse feed-forward's choice of units at every decoding step). Rows
    holding NaN give an index in range, not necessarily the NaN's.
    """
    axis = axis % x.ndim
    top = jnp.max(x, axis=axis, keepdims=True)
    index = jax.lax.broadcasted_iota(jnp.int32, x.shape, axis)
    first = jnp.min(jnp.where(x == top, index, x.shape[axis]), axis=axis)
    return jnp.minimum(first, x.shape[axis] - 1)


def fold_last_axis(x, combine, reduce, width: int = 32):
    """`reduce(x, axis=-1)` for an associative `combine` (jnp.maximum for jnp.max, jnp.add
    for jnp.sum): the `width`-wide slices of the last axis are first combined elementwise.

    XLA:CPU runs a reduction over a long axis as a reduce-window pass plus a reduce, neither
    vectorised across rows; one elementwise pass over the slices and a `width`-long reduce is
    faster on the score blocks of window attention (figures: benchmarks/RESULTS.md).
    """
    n = x.shape[-1]
    if n % width or n <= width:
        return reduce(x, axis=-1)
    return reduce(functools.reduce(combine, [x[..., i:i + width] for i in range(0, n, width)]),
                  axis=-1)


def matmul(x, w):
    """x [..., d_in] @ w [d_in, d_out], w a float array or a PackedKernel."""
    if isinstance(w, PackedKernel):
        return w.matmul(x)
    return jnp.dot(x, w.astype(x.dtype))


class Dense(Layer):
    """Affine map of the last axis: (..., d_in) -> (..., n_units).

    Weights: `{'w': [d_in, n_units], 'b': [n_units]}` (no 'b' when use_bias=False); for
    decoding 'w' may be a `PackedKernel` (`pack_for_decoding`).
    """

    def __init__(
        self,
        n_units: int,
        use_bias: bool = True,
        kernel_initializer=init_lib.glorot_uniform,
        bias_initializer=init_lib.random_normal(1e-6),
    ):
        check_int("n_units", n_units, 1, "Dense")
        super().__init__(name=f"Dense_{n_units}")
        self._n_units = n_units
        self._use_bias = use_bias
        self._kernel_init = kernel_initializer
        self._bias_init = bias_initializer

    def init_weights_and_state(self, input_signature, rng):
        d_in = _last_dim(input_signature, self.name)
        rng_w, rng_b = jax.random.split(rng)
        weights = {"w": self._kernel_init(rng_w, (d_in, self._n_units))}
        if self._use_bias:
            weights["b"] = self._bias_init(rng_b, (self._n_units,))
        return weights, EMPTY

    def pack_for_decoding(self, weights, dtype: str):
        """These weights with the kernel as a PackedKernel (see `pack_kernel`): a decoding
        step's matrix-vector product then reads the stored rows in place."""
        return {**weights, "w": pack_kernel(weights["w"], dtype)}

    def apply(self, x, weights, state, rng):
        check_feature_dim(x, weights["w"].shape[-2], self.name)
        y = matmul(x, weights["w"])
        if "b" in weights:
            y = y + jax.lax.broadcast_to_rank(weights["b"].astype(x.dtype), y.ndim)
        return y, state


# The initial scale of token vectors (positional tables start at about 1).
EMBEDDING_STDDEV = 0.25


class Embedding(Layer):
    """Token ids to vectors: (batch, length) int -> (batch, length, d_feature).

    Weights: `[vocab_size, d_feature]`, normal with stddev `EMBEDDING_STDDEV` unless a
    `kernel_initializer` is given. (Trax draws uniform with variance `1 / d_feature`; a loaded
    table computes the same function either way, the initial draw only sets how fast a model
    learns: about a quarter of the positions' scale lets a text model learn from both the
    tokens and their order early; `benchmarks/RESULTS.md` has the runs.)
    """

    def __init__(self, vocab_size: int, d_feature: int, kernel_initializer=None):
        check_int("vocab_size", vocab_size, 1, "Embedding")
        check_int("d_feature", d_feature, 1, "Embedding")
        super().__init__(name=f"Embedding_{vocab_size}_{d_feature}")
        self.vocab_size = vocab_size
        self.d_feature = d_feature
        self._init = kernel_initializer or init_lib.random_normal(EMBEDDING_STDDEV)

    def init_weights_and_state(self, input_signature, rng):
        return self._init(rng, (self.vocab_size, self.d_feature)), EMPTY

    def apply(self, x, weights, state, rng):
        check_token_ids(x, self.vocab_size, self.name)
        return jnp.take(weights, x, axis=0), state


class Dropout(Layer):
    """Zeroes a `rate` fraction of entries in `train` mode and rescales the rest.

    `shared_axes` lists axes along which one mask is shared (e.g. [1] shares over length).
    Identity in `eval` and `predict`.
    """

    def __init__(self, rate: float = 0.0, shared_axes=None, mode: str = "train"):
        check_rate("rate", rate, "Dropout")
        super().__init__(name="Dropout")
        self._rate = rate
        self._shared_axes = tuple(shared_axes or ())
        self._mode = check_mode(mode)

    def apply(self, x, weights, state, rng):
        return dropout(x, self._rate, rng, self._mode, self._shared_axes), state


def dropout(x, rate: float, rng, mode: str, shared_axes=()):
    """Functional dropout (see `Dropout`)."""
    if mode != "train" or rate == 0.0:
        return x
    if rng is None:
        raise ValueError("Dropout in train mode needs an rng; pass rng= to apply")
    mask_shape = list(x.shape)
    for axis in shared_axes:
        mask_shape[axis] = 1
    keep = jax.random.bernoulli(rng, 1.0 - rate, tuple(mask_shape))
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class LayerNorm(Layer):
    """Normalises the last axis to zero mean and unit variance, then scales and shifts.

    Weights: `{'scale': [d], 'bias': [d]}`.
    """

    def __init__(self, epsilon: float = 1e-6):
        super().__init__(name="LayerNorm")
        self._epsilon = epsilon

    def init_weights_and_state(self, input_signature, rng):
        d = _last_dim(input_signature, self.name)
        return {"scale": jnp.ones((d,)), "bias": jnp.zeros((d,))}, EMPTY

    def apply(self, x, weights, state, rng):
        check_feature_dim(x, weights["scale"].shape[0], self.name)
        return layer_norm(x, weights["scale"], weights["bias"], self._epsilon), state


def layer_norm(x, scale, bias, epsilon: float = 1e-6):
    """Functional layer norm over the last axis (statistics in float32).

    Rematerialised: its gradient keeps only the inputs and recomputes the statistics, so
    that a long sequence's backward pass holds no [length, d] intermediates of it (the
    centred input, the normalised one) beside the input it already has.
    """
    return _layer_norm(x, scale, bias, epsilon)


@functools.partial(jax.checkpoint, static_argnums=(3,))
def _layer_norm(x, scale, bias, epsilon):
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + epsilon)
    scale, bias = (jax.lax.broadcast_to_rank(a, y.ndim) for a in (scale, bias))
    return (y * scale + bias).astype(x.dtype)


def Relu() -> Layer:  # noqa: N802
    return PureLayer(jax.nn.relu, name="Relu")


def Gelu() -> Layer:  # noqa: N802
    """Exact GELU (erf)."""
    return PureLayer(lambda x: jax.nn.gelu(x, approximate=False), name="Gelu")


def FastGelu() -> Layer:  # noqa: N802
    """GELU with the tanh approximation."""
    return PureLayer(lambda x: jax.nn.gelu(x, approximate=True), name="FastGelu")


def Sigmoid() -> Layer:  # noqa: N802
    return PureLayer(jax.nn.sigmoid, name="Sigmoid")


def Tanh() -> Layer:  # noqa: N802
    return PureLayer(jnp.tanh, name="Tanh")


def LogSoftmax(axis: int = -1) -> Layer:  # noqa: N802
    """Log-probabilities over `axis`."""
    return PureLayer(lambda x: jax.nn.log_softmax(x, axis=axis), name="LogSoftmax")


def Softmax(axis: int = -1) -> Layer:  # noqa: N802
    return PureLayer(lambda x: jax.nn.softmax(x, axis=axis), name="Softmax")


def Mean(axis: int = -1, keepdims: bool = False) -> Layer:  # noqa: N802
    return PureLayer(lambda x: jnp.mean(x, axis=axis, keepdims=keepdims), name="Mean")


class ShiftRight(Layer):
    """Shifts the length axis (1) right by `n_positions`, filling with `pad_id`.

    (batch, length, ...) -> same shape; token t sees token t-1. Identity in `predict` mode,
    where the decoder feeds the previous token itself.
    """

    def __init__(self, n_positions: int = 1, pad_id: int = 0, mode: str = "train"):
        super().__init__(name="ShiftRight")
        self._n = n_positions
        self._pad_id = pad_id
        self._mode = check_mode(mode)

    def apply(self, x, weights, state, rng):
        if self._mode == "predict":
            return x, state
        return shift_right(x, self._n, self._pad_id), state


def shift_right(x, n_positions: int = 1, pad_value=0):
    """Functional `ShiftRight` on axis 1."""
    pad = [(0, 0)] * x.ndim
    pad[1] = (n_positions, 0)
    return jnp.pad(x, pad, constant_values=pad_value)[:, : x.shape[1]]


def sinusoids(positions, d_feature: int):
    """Sinusoidal encodings of integer `positions`: (...,) -> (..., d_feature)."""
    half = d_feature // 2
    inv_freq = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / max(half, 1))
    angles = positions[..., None].astype(jnp.float32) * jax.lax.broadcast_to_rank(
        inv_freq, positions.ndim + 1)
    enc = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    if d_feature % 2:
        enc = jnp.pad(enc, [(0, 0)] * (enc.ndim - 1) + [(0, 1)])
    return enc


class SinusoidalPositionalEncoding(Layer):
    """Adds fixed sinusoidal position encodings: (batch, length, d) -> same.

    The encoding of position p is `sinusoids(p, d)`: [sin(p w_0) .. sin(p w_{d/2-1}),
    cos(p w_0) .. cos(p w_{d/2-1})] (sines then cosines), the same at every step, without
    weights (`pos_type='sinusoidal'`). Dropout (train mode) drops single entries of the
    encoding. Trax's names for positions are in `positional`: `PositionalEncoding` (a
    trainable interleaved table), `SinCosPositionalEncoding`, `FixedBasePositionalEncoding`.

    In `predict` mode the state holds the next position, so feeding a sequence piece by piece
    adds the same encodings as feeding it whole. Lengths beyond `max_len` are an error.
    """

    def __init__(self, max_len: int = 2048, dropout: float = 0.0, mode: str = "train"):
        super().__init__(name="SinusoidalPositionalEncoding")
        self._max_len = max_len
        self._dropout = dropout
        self._mode = check_mode(mode)

    def init_weights_and_state(self, input_signature, rng):
        state = jnp.zeros((), jnp.int32) if self._mode == "predict" else EMPTY
        return EMPTY, state

    def apply(self, x, weights, state, rng):
        length = x.shape[1]
        if length > self._max_len:
            raise ValueError(
                f"SinusoidalPositionalEncoding: length {length} exceeds max_len={self._max_len}"
            )
        start = state if self._mode == "predict" else 0
        enc = sinusoids(start + jnp.arange(length), x.shape[-1]).astype(x.dtype)
        enc = dropout(enc, self._dropout, rng, self._mode)
        new_state = state + length if self._mode == "predict" else state
        return x + enc[None], new_state
