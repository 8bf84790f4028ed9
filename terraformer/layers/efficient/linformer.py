"""Linformer attention (Wang et al., 2020): keys and values projected along the length.

Softmax attention of the L queries over `proj_len` = k mixtures of the keys and values,

    out = softmax(Q (Eᵀ K)ᵀ / sqrt(d)) (Fᵀ V),    E, F: [max_len, k] learned,

so the scores are `L x k` instead of `L x L`. Every mixture spans the whole sequence, future
positions included, which is why a Linformer cannot be causal: `causal=True` (and predict
mode, which decodes causally) is refused.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from terraformer.checks import check_int, check_rate
from terraformer.layers import initializers as init_lib
from terraformer.layers.attention_core import dot_product_attention
from terraformer.layers.base import EMPTY, Layer, check_mode
from terraformer.layers.core import dropout
from terraformer.layers.efficient.linear import mask_keys
from terraformer.layers.efficient.projections import (
    d_model_of,
    init_projections,
    layer_inputs,
    pack_projections,
    project_heads,
    project_output,
)


class LinformerAttention(Layer):
    """Linformer self-attention: (batch, length, d_model) -> same, length <= max_len.

    Keys and values are projected along the length by learned `E`, `F` [max_len, proj_len]
    (shared by the heads; one matrix for both with `share_kv`), then attended with softmax:
    time O(L k (d_qk + d_v)) and memory O(L k) per head for k = proj_len, against softmax
    attention's O(L²). An input shorter than `max_len` uses the first `length` rows of E and F;
    padded positions (a mask) are left out of the mixtures. Not causal: it cannot decode, and
    `causal=True` or mode='predict' is a ValueError; use it in encoders.

    Args:
      n_heads, d_qk, d_v: heads and per-head widths of queries/keys and values.
      causal: must be False (see above); accepted for the Reformer convention.
      masked: the layer takes (x, mask), mask [batch, length] (True = real token), and returns
        (y, mask).
      max_len: the longest input (the rows of E and F).
      proj_len: k, the projected length.
      share_kv: one projection for keys and values (the paper's key-value sharing).
      attention_dropout, output_dropout: dropout rates on the attention weights / the output.
      use_bias: biases in the Q/K/V/output projections.
      mode: 'train' or 'eval'.
    Weights: SelfAttention's projections and 'e' [max_len, proj_len] (+ 'f' unless share_kv).
    """

    def __init__(self, n_heads: int = 1, d_qk: int = 64, d_v: int = 64, causal: bool = False,
                 masked: bool = False, max_len: int = 2048, proj_len: int = 256,
                 share_kv: bool = False, attention_dropout: float = 0.0,
                 output_dropout: float = 0.0, use_bias: bool = False, mode: str = "train"):
        n = 2 if masked else 1
        super().__init__(n_in=n, n_out=n, name="LinformerAttention")
        who = self.name
        if causal:
            raise ValueError(f"{who}: causal=True is impossible: E and F mix every position, "
                             "future ones included, into each projected key and value")
        self._n_heads = check_int("n_heads", n_heads, 1, who)
        self._d_qk = check_int("d_qk", d_qk, 1, who)
        self._d_v = check_int("d_v", d_v, 1, who)
        self._max_len = check_int("max_len", max_len, 1, who)
        self._proj_len = check_int("proj_len", proj_len, 1, who)
        self._attention_dropout = check_rate("attention_dropout", attention_dropout, who)
        self._output_dropout = check_rate("output_dropout", output_dropout, who)
        self._masked, self._share_kv, self._use_bias = bool(masked), bool(share_kv), use_bias
        self._mode = check_mode(mode)
        if self._mode == "predict":
            raise ValueError(f"{who}: mode='predict' needs causal attention, which a Linformer "
                             "cannot be; run it in 'eval' (e.g. as an encoder)")

    def init_weights_and_state(self, input_signature, rng):
        x_sig = input_signature[0] if self._masked else input_signature
        if len(x_sig.shape) != 3:
            raise ValueError(f"{self.name}: expected x of shape (batch, length, d_model), "
                             f"got {tuple(x_sig.shape)}")
        r_w, r_e, r_f = jax.random.split(rng, 3)
        weights = init_projections(r_w, x_sig.shape[-1], self._n_heads, self._d_qk, self._d_v,
                                   self._use_bias)
        shape = (self._max_len, self._proj_len)
        weights["e"] = init_lib.glorot_uniform(r_e, shape)
        if not self._share_kv:
            weights["f"] = init_lib.glorot_uniform(r_f, shape)
        return weights, EMPTY

    def pack_for_decoding(self, weights, dtype: str):
        """These weights with the four kernels as PackedKernels (see `core.pack_kernel`)."""
        return pack_projections(weights, dtype)

    def apply(self, x, weights, state, rng):
        given_mask = x[1] if self._masked else None
        x, mask = layer_inputs(x, self._masked, self.name, d_model_of(weights))
        length = x.shape[1]
        if length > self._max_len:
            raise ValueError(f"{self.name}: inputs of length {length} exceed max_len="
                             f"{self._max_len} (the rows of its projections E and F)")
        rng_attn, rng_out = (None, None) if rng is None else jax.random.split(rng)
        q, k, v = (project_heads(x, weights, n, self._n_heads) for n in ("q", "k", "v"))
        e = weights["e"][:length].astype(jnp.float32)
        f = e if self._share_kv else weights["f"][:length].astype(jnp.float32)
        # A padded position's key and value are zeroed, so no mixture includes it.
        k = jnp.einsum("bhld,lk->bhkd", mask_keys(k.astype(jnp.float32), mask), e)
        v = jnp.einsum("bhld,lk->bhkd", mask_keys(v.astype(jnp.float32), mask), f)
        out = dot_product_attention(q.astype(jnp.float32), k, v,
                                    dropout_rate=self._attention_dropout, rng=rng_attn,
                                    mode=self._mode)
        y = project_output(out.astype(x.dtype), weights)
        y = dropout(y, self._output_dropout, rng_out, self._mode)
        return ((y, given_mask) if self._masked else y), state


__all__ = ["LinformerAttention"]
