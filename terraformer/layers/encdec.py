"""Encoder-decoder pieces: cross attention with a predict cache, a run-once cache, padding masks.

- `EncDecAttention`: multi-head attention of decoder positions on encoder positions,
  `(decoder_x, encoder, encoder_mask) -> (y, encoder, encoder_mask)`. The encoder and its mask
  pass through, so the layer slots into a `ReversibleHalfResidual` (whose residual is the top
  output, the extras below `x2` passing unchanged) and into a plain `Residual` alike. In
  `predict` mode the encoder's keys and values are computed on the first call and kept in
  `state`; later calls reuse them and read only their decoder positions.
- `Cache(layer, mode)`: runs `layer` once in `predict` mode (on the first call) and returns
  its saved outputs afterwards; a transparent wrapper in the other modes. Its weights are the
  layer's own, so a checkpoint of a `train` model loads into a `predict` model unchanged.
- `PaddingMask(pad_id)`: `(tokens) -> (tokens != pad_id)` as float32 `[batch, length]`.

Stack effects are written top of stack first.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from terraformer.checks import check_int, check_rate
from terraformer.layers import initializers as init_lib
from terraformer.layers.attention import merge_heads, split_heads
from terraformer.layers.attention_core import dot_product_attention
from terraformer.layers.base import EMPTY, Layer, PureLayer, as_items, check_mode, from_items
from terraformer.layers.core import check_feature_dim, dropout


class EncDecAttention(Layer):
    """Multi-head encoder-decoder (cross) attention.

    Stack: `(decoder_x [batch, Ld, d], encoder [batch, Le, d_enc], encoder_mask [batch, Le])
    -> (y [batch, Ld, d], encoder, encoder_mask)`. Queries come from `decoder_x`, keys and
    values from `encoder`; encoder positions where `encoder_mask` is 0/False (padding) are
    never attended to. No causal mask: every decoder position sees every real encoder position.

        y = Dropout(concat_h(softmax(q_h k_hᵀ / sqrt(d_qk) + mask) v_h) @ wo)

    with `q = x @ wq`, `k = encoder @ wk`, `v = encoder @ wv`. `d` and `d_enc` are read from
    the input signature at init.

    Args:
      n_heads, d_qk, d_v: heads and per-head query/key and value widths.
      attention_dropout: dropout on the attention weights (`train` only).
      output_dropout: dropout on `y` (`train` only).
      mode: 'train', 'eval' or 'predict'.
      q_chunk_len: if set, queries are processed `q_chunk_len` decoder positions at a time
        (a `lax.map` rematerialised in the backward pass), so score memory is
        `batch * n_heads * q_chunk_len * Le` instead of `... * Ld * Le`. Results are equal.

    Weights: `{'wq': [d, n_heads*d_qk], 'wk': [d_enc, n_heads*d_qk],
    'wv': [d_enc, n_heads*d_v], 'wo': [n_heads*d_v, d]}`, the same in every mode.

    `predict` mode: the state is `{'k': [batch, n_heads, Le, d_qk], 'v': [batch, n_heads, Le,
    d_v], 'mask': [batch, Le] bool, 'ready': bool}`, buffers preallocated at init for the
    signature's `Le`. A call whose `ready` is False projects the encoder into `k`, `v`, saves
    the mask and sets `ready` (a `lax.cond`, so under `jit` later calls skip the projection at
    run time); later calls use the saved keys, values and mask and ignore the contents of
    their `encoder` and `encoder_mask` items (which must keep the init shapes). Any number of
    decoder positions may come per call: each output position depends only on its own input
    position, so one-at-a-time decoding equals the full `eval` pass. To decode another input,
    start from a fresh state (`init`).
    """

    def __init__(
        self,
        n_heads: int = 1,
        d_qk: int = 64,
        d_v: int = 64,
        attention_dropout: float = 0.0,
        output_dropout: float = 0.0,
        mode: str = "train",
        q_chunk_len: int | None = None,
    ):
        who = "EncDecAttention"
        super().__init__(n_in=3, n_out=3, name=who)
        self._n_heads = check_int("n_heads", n_heads, 1, who)
        self._d_qk = check_int("d_qk", d_qk, 1, who)
        self._d_v = check_int("d_v", d_v, 1, who)
        self._attention_dropout = check_rate("attention_dropout", attention_dropout, who)
        self._output_dropout = check_rate("output_dropout", output_dropout, who)
        self._mode = check_mode(mode)
        if q_chunk_len is not None:
            check_int("q_chunk_len", q_chunk_len, 1, who)
        self._q_chunk_len = q_chunk_len

    # -- init -------------------------------------------------------------------------------
    def _check_signature(self, x_shape, enc_shape, mask_shape):
        if len(x_shape) != 3 or len(enc_shape) != 3:
            raise ValueError(
                f"{self.name}: expected decoder_x (batch, Ld, d) and encoder (batch, Le, d_enc), "
                f"got shapes {tuple(x_shape)} and {tuple(enc_shape)}"
            )
        if tuple(mask_shape) != tuple(enc_shape[:2]) or x_shape[0] != enc_shape[0]:
            raise ValueError(
                f"{self.name}: encoder_mask must be (batch, Le) = {tuple(enc_shape[:2])} and "
                f"decoder_x must have batch {enc_shape[0]}, got mask {tuple(mask_shape)} and "
                f"decoder_x {tuple(x_shape)}"
            )

    def init_weights_and_state(self, input_signature, rng):
        x_sig, enc_sig, mask_sig = as_items(input_signature, 3, self.name)
        self._check_signature(x_sig.shape, enc_sig.shape, mask_sig.shape)
        d, d_enc = x_sig.shape[-1], enc_sig.shape[-1]
        h = self._n_heads
        kq, kk, kv, ko = jax.random.split(rng, 4)
        weights = {
            "wq": init_lib.glorot_uniform(kq, (d, h * self._d_qk)),
            "wk": init_lib.glorot_uniform(kk, (d_enc, h * self._d_qk)),
            "wv": init_lib.glorot_uniform(kv, (d_enc, h * self._d_v)),
            "wo": init_lib.glorot_uniform(ko, (h * self._d_v, d)),
        }
        state = EMPTY
        if self._mode == "predict":
            batch, enc_len = enc_sig.shape[:2]
            dtype = x_sig.dtype if jnp.issubdtype(x_sig.dtype, jnp.floating) else jnp.float32
            state = {
                "k": jnp.zeros((batch, h, enc_len, self._d_qk), dtype),
                "v": jnp.zeros((batch, h, enc_len, self._d_v), dtype),
                "mask": jnp.zeros((batch, enc_len), bool),
                "ready": jnp.zeros((), bool),
            }
        return weights, state

    # -- forward ----------------------------------------------------------------------------
    def encoder_keys_values(self, encoder, weights):
        """`encoder [batch, Le, d_enc]` -> `(k [batch, h, Le, d_qk], v [batch, h, Le, d_v])`."""
        check_feature_dim(encoder, weights["wk"].shape[0], self.name + " (encoder)")
        k = jnp.dot(encoder, weights["wk"].astype(encoder.dtype))
        v = jnp.dot(encoder, weights["wv"].astype(encoder.dtype))
        return split_heads(k, self._n_heads), split_heads(v, self._n_heads)

    def apply(self, x, weights, state, rng):
        dec, enc, enc_mask = as_items(x, 3, self.name)
        self._check_signature(dec.shape, enc.shape, enc_mask.shape)
        check_feature_dim(dec, weights["wq"].shape[0], self.name + " (decoder_x)")
        rng_attn, rng_out = (None, None) if rng is None else jax.random.split(rng)
        q = split_heads(jnp.dot(dec, weights["wq"].astype(dec.dtype)), self._n_heads)
        if self._mode == "predict":
            k, v, mask, state = self._cached_keys_values(enc, enc_mask, weights, state)
        else:
            k, v = self.encoder_keys_values(enc, weights)
            mask = enc_mask.astype(bool)
        out = self._attend(q, k.astype(q.dtype), v.astype(q.dtype), mask, rng_attn)
        y = jnp.dot(merge_heads(out), weights["wo"].astype(dec.dtype))
        y = dropout(y, self._output_dropout, rng_out, self._mode)
        return (y, enc, enc_mask), state

    def _cached_keys_values(self, enc, enc_mask, weights, state):
        want = tuple(state["mask"].shape)
        if tuple(enc.shape[:2]) != want:
            raise ValueError(
                f"{self.name}: predict state holds encoders of (batch, Le) = {want}, got an "
                f"encoder of shape {tuple(enc.shape)}; init the state for this shape"
            )

        def compute(_):
            k, v = self.encoder_keys_values(enc, weights)
            return (k.astype(state["k"].dtype), v.astype(state["v"].dtype),
                    enc_mask.astype(bool))

        def reuse(_):
            return state["k"], state["v"], state["mask"]

        k, v, mask = lax.cond(state["ready"], reuse, compute, None)
        new_state = {"k": k, "v": v, "mask": mask, "ready": jnp.ones((), bool)}
        return k, v, mask, new_state

    def _attend(self, q, k, v, mask, rng):
        """q [b, h, Ld, d_qk] on k, v [b, h, Le, d]; mask [b, Le] bool -> [b, h, Ld, d_v]."""
        allowed = mask[:, None, None, :]
        common = dict(dropout_rate=self._attention_dropout, mode=self._mode)
        length = q.shape[2]
        size = self._q_chunk_len
        if not size or length <= size:
            return dot_product_attention(q, k, v, allowed, rng=rng, **common)
        n_chunks = -(-length // size)
        pad = n_chunks * size - length
        qc = jnp.pad(q, [(0, 0), (0, 0), (0, pad), (0, 0)])
        qc = jnp.moveaxis(qc.reshape(q.shape[:2] + (n_chunks, size, q.shape[3])), 2, 0)

        @jax.checkpoint
        def run(q_chunk, r):
            return dot_product_attention(q_chunk, k, v, allowed, rng=r, **common)

        if rng is None:
            out = lax.map(lambda c: run(c, None), qc)
        else:
            out = lax.map(lambda cr: run(*cr), (qc, jax.random.split(rng, n_chunks)))
        out = jnp.moveaxis(out, 0, 2).reshape(q.shape[:2] + (n_chunks * size, v.shape[-1]))
        return out[:, :, :length]


class Cache(Layer):
    """Runs `layer` once in `predict` mode and returns its saved outputs on later calls.

    Stack effect: that of `layer`. In 'train' and 'eval' it is `layer` itself (same weights,
    same state). In 'predict' the state is `{'layer': layer_state, 'outputs': the outputs,
    preallocated from the layer's output signature, 'ready': bool}`: while `ready` is False a
    call runs the layer, saves its outputs and its new state and sets `ready`; afterwards the
    layer does not run (a `lax.cond`) and the saved outputs come back, whatever the inputs
    hold (they must keep their init shapes). Weights are `layer`'s own pytree in every mode.

    Used for the encoder of an encoder-decoder: decoding feeds (input tokens, next decoder
    token) at every step, and the encoder runs only on the first.
    """

    def __init__(self, layer: Layer, mode: str = "predict"):
        if not isinstance(layer, Layer):
            raise TypeError(f"Cache: layer must be a Layer, got {type(layer).__name__}")
        super().__init__(n_in=layer.n_in, n_out=layer.n_out, name="Cache", sublayers=[layer])
        self._mode = check_mode(mode)

    def init_weights_and_state(self, input_signature, rng):
        layer = self.sublayers[0]
        weights, state = layer.init_weights_and_state(input_signature, rng)
        if self._mode != "predict":
            return weights, state
        out_sig = layer.output_signature(input_signature, weights, state)
        items = out_sig if self.n_out != 1 else (out_sig,)
        outputs = tuple(jnp.zeros(s.shape, s.dtype) for s in items)
        return weights, {"layer": state, "outputs": outputs, "ready": jnp.zeros((), bool)}

    def pack_for_decoding(self, weights, dtype: str):
        """The weights as they are: the cached layer runs once per sequence, so packing it
        would speed up no decoding step (and, in int8, would cost accuracy)."""
        del dtype
        return weights

    def apply(self, x, weights, state, rng):
        layer = self.sublayers[0]
        if self._mode != "predict":
            return layer.apply(x, weights, state, rng)

        def run(_):
            y, layer_state = layer.apply(x, weights, state["layer"], rng)
            ys = as_items(y, self.n_out, layer.name)
            for a, b in zip(ys, state["outputs"], strict=True):
                if a.shape != b.shape:
                    raise ValueError(
                        f"{self.name}: predict state holds outputs of shape {tuple(b.shape)}, "
                        f"the inputs give {tuple(a.shape)}; init the state for these inputs"
                    )
            ys = tuple(a.astype(b.dtype) for a, b in zip(ys, state["outputs"], strict=True))
            return ys, layer_state

        def reuse(_):
            return state["outputs"], state["layer"]

        outputs, layer_state = lax.cond(state["ready"], reuse, run, None)
        new_state = {"layer": layer_state, "outputs": outputs, "ready": jnp.ones((), bool)}
        return from_items(outputs, self.n_out), new_state


def PaddingMask(pad_id: int = 0) -> Layer:  # noqa: N802
    """`(tokens [batch, length]) -> (mask [batch, length] float32)`: 1 for tokens != pad_id."""
    return PureLayer(lambda t: (t != pad_id).astype(jnp.float32), name="PaddingMask")


__all__ = ["Cache", "EncDecAttention", "PaddingMask"]
