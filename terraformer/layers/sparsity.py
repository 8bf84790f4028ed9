"""Sparse layers of the Terraformer ("Sparse is Enough in Scaling Transformers", 2021).

- `SparseFF`: a feed-forward block whose d_ff units form blocks of `n_elements_in_block`; a
  low-rank controller picks one unit per block, so only d_ff / n_elements_in_block units are
  active per token. At decode (`predict`) only the chosen rows of the two weight matrices are
  read.
- Sparse QKV: `FactoredDense` (the multiplicative dense layer, d_input * (S + M) weights
  instead of d_input * d_feature) followed by `LocallyConvDense` (a convolution over the
  (length, module) plane, causal in length), shared and combined in
  `MultiplicativeConvCausalAttention`; `MultiplicativeModularSparseDense` adds a per-module
  M x M kernel after the multiplicative one (trax's layers of these names).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from terraformer.checks import check_choice, check_int, check_number, check_rate
from terraformer.layers import initializers as init_lib
from terraformer.layers import kv_cache
from terraformer.layers.attention import merge_heads, split_heads
from terraformer.layers.attention_core import dot_product_attention
from terraformer.layers.base import EMPTY, Layer, check_mode
from terraformer.layers.combinators import Branch, Chunk, Serial
from terraformer.layers.core import (
    Dense,
    argmax,
    check_feature_dim,
    dropout,
    matmul,
    pack_kernel,
)


def _feature_dim(input_signature, who: str, min_ndim: int = 1) -> int:
    if isinstance(input_signature, tuple):
        raise ValueError(f"{who}: takes one input, got a signature of {len(input_signature)}")
    if len(input_signature.shape) < min_ndim:
        raise ValueError(
            f"{who}: input must have at least {min_ndim} axes, got shape "
            f"{tuple(input_signature.shape)}"
        )
    return input_signature.shape[-1]


# ------------------------------------------------------------------------------------------------
# SparseFF
# ------------------------------------------------------------------------------------------------


class SparseFF(Layer):
    """Feed-forward block with one active unit per block, chosen by a low-rank controller.

    (..., d_model) -> (..., d_model); with `ff_chunk_size` the input must be
    (batch, length, d_model).

    The d_ff hidden units form `n_blocks = d_ff // n_elements_in_block` blocks of
    `n_elements_in_block` units. For a token x the controller scores every unit,

        logits = (x @ m1) @ m2 + mb,     reshaped to [..., n_blocks, n_elements_in_block],

    and a mask with one (soft or hard) unit per block selects the hidden units:

        out = ((relu(x @ w1.T [+ b1]) * mask) @ w2) + b2,

    with the first-layer bias b1 only when `first_layer_bias=True` (trax's SparseFF has none).

    How the mask is made depends on the mode:

    - `eval`: mask = one_hot(argmax(logits)) per block, computed densely (all d_ff units, then
      masked).
    - `predict`: the same function, but computed sparsely: ids = block * n_elements_in_block +
      argmax(logits) ([..., n_blocks] unit ids), only rows w1[ids], b1[ids], w2[ids] are
      gathered, h = relu(sum_d x_d * w1[ids, d] + b1[ids]) ([..., n_blocks]) and
      out = sum_b h_b * w2[ids_b] + b2. Cost per token ~ 2 * d_model * n_blocks multiply-adds
      (plus the controller's d_model * d_lowrank + d_lowrank * d_ff) instead of 2 * d_model *
      d_ff; equal to `eval` up to float rounding.
    - `train`: Gumbel-softmax with a straight-through estimator. With g ~ Gumbel(0, 1) drawn per
      logit, noisy = logits + g,

          soft = softmax(noisy / temperature)                     (per block)
          hard = one_hot(argmax(noisy)) + soft - stop_gradient(soft)

      `hard` has the values of the one-hot mask and the gradient of `soft`. For each token
      (one Bernoulli(quant_prob) draw per position, shared by all its blocks) the mask is `hard`
      with probability `quant_prob`, else `soft`. So quant_prob=1 trains exactly the sparse
      function used at inference (with sampled choices), quant_prob=0 trains a soft mixture;
      as temperature -> 0 `soft` tends to the one-hot `hard` values, and the two agree.
      Dropout (`dropout_rate`, `dropout_shared_axes`, axes of the [..., d_ff] hidden tensor)
      acts on the masked hidden layer. Train mode needs an `rng`.

    Weights: `{'m1': [d_model, d_lowrank], 'm2': [d_lowrank, d_ff], 'mb': [d_ff],
    'w1': [d_ff, d_model], 'w2': [d_ff, d_model], 'b2': [d_model]}`, plus 'b1': [d_ff] with
    `first_layer_bias`. The first
    layer is stored transposed ([d_ff, d_model]) so a chosen unit's weights are one contiguous
    row of each matrix. Unit u of block k is row k * n_elements_in_block + u.

    Args:
      d_ff: number of hidden units; a multiple of `n_elements_in_block`.
      n_elements_in_block: units per block (one of which is active).
      d_lowrank: rank of the controller.
      temperature: Gumbel-softmax temperature (> 0) in train mode.
      quant_prob: probability of training a token with the hard (quantised) mask.
      use_bfloat16: compute the two big matmuls in bfloat16 (controller stays in input dtype).
      big_weights_in_bfloat16: store w1 and w2 in bfloat16 (halves the bytes read at decode).
      mode: 'train', 'eval' or 'predict'.
      kernel_initializer: `init(rng, (fan_in, fan_out))` for m1, m2, w1 (drawn as
        [d_model, d_ff] and transposed) and w2.
      dropout_rate: dropout on the hidden layer in train mode.
      dropout_shared_axes: axes of the hidden tensor sharing one dropout mask.
      ff_chunk_size: if > 0, run the block on chunks of this many positions of the length axis
        (axis 1), with the chunk body recomputed in the backward pass (see `Chunk`); memory then
        grows with the chunk, not the length. Each chunk gets its own rng.
      first_layer_bias: a bias b1 on the hidden units (ours; trax's SparseFF has none).
    """

    def __init__(
        self,
        d_ff: int,
        n_elements_in_block: int = 32,
        d_lowrank: int = 64,
        temperature: float = 0.1,
        quant_prob: float = 0.3,
        use_bfloat16: bool = False,
        big_weights_in_bfloat16: bool = False,
        mode: str = "train",
        kernel_initializer=init_lib.glorot_uniform,
        dropout_rate: float = 0.0,
        dropout_shared_axes=None,
        ff_chunk_size: int = 0,
        first_layer_bias: bool = False,
    ):
        who = "SparseFF"
        check_int("d_ff", d_ff, 1, who)
        check_int("n_elements_in_block", n_elements_in_block, 1, who)
        check_int("d_lowrank", d_lowrank, 1, who)
        if d_ff % n_elements_in_block:
            raise ValueError(
                f"{who}: d_ff must be a multiple of n_elements_in_block, got d_ff={d_ff} and "
                f"n_elements_in_block={n_elements_in_block}"
            )
        check_number("temperature", temperature, who, minimum=0.0, allow_minimum=False)
        check_number("quant_prob", quant_prob, who, minimum=0.0, maximum=1.0)
        check_rate("dropout_rate", dropout_rate, who)
        if ff_chunk_size is None:
            ff_chunk_size = 0
        check_int("ff_chunk_size", ff_chunk_size, 0, who)
        super().__init__(name=f"SparseFF_{d_ff}")
        self._d_ff = d_ff
        self._n_elements_in_block = n_elements_in_block
        self._n_blocks = d_ff // n_elements_in_block
        self._d_lowrank = d_lowrank
        self._temperature = float(temperature)
        self._quant_prob = float(quant_prob)
        self._use_bfloat16 = use_bfloat16
        self._big_weights_in_bfloat16 = big_weights_in_bfloat16
        self._mode = check_mode(mode)
        self._kernel_init = kernel_initializer
        self._bias_init = init_lib.random_normal(1e-6)
        self._dropout_rate = float(dropout_rate)
        self._dropout_shared_axes = tuple(dropout_shared_axes or ())
        self._ff_chunk_size = ff_chunk_size
        self._first_layer_bias = bool(first_layer_bias)
        self._chunked = Chunk(_SparseFFBody(self), ff_chunk_size) if ff_chunk_size else None

    @property
    def n_blocks(self) -> int:
        return self._n_blocks

    @property
    def n_elements_in_block(self) -> int:
        return self._n_elements_in_block

    def init_weights_and_state(self, input_signature, rng):
        d_model = _feature_dim(input_signature, self.name)
        if self._ff_chunk_size and len(input_signature.shape) < 2:
            raise ValueError(
                f"{self.name}: ff_chunk_size needs inputs (batch, length, d_model), got shape "
                f"{tuple(input_signature.shape)}"
            )
        r = jax.random.split(rng, 7)
        big_dtype = jnp.bfloat16 if self._big_weights_in_bfloat16 else jnp.float32
        weights = {
            "m1": self._kernel_init(r[0], (d_model, self._d_lowrank)),
            "m2": self._kernel_init(r[1], (self._d_lowrank, self._d_ff)),
            "mb": self._bias_init(r[2], (self._d_ff,)),
            "w1": self._kernel_init(r[3], (d_model, self._d_ff)).T.astype(big_dtype),
            "w2": self._kernel_init(r[5], (self._d_ff, d_model)).astype(big_dtype),
            "b2": self._bias_init(r[6], (d_model,)),
        }
        if self._first_layer_bias:
            weights["b1"] = self._bias_init(r[4], (self._d_ff,))
        return weights, EMPTY

    def pack_for_decoding(self, weights, dtype: str):
        """These weights with the controller's kernels as PackedKernels where that is faster,
        and w1, w2 as one table `w12` [d_ff, 2 * d_model] (row u: w1[u], then w2[u]).

        Decoding gathers the chosen units' rows; in `w12` a unit's w1 and w2 rows sit side
        by side. In float32, m2 [d_lowrank, d_ff] stays as it is: a vector times its
        d_ff-long rows streams faster than d_ff dot products of d_lowrank entries each (the
        packed layout).
        """
        packed = {**weights, "m1": pack_kernel(weights["m1"], dtype)}
        if dtype != "float32":
            packed["m2"] = pack_kernel(weights["m2"], dtype)
        packed["w12"] = jnp.concatenate([packed.pop("w1"), packed.pop("w2")], axis=1)
        return packed

    def apply(self, x, weights, state, rng):
        check_feature_dim(x, weights["m1"].shape[-2], self.name)
        if self._mode == "train" and rng is None:
            raise ValueError(f"{self.name} in train mode needs an rng; pass rng= to apply")
        if self._chunked is not None:
            if x.ndim < 2:
                raise ValueError(
                    f"{self.name}: ff_chunk_size needs inputs (batch, length, d_model), got "
                    f"shape {tuple(x.shape)}"
                )
            y, _ = self._chunked.apply(x, weights, state, rng)
            return y, state
        return self._forward(x, weights, rng), state

    # -- the math -----------------------------------------------------------------------------
    def controller_logits(self, x, weights):
        """Unit scores: (..., d_model) -> (..., n_blocks, n_elements_in_block)."""
        dtype = x.dtype
        logits = matmul(matmul(x, weights["m1"]), weights["m2"])
        logits = logits + lax.broadcast_to_rank(weights["mb"].astype(dtype), logits.ndim)
        return logits.reshape(x.shape[:-1] + (self._n_blocks, self._n_elements_in_block))

    def choices(self, x, weights):
        """Index of the active unit in each block (eval/predict): (..., d_model) ->
        (..., n_blocks) int32, each in [0, n_elements_in_block)."""
        return argmax(self.controller_logits(x, weights), axis=-1)

    def _compute_dtype(self, x):
        return jnp.bfloat16 if self._use_bfloat16 else x.dtype

    def _forward(self, x, weights, rng):
        if self._mode == "predict":
            return self._forward_gather(x, weights)
        logits = self.controller_logits(x, weights)
        if self._mode == "train":
            rng_gumbel, rng_quant, rng_dropout = jax.random.split(rng, 3)
            mask = self._train_mask(logits, rng_gumbel, rng_quant)
        else:
            rng_dropout = None
            mask = jax.nn.one_hot(
                jnp.argmax(logits, axis=-1), self._n_elements_in_block, dtype=logits.dtype
            )
        mask = mask.reshape(x.shape[:-1] + (self._d_ff,))
        cdt = self._compute_dtype(x)
        h = jnp.dot(x.astype(cdt), weights["w1"].astype(cdt).T)
        if "b1" in weights:
            h = h + lax.broadcast_to_rank(weights["b1"].astype(cdt), h.ndim)
        h = jax.nn.relu(h) * mask.astype(cdt)
        h = dropout(h, self._dropout_rate, rng_dropout, self._mode, self._dropout_shared_axes)
        y = jnp.dot(h, weights["w2"].astype(cdt))
        y = y + lax.broadcast_to_rank(weights["b2"].astype(cdt), y.ndim)
        return y.astype(x.dtype)

    def _train_mask(self, logits, rng_gumbel, rng_quant):
        # Draws are flat and reshaped: XLA:CPU compiles many-axis threefry draws very slowly.
        n = logits.size
        noisy = logits + jax.random.gumbel(rng_gumbel, (n,), logits.dtype).reshape(logits.shape)
        soft = jax.nn.softmax(noisy / self._temperature, axis=-1)
        hard = jax.nn.one_hot(
            jnp.argmax(noisy, axis=-1), self._n_elements_in_block, dtype=logits.dtype
        )
        hard = hard + soft - lax.stop_gradient(soft)  # straight-through
        token_shape = logits.shape[:-2] + (1, 1)
        n_tokens = n // (self._n_blocks * self._n_elements_in_block)
        use_hard = jax.random.bernoulli(rng_quant, self._quant_prob, (n_tokens,))
        use_hard = use_hard.reshape(token_shape)
        return jnp.where(use_hard, hard, soft)

    def _forward_gather(self, x, weights):
        choices = self.choices(x, weights)  # (..., n_blocks) unit within each block
        first_unit = self._n_elements_in_block * jnp.arange(self._n_blocks, dtype=jnp.int32)
        ids = choices + lax.broadcast_to_rank(first_unit, choices.ndim)  # global unit ids
        cdt = self._compute_dtype(x)
        w1, w2 = (w.astype(cdt) for w in _chosen_rows(weights, ids, x.shape[-1]))
        b1 = (_take_rows(weights["b1"], ids).astype(cdt) if "b1" in weights
              else jnp.zeros(ids.shape, cdt))  # (..., n_blocks)
        b2 = weights["b2"].astype(cdt)
        if ids.size == ids.shape[-1]:  # one token (a decoding step): matrix-vector products
            rows = (self._n_blocks, x.shape[-1])
            h = jax.nn.relu(jnp.dot(w1.reshape(rows), x.reshape(-1).astype(cdt)) + b1.reshape(-1))
            return (jnp.dot(h, w2.reshape(rows)) + b2).reshape(x.shape).astype(x.dtype)
        h = jax.nn.relu(jnp.einsum("...d,...bd->...b", x.astype(cdt), w1) + b1)
        y = jnp.einsum("...b,...bd->...d", h, w2)
        y = y + lax.broadcast_to_rank(b2, y.ndim)
        return y.astype(x.dtype)


def _chosen_rows(weights, ids, d_model: int):
    """The w1 and w2 rows of units `ids` (..., n_blocks): two (..., n_blocks, d_model).

    From `w12`, the two halves of the rows are gathered separately: gathering whole rows and
    splitting them copies them once more.
    """
    if "w12" not in weights:
        return _take_rows(weights["w1"], ids), _take_rows(weights["w2"], ids)
    return (_take_rows(weights["w12"], ids, columns=slice(0, d_model)),
            _take_rows(weights["w12"], ids, columns=slice(d_model, None)))


def _take_rows(table, ids, columns: slice | None = None):
    """table[ids] (rows; `columns` of them when given) for ids known to be in range,
    ascending and distinct per token."""
    index = ids if columns is None else (ids, columns)
    return (
        jnp.asarray(table)
        .at[index]
        .get(mode="promise_in_bounds", unique_indices=True, indices_are_sorted=True)
    )


class _SparseFFBody(Layer):
    """The unchunked SparseFF computation, for `Chunk` to run chunk by chunk."""

    def __init__(self, parent: SparseFF):
        super().__init__(name=parent.name + "_body")
        self._parent = parent

    def apply(self, x, weights, state, rng):
        return self._parent._forward(x, weights, rng), state


# ------------------------------------------------------------------------------------------------
# Sparse QKV: multiplicative dense + local convolution
# ------------------------------------------------------------------------------------------------


class FactoredDense(Layer):
    """Trax's FactoredDense, the multiplicative dense layer: (..., d_in) -> (..., d_out) with
    d_in * (S + M) weights, where S = `n_modules` and M = d_out // S.

    With weights D [d_input, S], E [d_input, M] and bias b [d_feature],

        y[..., s * M + m] = sum_i x[..., i] * D[i, s] * E[i, m]  +  b[s * M + m],

    i.e. a dense layer whose matrix W[i, s * M + m] = D[i, s] * E[i, m] is never formed
    (computed as one einsum '...i,is,im->...sm'). The output splits into S modules of M
    features each, the layout `LocallyConvDense(n_modules=S, ...)` expects. Any permutation
    of the input features (and thus routing of any input to any module) is expressible.

    Weights: `{'D': [d_in, S], 'E': [d_in, M], 'b': [d_out]}` (no 'b' when use_bias=False);
    trax's gating vectors [S, d_in] are D transposed. E is drawn with `kernel_initializer`, D
    from N(0, 1), so the product has E's scale (trax draws its gating from N(0, 0.5^2)).

    Args (trax's order):
      n_modules: number of modules S; must divide d_out.
      d_in: input width; inferred from the input signature when None, checked when given.
      d_out: output width.
      use_bias: add the bias b.
      kernel_initializer: `init(rng, (d_in, M))` for E.
      modules_initializer: `init(rng, (d_in, S))` for D.
    """

    def __init__(
        self,
        n_modules: int,
        d_in: int | None,
        d_out: int,
        use_bias: bool = True,
        kernel_initializer=init_lib.glorot_uniform,
        modules_initializer=init_lib.random_normal(1.0),
    ):
        who = "FactoredDense"
        check_int("n_modules", n_modules, 1, who)
        check_int("d_out", d_out, 1, who)
        if d_in is not None:
            check_int("d_in", d_in, 1, who)
        if d_out % n_modules:
            raise ValueError(
                f"{who}: d_out must be a multiple of n_modules, got d_out={d_out} "
                f"and n_modules={n_modules}"
            )
        super().__init__(name=f"FactoredDense_{n_modules}_{d_out}")
        self._sparsity = n_modules
        self._d_feature = d_out
        self._d_module = d_out // n_modules
        self._d_input = d_in
        self._use_bias = use_bias
        self._kernel_init = kernel_initializer
        self._modules_init = modules_initializer
        self._bias_init = init_lib.random_normal(1e-6)

    def init_weights_and_state(self, input_signature, rng):
        d_in = _feature_dim(input_signature, self.name)
        if self._d_input is not None and d_in != self._d_input:
            raise ValueError(
                f"{self.name}: d_in={self._d_input} but the input signature has last axis "
                f"{d_in} (shape {tuple(input_signature.shape)})"
            )
        rng_d, rng_e, rng_b = jax.random.split(rng, 3)
        weights = {
            "D": self._modules_init(rng_d, (d_in, self._sparsity)),
            "E": self._kernel_init(rng_e, (d_in, self._d_module)),
        }
        if self._use_bias:
            weights["b"] = self._bias_init(rng_b, (self._d_feature,))
        return weights, EMPTY

    def pack_for_decoding(self, weights, dtype: str):
        """These weights with D stored as rows D^T [S, d_input] (`_RowModules`).

        A step then scales D^T's contiguous rows by x and multiplies by E; with D as stored,
        XLA:CPU built x * D and transposed it element by element every step.
        """
        del dtype  # d_input * (S + M) values: small, kept in float32
        return _RowModules(weights["D"].T, weights["E"], weights.get("b"))

    def apply(self, x, weights, state, rng):
        dtype = x.dtype
        if isinstance(weights, _RowModules):
            check_feature_dim(x, weights.d_rows.shape[1], self.name)
            d_rows = lax.broadcast_to_rank(weights.d_rows.astype(dtype), x.ndim + 1)
            scaled = x[..., None, :] * d_rows  # (..., S, d_input)
            y = jnp.einsum("...si,im->...sm", scaled, weights.e.astype(dtype))
            bias = weights.b
        else:
            check_feature_dim(x, weights["D"].shape[0], self.name)
            y = jnp.einsum(
                "...i,is,im->...sm", x, weights["D"].astype(dtype), weights["E"].astype(dtype)
            )
            bias = weights.get("b")
        y = y.reshape(x.shape[:-1] + (self._d_feature,))
        if bias is not None:
            y = y + lax.broadcast_to_rank(bias.astype(dtype), y.ndim)
        return y, state


class _RowModules(NamedTuple):
    """`FactoredDense` weights for decoding: D^T [S, d_in], E, b."""

    d_rows: jax.Array
    e: jax.Array
    b: jax.Array | None


class MultiplicativeModularSparseDense(Layer):
    """Trax's MultiplicativeModularSparseDense: a multiplicative dense layer followed by a
    per-module dense layer, (..., d_input) -> (..., d_feature), S = `sparsity` modules of
    M = d_feature // S features:

        y[..., h * M + o] = sum_x (sum_d x[..., d] * multiplier[h, d] * kmult[d, x])
                            * kmod[h, x, o]  +  b[h * M + o].

    Module h first scales the input by its own gating vector and projects it with the shared
    kmult (as `FactoredDense`), then mixes its M features with its own kmod [M, M].

    Weights: `{'multiplier': [S, d_input], 'kmult': [d_input, M], 'kmod': [S, M, M],
    'b': [d_feature]}`, trax's layout and initialisers (N(0, 0.5^2), Glorot uniform per matrix,
    N(0, 1e-12)).

    Args:
      sparsity: number of modules S; must divide d_feature.
      d_feature: output width (trax's input width too; ours may differ, from the signature).
    """

    def __init__(self, sparsity: int, d_feature: int):
        who = "MultiplicativeModularSparseDense"
        check_int("sparsity", sparsity, 1, who)
        check_int("d_feature", d_feature, 1, who)
        if d_feature % sparsity:
            raise ValueError(
                f"{who}: d_feature must be a multiple of sparsity, got d_feature={d_feature} "
                f"and sparsity={sparsity}"
            )
        super().__init__(name=f"{who}_{sparsity}_{d_feature}")
        self._sparsity = sparsity
        self._d_feature = d_feature
        self._d_module = d_feature // sparsity

    def init_weights_and_state(self, input_signature, rng):
        d_in = _feature_dim(input_signature, self.name)
        s, m = self._sparsity, self._d_module
        r = jax.random.split(rng, 4)
        weights = {
            "multiplier": init_lib.random_normal(0.5)(r[0], (s, d_in)),
            "kmult": init_lib.glorot_uniform(r[1], (d_in, m)),
            "kmod": init_lib.glorot_uniform(r[2], (s, m, m)),
            "b": init_lib.random_normal(1e-6)(r[3], (self._d_feature,)),
        }
        return weights, EMPTY

    def apply(self, x, weights, state, rng):
        check_feature_dim(x, weights["kmult"].shape[0], self.name)
        dtype = x.dtype
        gated = jnp.einsum("...d,hd,dx->...hx", x, weights["multiplier"].astype(dtype),
                           weights["kmult"].astype(dtype))
        y = jnp.einsum("...hx,hxo->...ho", gated, weights["kmod"].astype(dtype))
        y = y.reshape(x.shape[:-1] + (self._d_feature,))
        return y + lax.broadcast_to_rank(weights["b"].astype(dtype), y.ndim), state


class LocallyConvDense(Layer):
    """Convolution over the (length, module) plane, causal in length:
    (batch, length, n_modules * d_in) -> (batch, length, n_modules * n_units).

    The last axis is split into `n_modules` modules of d_in features, giving an "image" of
    height `length`, width `n_modules` and d_in channels. A 2-D convolution with kernel
    (length_kernel_size, kernel_size), d_in input and `n_units` output channels, weights shared
    by all modules (as in the paper's sparse QKV), maps it to n_units channels:

        y[t, s, u] = b[u] + sum_{j < length_kernel_size} sum_{c < kernel_size} sum_f
                     x[t - j, s + c - (kernel_size - 1) // 2, f] *
                     w[length_kernel_size - 1 - j, c, f, u],

    with x = 0 outside [0, length) and outside [0, n_modules). Output position t sees inputs
    t - length_kernel_size + 1 .. t only: causal. With kernel_size = length_kernel_size = 1 this
    is the same small dense layer applied to every module. With one module it is a plain dense
    layer whatever the kernel sizes (as trax's, which builds a Dense then): both sizes are 1.

    In `predict` mode the state keeps the last length_kernel_size - 1 inputs (zeros at the
    start, [batch, length_kernel_size - 1, n_modules, d_in]), so feeding a sequence in pieces
    (one token or several at a time) gives the outputs of the whole sequence.

    Weights: `{'w': [length_kernel_size, kernel_size, d_in, n_units], 'b': [n_units]}`.
    """

    def __init__(
        self,
        n_modules: int,
        n_units: int,
        kernel_size: int = 1,
        length_kernel_size: int = 1,
        use_bias: bool = True,
        kernel_initializer=init_lib.glorot_uniform,
        mode: str = "train",
    ):
        who = "LocallyConvDense"
        check_int("n_modules", n_modules, 1, who)
        check_int("n_units", n_units, 1, who)
        check_int("kernel_size", kernel_size, 1, who)
        check_int("length_kernel_size", length_kernel_size, 1, who)
        super().__init__(name=f"LocallyConvDense_{n_modules}_{n_units}")
        if n_modules == 1:  # trax: a Dense, the kernel sizes ignored
            kernel_size = length_kernel_size = 1
        self._n_modules = n_modules
        self._n_units = n_units
        self._kernel_size = kernel_size
        self._length_kernel_size = length_kernel_size
        self._use_bias = use_bias
        self._kernel_init = kernel_initializer
        self._bias_init = init_lib.random_normal(1e-6)
        self._mode = check_mode(mode)

    @property
    def n_modules(self) -> int:
        return self._n_modules

    @property
    def kernel_size(self) -> int:
        return self._kernel_size

    @property
    def length_kernel_size(self) -> int:
        return self._length_kernel_size

    @property
    def mode(self) -> str:
        return self._mode

    def _d_in(self, shape) -> int:
        """Features per module of inputs of `shape`, checking it is (batch, length, features)."""
        shape = tuple(shape)
        if len(shape) != 3:
            raise ValueError(
                f"{self.name}: expected inputs (batch, length, features), got shape {shape}"
            )
        if shape[-1] % self._n_modules:
            raise ValueError(
                f"{self.name}: the feature axis must be a multiple of n_modules="
                f"{self._n_modules}, got shape {shape}"
            )
        return shape[-1] // self._n_modules

    def init_weights_and_state(self, input_signature, rng):
        _feature_dim(input_signature, self.name)
        shape = tuple(input_signature.shape)
        d_in = self._d_in(shape)
        lk, k = self._length_kernel_size, self._kernel_size
        rng_w, rng_b = jax.random.split(rng)
        w = self._kernel_init(rng_w, (lk * k * d_in, self._n_units)).reshape(
            lk, k, d_in, self._n_units
        )
        weights = {"w": w}
        if self._use_bias:
            weights["b"] = self._bias_init(rng_b, (self._n_units,))
        state = EMPTY
        if self._mode == "predict" and lk > 1:
            state = jnp.zeros((shape[0], lk - 1, self._n_modules, d_in), input_signature.dtype)
        return weights, state

    def apply(self, x, weights, state, rng):
        d_in = self._d_in(x.shape)
        check_feature_dim(x, weights["w"].shape[2] * self._n_modules, self.name)
        batch, length = x.shape[:2]
        lk, k = self._length_kernel_size, self._kernel_size
        padded, state = self.time_padded(x, state)
        w = weights["w"].astype(x.dtype).reshape(lk * k * d_in, self._n_units)
        y = self.convolve(padded, w, length)  # (batch, length, n_modules, n_units)
        if "b" in weights:
            y = y + lax.broadcast_to_rank(weights["b"].astype(x.dtype), y.ndim)
        return y.reshape(batch, length, self._n_modules * self._n_units), state

    def time_padded(self, x, state):
        """x (batch, length, n_modules * d_in) -> (its modules (batch, length + lk - 1,
        n_modules, d_in) after the lk - 1 inputs before it (zeros, or the predict state),
        the new predict state)."""
        batch, length = x.shape[:2]
        lk = self._length_kernel_size
        xm = x.reshape(batch, length, self._n_modules, self._d_in(x.shape))
        if self._mode != "predict" or lk == 1:
            return jnp.pad(xm, [(0, 0), (lk - 1, 0), (0, 0), (0, 0)]), state
        if state.shape[0] != batch:
            raise ValueError(
                f"{self.name}: predict state is for batch {state.shape[0]}, got inputs of "
                f"shape {tuple(x.shape)}"
            )
        padded = jnp.concatenate([state.astype(x.dtype), xm], axis=1)
        return padded, padded[:, padded.shape[1] - (lk - 1) :].astype(state.dtype)

    def convolve(self, padded, kernel, length: int):
        """`time_padded`'s modules (batch, length + lk - 1, n_modules, d_in) convolved with
        `kernel` [lk * k * d_in, n] (rows in (j, c, f) order) -> (batch, length, n_modules, n).

        Predict mode: one XLA convolution (a decoding step then runs one op instead of
        building the patches and multiplying them). Otherwise one matmul over the patches
        (im2col): the gradient of XLA:CPU's convolution for this shape costs more than the
        rest of a Terraformer step together (see benchmarks/RESULTS.md).
        """
        lk, k = self._length_kernel_size, self._kernel_size
        module_padding = ((k - 1) // 2, k // 2)
        if self._mode == "predict":
            d_in = padded.shape[-1]
            return lax.conv_general_dilated(
                padded, kernel.reshape(lk, k, d_in, -1), window_strides=(1, 1),
                padding=[(0, 0), module_padding], dimension_numbers=("NHWC", "HWIO", "NHWC"))
        padded = jnp.pad(padded, [(0, 0), (0, 0), module_padding, (0, 0)])
        patches = jnp.concatenate(
            [padded[:, j:j + length, c:c + self._n_modules] for j in range(lk) for c in range(k)],
            axis=-1)
        return jnp.dot(patches, kernel)


class _QKVConvolutions(Branch):
    """`Branch(conv_q, conv_k, conv_v)` of LocallyConvDense layers reading the same input.

    The Branch's weights (a tuple of the three convolutions') and outputs (q, k, v). In
    predict mode the three share one state (their last inputs are the same) and run as one
    convolution with the three kernels side by side (`pack_for_decoding` stores them so):
    a decoding step runs one convolution instead of three. `conv_v` may have a narrower
    module kernel than the others (Trax: 1); its kernel sits at the centre column of the
    fused one.
    """

    def __init__(self, convs):
        q, k, v = convs
        if q.kernel_size != k.kernel_size or v.kernel_size > q.kernel_size:
            raise ValueError("_QKVConvolutions: q and k need one module kernel, v one no wider")
        super().__init__(*convs, name="QKVConvolutions")
        self._mode = q.mode

    def init_weights_and_state(self, input_signature, rng):
        weights, states = super().init_weights_and_state(input_signature, rng)
        return weights, (states[0] if self._mode == "predict" else states)

    def pack_for_decoding(self, weights, dtype: str):
        """The three kernels as one [lk * k * d_in, 3 * n_units] matrix and one bias."""
        del dtype  # small (a few hundred KiB per layer): kept in float32
        return _FusedQKV(*self._fused(weights))

    def _fused(self, weights):
        v = self.sublayers[2]
        lk, k, d_in, n_units = weights[0]["w"].shape
        kernels = []
        for layer, w in zip(self.sublayers, weights):
            kernel = w["w"]
            if layer is v and v.kernel_size < k:  # a narrower kernel: zeros beside it
                before = (k - 1) // 2 - (v.kernel_size - 1) // 2
                kernel = jnp.pad(kernel, [(0, 0), (before, k - v.kernel_size - before),
                                          (0, 0), (0, 0)])
            kernels.append(kernel.reshape(lk * k * d_in, n_units))
        biases = [w["b"] if "b" in w else jnp.zeros((n_units,)) for w in weights]
        return jnp.concatenate(kernels, axis=1), jnp.concatenate(biases)

    def apply(self, x, weights, state, rng):
        if self._mode != "predict":
            return super().apply(x, weights, state, rng)
        kernel, bias = weights if isinstance(weights, _FusedQKV) else self._fused(weights)
        q_conv = self.sublayers[0]
        d_in = kernel.shape[0] // (q_conv.length_kernel_size * q_conv.kernel_size)
        check_feature_dim(x, d_in * q_conv.n_modules, self.name)
        batch, length = x.shape[:2]
        padded, state = q_conv.time_padded(x, state)
        y = q_conv.convolve(padded, kernel.astype(x.dtype), length)
        y = y + lax.broadcast_to_rank(bias.astype(x.dtype), y.ndim)
        y = y.reshape(batch, length, q_conv.n_modules, 3, -1)
        return tuple(y[..., i, :].reshape(batch, length, -1) for i in range(3)), state


class _FusedQKV(NamedTuple):
    """`_QKVConvolutions` weights for decoding: kernel [lk * k * d_in, 3 * n_units], bias."""

    kernel: jax.Array
    bias: jax.Array


# ------------------------------------------------------------------------------------------------
# Causal attention with a predict-mode KV cache (private; the sparse QKV front end is above)
# ------------------------------------------------------------------------------------------------


def _attend(q, k, v, mask, n_heads: int, dropout_rate: float, rng, mode: str):
    """Scaled dot-product attention over heads (`attention_core.dot_product_attention`).

    q: [batch, lq, d], k: [batch, lk, d], v: [batch, lk, d_v], mask: [lq, lk] bool (True =
    may attend). Returns [batch, lq, d_v]. Scores and softmax in float32.
    """
    qh, kh, vh = (split_heads(a, n_heads) for a in (q, k, v))
    return merge_heads(dot_product_attention(qh, kh, vh, mask, dropout_rate, rng, mode))


class _CausalAttentionCore(Layer):
    """(q, k, v) -> attention output, each [batch, length, d]; causal.

    In `predict` mode the state is `{'k': [batch, n_heads, ring, d / n_heads], 'v': the same
    for values, 'pos': int32}` with ring >= max_inference_length (see `kv_cache`; positions
    never wrap here): each call writes its keys/values at `pos` (one token with
    lax.dynamic_update_slice), attends to the cached blocks up to its own position, and advances
    `pos` by its length. Going past max_inference_length is a ValueError when `pos` is concrete;
    under jit it cannot be checked, so the decoding loop must stop in time.
    """

    def __init__(self, n_heads: int, dropout_rate: float, max_inference_length: int, mode: str):
        super().__init__(n_in=3, n_out=1, name="CausalAttention")
        self._n_heads = n_heads
        self._dropout_rate = dropout_rate
        self._max_len = max_inference_length
        self._mode = check_mode(mode)

    def init_weights_and_state(self, input_signature, rng):
        q_sig, k_sig, v_sig = input_signature
        if self._mode != "predict":
            return EMPTY, EMPTY
        batch, h, mem = k_sig.shape[0], self._n_heads, self._max_len
        state = {
            "k": kv_cache.new_ring(batch, h, mem, k_sig.shape[-1] // h, k_sig.dtype),
            "v": kv_cache.new_ring(batch, h, mem, v_sig.shape[-1] // h, v_sig.dtype),
            "pos": jnp.zeros((), jnp.int32),
        }
        return EMPTY, state

    def predict_context(self) -> int | None:
        """max_inference_length in predict mode (positions never wrap here)."""
        return self._max_len if self._mode == "predict" else None

    def apply(self, x, weights, state, rng):
        q, k, v = x
        length = q.shape[1]
        if self._mode != "predict":
            mask = jnp.tril(jnp.ones((length, length), bool))
            out = _attend(q, k, v, mask, self._n_heads, self._dropout_rate, rng, self._mode)
            return out, state
        if length > self._max_len:
            raise ValueError(
                f"{self.name}: {length} positions exceed max_inference_length={self._max_len}"
            )
        pos = state["pos"]
        if not isinstance(pos, jax.core.Tracer) and int(pos) + length > self._max_len:
            raise ValueError(
                f"{self.name}: decoding past max_inference_length={self._max_len} "
                f"(at position {int(pos)}, feeding {length} more)"
            )
        h = self._n_heads
        q_pos = pos + jnp.arange(length)

        def key_mask(k_pos, slot0, block_len):
            return kv_cache.window_mask(q_pos, k_pos)

        out, k_cache, v_cache = kv_cache.cached_attention(
            split_heads(q, h), q_pos, split_heads(k, h), split_heads(v, h), state["k"],
            state["v"], key_mask, jnp.zeros((), jnp.int32),
            kv_cache.ring_layout(self._max_len)[1])
        return merge_heads(out), {"k": k_cache, "v": v_cache, "pos": pos + length}


def MultiplicativeConvCausalAttention(  # noqa: N802
    d_feature: int,
    n_heads: int = 1,
    sparsity: int | None = None,
    length_kernel_size: int = 3,
    kernel_size: int = 3,
    dropout: float = 0.0,
    max_inference_length: int = 2048,
    output_layer_type: str = "none",
    mode: str = "train",
) -> Layer:
    """Causal multi-head self-attention with sparse (multiplicative + convolutional) QKV.

    (batch, length, d_model) -> (batch, length, d_feature).

        x -> FactoredDense(S, d_model, d_feature)                      (shared by Q, K, V)
          -> q, k: LocallyConvDense(S, d_feature // S, kernel_size, length_kernel_size)
             v:    LocallyConvDense(S, d_feature // S, 1, length_kernel_size)
          -> causal softmax(q k^T / sqrt(d_head)) v over `n_heads` heads
          -> the output layers of `output_layer_type`

    As Trax's layer of this name: `output_layer_type` is 'none' (Trax's default: the heads'
    outputs are the result, so decoding reads no d_feature x d_feature matrix), 'mult'
    (a FactoredDense), 'conv' (a LocallyConvDense with kernel_size 3),
    'multconv' (both), or 'dense' (a full Dense layer).
    S = `sparsity` (defaults to n_heads); it must divide d_feature, and n_heads must divide
    d_feature. The convolutions are causal in length, so the whole layer is causal.
    `dropout` acts on the attention probabilities in train mode. In `predict` mode the
    convolutions keep their last inputs and the attention a [batch, max_inference_length, d]
    key/value cache with a position counter, so feeding one token (or a few) at a time
    reproduces the full-sequence output.
    """
    who = "MultiplicativeConvCausalAttention"
    check_int("d_feature", d_feature, 1, who)
    check_int("n_heads", n_heads, 1, who)
    check_int("max_inference_length", max_inference_length, 1, who)
    sparsity = n_heads if sparsity is None else sparsity
    check_int("sparsity", sparsity, 1, who)
    if d_feature % sparsity:
        raise ValueError(
            f"{who}: d_feature must be a multiple of sparsity, got d_feature={d_feature} and "
            f"sparsity={sparsity}"
        )
    if d_feature % n_heads:
        raise ValueError(
            f"{who}: d_feature must be a multiple of n_heads, got d_feature={d_feature} and "
            f"n_heads={n_heads}"
        )
    check_rate("dropout", dropout, who)
    check_choice("output_layer_type", output_layer_type, ATTENTION_OUTPUT_LAYERS, who)
    mode = check_mode(mode)
    d_module = d_feature // sparsity

    def conv(width):
        return LocallyConvDense(sparsity, d_module, kernel_size=width,
                                length_kernel_size=length_kernel_size, mode=mode)

    output_layers = []
    if output_layer_type == "dense":
        output_layers.append(Dense(d_feature))
    if "mult" in output_layer_type:
        output_layers.append(FactoredDense(sparsity, None, d_feature))
    if "conv" in output_layer_type:
        output_layers.append(conv(3))
    return Serial(
        FactoredDense(sparsity, None, d_feature),
        _QKVConvolutions([conv(kernel_size), conv(kernel_size), conv(1)]),  # q on top
        _CausalAttentionCore(n_heads, dropout, max_inference_length, mode),
        output_layers,
        name=who,
    )


ATTENTION_OUTPUT_LAYERS = ("none", "mult", "conv", "multconv", "dense")


__all__ = [
    "FactoredDense",
    "LocallyConvDense",
    "MultiplicativeConvCausalAttention",
    "MultiplicativeModularSparseDense",
    "SparseFF",
]
