"""Quantized storage: bf16 and int8 (per-channel symmetric) weights; bf16 optimizer slots.

Weights for decoding::

    qweights = quantize(weights, "int8")          # a pytree; big float leaves -> QuantizedArray
    decoder = Decoder(QuantizedModel(model), qweights)   # dequantized inside the jitted step
    log_probs, state = quantized_apply(model.apply)(x, qweights, state, rng)

A `QuantizedArray` holds `data` (int8 or bfloat16) and, for int8, `scale` (float32): one scale
per output channel, i.e. per slice along every axis but the contraction axis -2 (a Dense
kernel [d_in, d_out] gets d_out scales; a stacked [n_layers, d_in, d_out] one per layer and
unit; an embedding table [vocab, d] one per feature). Leaves smaller than `min_size`
elements (biases, LayerNorm scales, 1-D vectors) and non-float leaves stay as they are.

Round-trip error (`dequantize(quantize(x))` against `x`, float32 inputs):

- int8: `scale = max|x| / 127` over the channel; `|x - x~| <= scale / 2` elementwise
  (round to nearest; a channel of zeros is stored exactly);
- bf16: round to nearest with an 8-bit significand: `|x - x~| <= 2**-8 * |x|` (normal range).

Model tolerance (a freshly initialised 2-layer TransformerLM, d_model 64, vocab 64, eval mode,
log-probabilities against float32): measured max |dlogp| about 0.012 (bf16) and 0.035 (int8);
the tests hold them to bf16 < 0.05 and int8 < 0.1, with greedy tokens agreeing at > 90% of
positions.

Dequantization happens inside the compiled function that takes the quantized tree, so what
is stored, transferred and passed to the step is the small arrays: int8 is 1/4 of float32,
bf16 1/2 (per-channel scales add 4 bytes per channel). Whether the matmul then reads only the
small bytes depends on the compiler fusing the conversion into it (XLA's GPU and TPU
pipelines do for a convert feeding a dot; XLA:CPU materialises a float copy of each weight
inside the step, layer by layer, so on CPU the win is memory held, not bytes read).

Optimizer slots: `quantized_slots(optimizer, "bf16")` wraps an optax transformation so its
float state (Adam's mu and nu) is stored in bfloat16 and computed in float32: half the slot
memory. Each update rounds the new moments to bf16 (relative 2**-8), so updates match the
float32 optimizer's to about 1% per step (tested over a few steps of a small model).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from terraformer.layers.base import Layer

__all__ = [
    "DTYPES",
    "pack_for_decoding",
    "QuantizedArray",
    "QuantizedModel",
    "dequantize",
    "is_quantized",
    "quantize",
    "quantize_array",
    "quantized_apply",
    "quantized_slots",
    "tree_nbytes",
]

DTYPES = ("bf16", "int8")
_ALIASES = {"bf16": "bf16", "bfloat16": "bf16", "int8": "int8"}
INT8_MAX = 127


def _check_dtype(dtype, who: str) -> str:
    """'bf16' or 'int8' from a name ('bf16', 'bfloat16', 'int8') or a numpy/jax dtype."""
    if isinstance(dtype, str):
        key = dtype.lower()
    else:
        try:
            key = jnp.dtype(dtype).name
        except TypeError:
            key = None
    if key not in _ALIASES:
        raise ValueError(f"{who}: dtype must be one of 'bf16', 'int8', got {dtype!r}")
    return _ALIASES[key]


@jax.tree_util.register_pytree_node_class
class QuantizedArray:
    """A float array stored as int8 with per-channel scales, or as bfloat16.

    Attributes:
      data: int8 (or bfloat16) array of the original shape.
      scale: float32 array broadcastable to `data` (size 1 on axis -2), or None for bf16.
      dtype: the original dtype (what `dequantize` returns).

    A pytree node (children `data`, `scale`), so quantized weight trees pass through
    `jax.jit`, `device_put` and checkpoints like ordinary ones.
    """

    def __init__(self, data, scale, dtype):
        self.data = data
        self.scale = scale
        self.dtype = jnp.dtype(dtype)

    def tree_flatten(self):
        return (self.data, self.scale), self.dtype

    @classmethod
    def tree_unflatten(cls, dtype, children):
        return cls(children[0], children[1], dtype)

    @property
    def shape(self) -> tuple:
        return tuple(self.data.shape)

    @property
    def ndim(self) -> int:
        return len(self.data.shape)

    @property
    def size(self) -> int:
        return math.prod(self.data.shape)

    @property
    def nbytes(self) -> int:
        """Bytes stored: data plus scales."""
        total = self.size * jnp.dtype(self.data.dtype).itemsize
        if self.scale is not None:
            total += math.prod(self.scale.shape) * jnp.dtype(self.scale.dtype).itemsize
        return total

    def dequantize(self):
        """The float array (of `dtype`) this stands for."""
        if self.scale is None:
            return self.data.astype(self.dtype)
        return (self.data.astype(jnp.float32) * self.scale).astype(self.dtype)

    def __repr__(self) -> str:
        kind = "bf16" if self.scale is None else "int8"
        return f"QuantizedArray({kind}, shape={self.shape}, dtype={self.dtype.name})"


def is_quantized(x) -> bool:
    return isinstance(x, QuantizedArray)


def quantize_array(x, dtype: str = "int8") -> QuantizedArray:
    """One float array as a QuantizedArray (int8: per-channel scales over axis -2)."""
    kind = _check_dtype(dtype, "quantize_array")
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"quantize_array: expected a float array, got {x.dtype}")
    if kind == "bf16":
        return QuantizedArray(x.astype(jnp.bfloat16), None, x.dtype)
    x32 = x.astype(jnp.float32)
    axis = -2 if x.ndim >= 2 else -1
    amax = jnp.max(jnp.abs(x32), axis=axis, keepdims=True) if x.ndim else jnp.abs(x32)
    scale = jnp.where(amax > 0, amax / INT8_MAX, 1.0).astype(jnp.float32)
    q = jnp.clip(jnp.round(x32 / scale), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return QuantizedArray(q, scale, x.dtype)


def quantize(weights, dtype: str = "int8", min_size: int = 4096):
    """`weights` with every float leaf of at least `min_size` elements quantized.

    Args:
      weights: a pytree of arrays (a model's weights).
      dtype: 'bf16' or 'int8' (per-channel symmetric scales; see the module docstring).
      min_size: smaller leaves (and non-float ones) are kept as they are.

    Returns:
      The same pytree with QuantizedArray leaves; `dequantize` undoes it (within the
      documented error).
    """
    kind = _check_dtype(dtype, "quantize")
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 0:
        raise ValueError(f"quantize: min_size must be an int >= 0, got {min_size!r}")

    def leaf(x):
        if is_quantized(x) or not hasattr(x, "dtype"):
            return x
        if not jnp.issubdtype(x.dtype, jnp.floating) or math.prod(x.shape) < max(min_size, 1):
            return x
        return quantize_array(x, kind)

    return jax.tree.map(leaf, weights, is_leaf=is_quantized)


def dequantize(weights):
    """`weights` with every QuantizedArray replaced by its float array (works under jit)."""
    return jax.tree.map(lambda x: x.dequantize() if is_quantized(x) else x, weights,
                        is_leaf=is_quantized)


def tree_nbytes(tree) -> int:
    """Bytes stored by `tree` (QuantizedArrays counted as data + scales)."""
    total = 0
    for x in jax.tree.leaves(tree, is_leaf=is_quantized):
        total += x.nbytes if is_quantized(x) else math.prod(x.shape) * jnp.dtype(
            x.dtype).itemsize
    return total


def quantized_apply(apply_fn):
    """`apply_fn(x, weights, state, rng)` taking quantized weights, dequantized inside.

    Use it inside (or as) a jitted function: then the quantized arrays are what is passed in
    and the float weights exist only as the compiled step's temporaries.
    """

    def apply(x, weights, state, rng):
        return apply_fn(x, dequantize(weights), state, rng)

    return apply


class QuantizedModel(Layer):
    """A model taking quantized weights: `apply` dequantizes them, then runs `model`.

    For `decoding.Decoder`, whose compiled prefill and generation loops call `apply`: pass
    `quantize(weights, dtype)` as the weights and the dequantization runs inside those loops.
    `init` returns the wrapped model's weights quantized (`dtype`, `min_size`) and its state.
    """

    def __init__(self, model: Layer, dtype: str = "int8", min_size: int = 4096):
        if not isinstance(model, Layer):
            raise TypeError(f"QuantizedModel: model must be a Layer, got {type(model).__name__}")
        super().__init__(n_in=model.n_in, n_out=model.n_out,
                         name=f"Quantized{model.name}", sublayers=[model])
        self._dtype = _check_dtype(dtype, "QuantizedModel")
        self._min_size = min_size

    def init_weights_and_state(self, input_signature, rng):
        weights, state = self.sublayers[0].init_weights_and_state(input_signature, rng)
        return quantize(weights, self._dtype, self._min_size), state

    def apply(self, x, weights, state, rng):
        return self.sublayers[0].apply(x, dequantize(weights), state, rng)


# ---------------------------------------------------------------------------------------------
# Decoding weights.


def _pass_through_types() -> tuple:
    """Combinators whose weights are their single sublayer's weights (not a tuple of them)."""
    from terraformer.layers.combinators import Chunk, Scan
    from terraformer.layers.reversible import ReversibleRepeat

    return (Chunk, Scan, ReversibleRepeat, QuantizedModel)


def pack_for_decoding(model: Layer, weights, dtype: str = "float32",
                      output_dtype: str | None = None):
    """`weights` of `model` with the kernels its layers multiply by stored for decoding.

    Walks the layer tree beside the weights tree: a layer with a `pack_for_decoding(weights,
    dtype)` method (Dense, SelfAttention, SparseFF) repacks its own weights, typically as
    `core.PackedKernel`s (rows [d_out, d_in] in float32, bfloat16 or int8 with a scale per
    output unit), which their `apply` multiplies by without building a float32 copy per step;
    combinators are entered (weights a tuple per sublayer, or their one sublayer's, stacked
    for ReversibleRepeat; a predict-mode ReversibleRepeat's are split into `UnstackedLayers`,
    one buffer per layer); everything else is kept as it is. QuantizedArray leaves are
    dequantized first. The result goes to `decoding.Decoder` in place of `weights`.

    Numerics: 'float32' only changes the layout (outputs equal to float rounding); 'int8'
    rounds each kernel entry to within half its row's step, scale / 2 (the module docstring's
    tolerances hold for the logits); 'bf16' to 2**-8 relative. `output_dtype`, when given,
    is used instead of `dtype` for the output layer: the last Dense of the top-level Serial
    (the vocabulary projection, the largest matrix a decoding step reads).
    """
    from terraformer.layers.core import DECODE_DTYPES, Dense
    from terraformer.layers.reversible import ReversibleRepeat, UnstackedLayers

    for name, value in (("dtype", dtype), ("output_dtype", output_dtype or dtype)):
        if value not in DECODE_DTYPES:
            raise ValueError(f"pack_for_decoding: {name} must be one of {DECODE_DTYPES}, "
                             f"got {value!r}")
    pass_through = _pass_through_types()

    def walk(layer, w):
        if hasattr(layer, "pack_for_decoding"):
            return layer.pack_for_decoding(w, dtype)
        if isinstance(layer, ReversibleRepeat) and layer.unrolled:
            return UnstackedLayers(tuple(walk(layer.sublayers[0], layer.layer_weights(w, i))
                                         for i in range(layer.n_layers)))
        subs = layer.sublayers
        if isinstance(layer, pass_through):
            return walk(subs[0], w)
        if subs and isinstance(w, tuple) and len(w) == len(subs):
            return tuple(walk(sub, sw) for sub, sw in zip(subs, w))
        return w

    weights = dequantize(weights)
    subs = model.sublayers
    dense_at = [i for i, sub in enumerate(subs) if isinstance(sub, Dense)]
    if output_dtype is None or not dense_at or not (
            isinstance(weights, tuple) and len(weights) == len(subs)):
        return walk(model, weights)
    out = dense_at[-1]
    return tuple(subs[i].pack_for_decoding(w, output_dtype) if i == out else walk(subs[i], w)
                 for i, w in enumerate(weights))


# ---------------------------------------------------------------------------------------------
# Optimizer slots.


def quantized_slots(optimizer: optax.GradientTransformation, dtype: str = "bf16",
                    min_size: int = 1) -> optax.GradientTransformation:
    """`optimizer` with its float state stored in bfloat16 (computed in float32).

    Every floating state leaf with at least `min_size` elements and at least one axis (Adam's
    `mu` and `nu`, momentum traces) is kept in bf16 between steps; scalars (step counts,
    the logged learning rate) stay as they are. Only 'bf16' is offered: int8 moments need
    per-block scales refreshed every step and lose too much of `nu`'s dynamic range.
    """
    if _check_dtype(dtype, "quantized_slots") != "bf16":
        raise ValueError(f"quantized_slots: only 'bf16' slots are supported, got {dtype!r}")

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
