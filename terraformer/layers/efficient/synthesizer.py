"""Synthesizer attention (Tay et al., 2021): attention weights synthesised without query-key
dot products.

- 'dense': each token's scores over the positions come from a two-layer MLP of that token
  alone, `B_i = relu(x_i W1 + b1) W2 + b2` (per head, `max_len` logits);
- 'random': a score matrix `R [n_heads, max_len, max_len]` independent of the input, learned
  (in the weights) or fixed at init (in the state, never trained).

The scores of an input of length L are the first L columns (dense) or the leading L x L block
(random), masked (causal, padding) and normalised by a softmax over the keys; the values are
projected as `SelfAttention`'s. Causal by masking, so a causal layer decodes: predict mode
caches the values (`kv_cache`'s ring, `max_len` positions) and synthesises each new token's
scores from the token (dense) or its position (random).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from terraformer.checks import check_choice, check_int, check_rate
from terraformer.layers import initializers as init_lib
from terraformer.layers import kv_cache
from terraformer.layers.attention_core import MASK_VALUE, position_mask
from terraformer.layers.base import EMPTY, Layer, check_mode
from terraformer.layers.core import dropout, matmul, pack_kernel
from terraformer.layers.efficient.projections import (
    d_model_of,
    init_projections,
    layer_inputs,
    pack_projections,
    project_heads,
    project_output,
)

SYNTHESIZER_TYPES = ("dense", "random")


def synthesized_attention(scores, v, allowed, dropout_rate=0.0, rng=None, mode="eval"):
    """softmax(scores) v over the allowed keys.

    Args:
      scores: [batch or 1, n_heads, n_q, n_k] logits; v: [batch, n_heads, n_k, d_v].
      allowed: bool broadcastable to the scores (True = may attend).
    Returns:
      [batch, n_heads, n_q, d_v] float32.
    """
    scores = jnp.where(allowed, scores.astype(jnp.float32), MASK_VALUE)
    weights = dropout(jax.nn.softmax(scores, axis=-1), dropout_rate, rng, mode)
    return jnp.einsum("...qk,...kd->...qd", weights, v.astype(jnp.float32))


class SynthesizerAttention(Layer):
    """Synthesizer self-attention, dense or random: (batch, length, d_model) -> same,
    length <= max_len.

    Time O(L max_len d_qk + L² d_v) (dense; random: O(L² d_v)) and memory O(L²) per head, as
    softmax attention, but without query-key products; weights O(d_qk max_len) per head
    (dense) or O(max_len²) per head (random). Decodes causally: predict mode caches the values
    of up to `max_len` positions, each token costing O(max_len (d_qk + d_v)) per head.

    Args:
      n_heads: heads.
      d_qk: the hidden width per head of the dense synthesizer's MLP (no queries or keys).
      d_v: the per-head width of values.
      causal: each position sees itself and earlier positions only (needed for predict).
      masked: the layer takes (x, mask), mask [batch, length] (True = real token), and returns
        (y, mask); padded keys are never attended to.
      synthesizer_type: 'dense' or 'random' (see the module docstring).
      max_len: the longest input (the synthesised scores' width).
      fixed_random: 'random' only: the score matrix is drawn at init and kept in the state
        (never trained) instead of learned in the weights.
      attention_dropout, output_dropout: dropout rates on the attention weights / the output.
      use_bias: biases in the value and output projections.
      mode: 'train', 'eval' or 'predict'.
    Weights: {'wv', 'wo'} as SelfAttention's, and dense: {'w1': [d_model, n_heads*d_qk],
    'b1': [n_heads*d_qk], 'w2': [n_heads, d_qk, max_len], 'b2': [n_heads, max_len]};
    random: {'r': [n_heads, max_len, max_len]} (in the state with fixed_random).
    """

    def __init__(self, n_heads: int = 1, d_qk: int = 64, d_v: int = 64, causal: bool = False,
                 masked: bool = False, synthesizer_type: str = "dense", max_len: int = 512,
                 fixed_random: bool = False, attention_dropout: float = 0.0,
                 output_dropout: float = 0.0, use_bias: bool = False, mode: str = "train"):
        n = 2 if masked else 1
        super().__init__(n_in=n, n_out=n, name="SynthesizerAttention")
        who = self.name
        self._n_heads = check_int("n_heads", n_heads, 1, who)
        self._d_qk = check_int("d_qk", d_qk, 1, who)
        self._d_v = check_int("d_v", d_v, 1, who)
        self._type = check_choice("synthesizer_type", synthesizer_type, SYNTHESIZER_TYPES, who)
        self._max_len = check_int("max_len", max_len, 1, who)
        self._attention_dropout = check_rate("attention_dropout", attention_dropout, who)
        self._output_dropout = check_rate("output_dropout", output_dropout, who)
        if fixed_random and self._type != "random":
            raise ValueError(f"{who}: fixed_random=True needs synthesizer_type='random', got "
                             f"{synthesizer_type!r}")
        self._fixed = bool(fixed_random)
        self._causal, self._masked, self._use_bias = bool(causal), bool(masked), bool(use_bias)
        self._mode = check_mode(mode)
        if self._mode == "predict" and not self._causal:
            raise ValueError(f"{who}: predict mode needs causal=True")

    # -- weights -------------------------------------------------------------------------
    def init_weights_and_state(self, input_signature, rng):
        x_sig = input_signature[0] if self._masked else input_signature
        if len(x_sig.shape) != 3:
            raise ValueError(f"{self.name}: expected x of shape (batch, length, d_model), "
                             f"got {tuple(x_sig.shape)}")
        d_model, h = x_sig.shape[-1], self._n_heads
        r_w, r_1, r_2 = jax.random.split(rng, 3)
        weights = init_projections(r_w, d_model, h, self._d_qk, self._d_v, self._use_bias,
                                   names=("v",))
        state = {}
        if self._type == "dense":
            weights["w1"] = init_lib.glorot_uniform(r_1, (d_model, h * self._d_qk))
            weights["b1"] = jnp.zeros((h * self._d_qk,))
            weights["w2"] = init_lib.glorot_uniform(r_2, (h, self._d_qk, self._max_len))
            weights["b2"] = jnp.zeros((h, self._max_len))
        else:
            r = jax.random.normal(r_1, (h, self._max_len, self._max_len), jnp.float32)
            (state if self._fixed else weights)["r"] = r
        if self._mode == "predict":
            batch = x_sig.shape[0]
            v = kv_cache.new_ring(batch, h, self._max_len, self._d_v, x_sig.dtype)
            state.update(v=v, v_valid=jnp.zeros((batch, v.shape[2]), bool),
                         position=jnp.zeros((), jnp.int32))
        return weights, (state or EMPTY)

    def pack_for_decoding(self, weights, dtype: str):
        """These weights with the value, output and (dense) first MLP kernels packed."""
        packed = pack_projections(weights, dtype, names=("wv", "wo"))
        if "w1" in weights:
            packed["w1"] = pack_kernel(weights["w1"], dtype)
        return packed

    def predict_context(self) -> int | None:
        """max_len in predict mode: the synthesised scores cover no more positions."""
        return self._max_len if self._mode == "predict" else None

    # -- scores --------------------------------------------------------------------------
    def _scores(self, x, weights, state, start, n_keys: int):
        """Logits of the queries at positions start .. start + n - 1 (x [batch, n, d_model])
        over keys 0 .. n_keys - 1 (n_keys <= max_len): [batch or 1, n_heads, n, n_keys]."""
        if self._type == "dense":
            hidden = matmul(x, weights["w1"]) + lax.broadcast_to_rank(weights["b1"], x.ndim)
            hidden = jax.nn.relu(hidden.reshape(*x.shape[:2], self._n_heads, self._d_qk))
            w2 = weights["w2"][..., :n_keys].astype(hidden.dtype)
            return (jnp.einsum("bnhe,hek->bhnk", hidden, w2)
                    + weights["b2"][None, :, None, :n_keys])
        r = (state if self._fixed else weights)["r"]
        rows = lax.dynamic_slice_in_dim(r, start, x.shape[1], axis=1)
        return rows[None, :, :, :n_keys]

    # -- forward -------------------------------------------------------------------------
    def apply(self, x, weights, state, rng):
        given_mask = x[1] if self._masked else None
        x, mask = layer_inputs(x, self._masked, self.name, d_model_of(weights))
        length = x.shape[1]
        if length > self._max_len:
            raise ValueError(f"{self.name}: {length} positions exceed max_len={self._max_len} "
                             "(the width of its synthesised scores)")
        rng_attn, rng_out = (None, None) if rng is None else jax.random.split(rng)
        v = project_heads(x, weights, "v", self._n_heads)
        if self._mode == "predict":
            out, state = self._attend_cached(x, v, mask, weights, state)
        else:
            pos = jnp.arange(length)
            allowed = position_mask(pos, pos, self._causal)[None, None]
            if mask is not None:
                allowed = allowed & mask[:, None, None, :]
            out = synthesized_attention(self._scores(x, weights, state, 0, length), v, allowed,
                                        self._attention_dropout, rng_attn, self._mode)
        y = project_output(out.astype(x.dtype), weights)
        y = dropout(y, self._output_dropout, rng_out, self._mode)
        return ((y, given_mask) if self._masked else y), state

    def _attend_cached(self, x, v, mask, weights, state):
        """New tokens over the value cache: slot p holds position p (positions < max_len <=
        ring, so nothing wraps), and slots not yet written have negative key positions."""
        if state["v"].shape[0] != x.shape[0]:
            raise ValueError(f"{self.name}: predict state was built for batch "
                             f"{state['v'].shape[0]}, got inputs of batch {x.shape[0]}")
        n, start = x.shape[1], state["position"]
        ring = state["v"].shape[2]
        new_valid = jnp.ones(x.shape[:2], bool) if mask is None else mask
        state = dict(state)
        state["v"] = kv_cache.ring_write(state["v"], v, start, axis=2)
        state["v_valid"] = kv_cache.ring_write(state["v_valid"], new_valid, start, axis=1)
        state["position"] = start + n
        q_pos = start + jnp.arange(n)
        k_pos = kv_cache.key_positions(start + n - 1, 0, ring, ring)
        allowed = (kv_cache.window_mask(q_pos, k_pos)[None, None]
                   & state["v_valid"][:, None, None, :])
        scores = self._scores(x, weights, state, start, self._max_len)
        scores = jnp.pad(scores, [(0, 0), (0, 0), (0, 0), (0, ring - self._max_len)])
        return synthesized_attention(scores, state["v"], allowed), state


__all__ = ["SYNTHESIZER_TYPES", "SynthesizerAttention", "synthesized_attention"]
