"""Linear Transformer attention (Katharopoulos et al., 2020) and the prefix-sum core it shares
with the Performer.

Attention with a feature map `phi` in place of the softmax kernel:

    out_i = phi(q_i) · S_i / (phi(q_i) · z_i),   S_i = sum_j phi(k_j) v_jᵀ,   z_i = sum_j phi(k_j)

where j runs over every key (non-causal) or over j <= i (causal). Non-causal, S and z are
two sums over the sequence. Causal, they are prefix sums; `causal_linear_attention` computes
them a chunk of `chunk_len` positions at a time (a `lax.scan` over chunks carrying the
`[m, d_v]` state S and `[m]` state z): inside a chunk the masked quadratic form
`tril(phi(Q) phi(K)ᵀ) V`, across chunks the carried state, so no `[length, m, d_v]` array of
every prefix is ever built. The carried state is also the decoding state: a predict-mode layer
keeps `(S, z)` of every position it has read and adds each call's tokens to it, whatever their
number.

- `elu_feature_map(x)`: `elu(x) + 1`, the paper's map (positive, so the normaliser is > 0).
- `linear_attention(phi_q, phi_k, v)`: the non-causal form.
- `causal_linear_attention(phi_q, phi_k, v, state)`: the causal form from a carried state.
- `LinearAttention`: the layer (projections as `SelfAttention`, padding mask, predict mode);
  `PerformerAttention` (performer.py) is this layer with FAVOR+ features.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from terraformer.checks import check_int, check_number, check_rate
from terraformer.layers.base import EMPTY, Layer, check_mode
from terraformer.layers.core import dropout
from terraformer.layers.efficient.projections import (
    d_model_of,
    init_projections,
    layer_inputs,
    pack_projections,
    project_heads,
    project_output,
)


def elu_feature_map(x):
    """elu(x) + 1: the Linear Transformer's feature map, elementwise, > 0 everywhere."""
    return jax.nn.elu(x) + 1.0


def normalise(num, den, eps: float):
    """num [..., d_v] / (den [...] + eps); a query that sees no key (den + eps == 0) gets 0."""
    den = den + eps
    return num / jnp.where(den > 0, den, 1.0)[..., None]


def mask_keys(phi_k, key_mask):
    """phi_k [b, h, L, m] with the rows of padded keys (key_mask [b, L] False) set to 0: a
    zero feature row adds nothing to S or z, so the key is never attended to."""
    if key_mask is None:
        return phi_k
    return phi_k * key_mask[:, None, :, None].astype(phi_k.dtype)


def linear_attention(phi_q, phi_k, v, key_mask=None, eps: float = 1e-6):
    """Non-causal linear attention: `phi_q (phi_kᵀ v) / (phi_q sum_j phi_k_j)`.

    Args:
      phi_q, phi_k: [batch, n_heads, length, m] non-negative features of queries and keys.
      v: [batch, n_heads, length, d_v].
      key_mask: bool [batch, length] (True = real token) or None.
    Returns:
      [batch, n_heads, length, d_v] float32. Time O(L m d_v), memory O(L (m + d_v) + m d_v).
    """
    phi_q, phi_k, v = (a.astype(jnp.float32) for a in (phi_q, phi_k, v))
    phi_k = mask_keys(phi_k, key_mask)
    s = jnp.einsum("bhlm,bhld->bhmd", phi_k, v)
    z = jnp.sum(phi_k, axis=2)
    return normalise(jnp.einsum("bhlm,bhmd->bhld", phi_q, s),
                     jnp.einsum("bhlm,bhm->bhl", phi_q, z), eps)


def empty_prefix_state(batch: int, n_heads: int, m: int, d_v: int):
    """(S [batch, n_heads, m, d_v], z [batch, n_heads, m]) of an empty prefix, float32."""
    return (jnp.zeros((batch, n_heads, m, d_v), jnp.float32),
            jnp.zeros((batch, n_heads, m), jnp.float32))


def causal_linear_attention(phi_q, phi_k, v, state=None, key_mask=None, chunk_len: int = 64,
                            eps: float = 1e-6):
    """Causal linear attention from a carried prefix state, a chunk at a time.

    Args:
      phi_q, phi_k: [batch, n_heads, n, m] non-negative features of n consecutive positions.
      v: [batch, n_heads, n, d_v].
      state: (S [batch, n_heads, m, d_v], z [batch, n_heads, m]) float32, the sums over every
        earlier position (None: an empty prefix).
      key_mask: bool [batch, n] (True = real token) or None; a padded key is left out of the
        sums.
      chunk_len: positions per step of the scan (the last chunk is zero-padded: zero features
        add nothing).
    Returns:
      (out [batch, n_heads, n, d_v] float32, the state after the n positions). Time
      O(n (c + m) (m + d_v)) for chunks of c positions; memory O(n (m + d_v + c) + m d_v)
      forward and, for the gradient, one (S, z) per chunk: O((n / c) m d_v).
    """
    b, h, n, m = phi_q.shape
    d_v = v.shape[-1]
    phi_q, phi_k, v = (a.astype(jnp.float32) for a in (phi_q, phi_k, v))
    phi_k = mask_keys(phi_k, key_mask)
    if state is None:
        state = empty_prefix_state(b, h, m, d_v)
    c = min(chunk_len, n)
    pad = -n % c
    if pad:
        padding = [(0, 0), (0, 0), (0, pad), (0, 0)]
        phi_q, phi_k, v = (jnp.pad(a, padding) for a in (phi_q, phi_k, v))
    n_chunks = (n + pad) // c

    def chunks(a):  # [b, h, n_chunks * c, d] -> [n_chunks, b, h, c, d]
        return jnp.moveaxis(a.reshape(b, h, n_chunks, c, a.shape[-1]), 2, 0)

    lower = jnp.tril(jnp.ones((1, 1, c, c), jnp.float32))

    def step(carry, chunk):
        s, z = carry
        qc, kc, vc = chunk
        a = jnp.einsum("bhqm,bhkm->bhqk", qc, kc) * lower  # the chunk's own keys, causal
        num = jnp.einsum("bhqm,bhmd->bhqd", qc, s) + jnp.einsum("bhqk,bhkd->bhqd", a, vc)
        den = jnp.einsum("bhqm,bhm->bhq", qc, z) + jnp.sum(a, axis=-1)
        s = s + jnp.einsum("bhkm,bhkd->bhmd", kc, vc)
        z = z + jnp.sum(kc, axis=2)
        return (s, z), normalise(num, den, eps)

    state, out = lax.scan(step, tuple(state), (chunks(phi_q), chunks(phi_k), chunks(v)))
    out = jnp.moveaxis(out, 0, 2).reshape(b, h, n_chunks * c, d_v)
    return out[:, :, :n], state


class LinearAttention(Layer):
    """Linear Transformer self-attention: (batch, length, d_model) -> same.

    `softmax(q kᵀ)` is replaced by `phi(q) phi(k)ᵀ` with `phi = elu + 1`, so attention is
    `phi(Q) (phi(K)ᵀ V)` normalised by `phi(Q) sum_j phi(k_j)`: time O(L d_qk d_v) and memory
    O(L (d_qk + d_v)) per head instead of softmax attention's O(L²). Causal through prefix sums
    computed a chunk at a time (see the module docstring): time O(L (chunk_len + d_qk) d_v),
    memory O(L (d_qk + d_v + chunk_len)) plus one d_qk x d_v state per chunk for the gradient.
    Decodes causally with a constant-size state: predict mode keeps
    `{'s': [batch, n_heads, d_qk, d_v], 'z': [batch, n_heads, d_qk]}` (float32), each token
    costing O(d_qk d_v) whatever the length; any number of tokens per call.

    Args:
      n_heads, d_qk, d_v: heads and per-head widths of queries/keys and values.
      causal: each position sees itself and earlier positions only (needed for predict).
      masked: the layer takes (x, mask), mask [batch, length] (True = real token), and returns
        (y, mask); padded keys are never attended to.
      output_dropout: dropout rate on the output (train mode).
      use_bias: biases in the projections.
      chunk_len: positions per step of the causal prefix-sum scan.
      eps: added to the normaliser (the paper's 1e-6).
      mode: 'train', 'eval' or 'predict'.
    Weights: as `SelfAttention`'s: {'wq','wk': [d_model, n_heads*d_qk], 'wv': [d_model,
    n_heads*d_v], 'wo': [n_heads*d_v, d_model]} (+ biases).
    """

    def __init__(self, n_heads: int = 1, d_qk: int = 64, d_v: int = 64, causal: bool = False,
                 masked: bool = False, output_dropout: float = 0.0, use_bias: bool = False,
                 chunk_len: int = 64, eps: float = 1e-6, mode: str = "train"):
        n = 2 if masked else 1
        super().__init__(n_in=n, n_out=n, name=type(self).__name__)
        who = self.name
        self._n_heads = check_int("n_heads", n_heads, 1, who)
        self._d_qk = check_int("d_qk", d_qk, 1, who)
        self._d_v = check_int("d_v", d_v, 1, who)
        self._chunk_len = check_int("chunk_len", chunk_len, 1, who)
        self._output_dropout = check_rate("output_dropout", output_dropout, who)
        self._eps = check_number("eps", eps, who, minimum=0.0)
        self._causal, self._masked, self._use_bias = bool(causal), bool(masked), bool(use_bias)
        self._mode = check_mode(mode)
        if self._mode == "predict" and not self._causal:
            raise ValueError(f"{who}: predict mode needs causal=True")

    # -- features (the Performer overrides these) ------------------------------------------
    def n_features(self) -> int:
        """m: the width of phi(q) and phi(k), the first axis of the decoding state."""
        return self._d_qk

    def init_features(self, rng) -> dict:
        """State entries the feature map keeps (none for elu + 1)."""
        del rng
        return {}

    def features(self, q, k, state, rng):
        """(phi(q), phi(k)) [batch, n_heads, length, m] of q, k [batch, n_heads, length, d_qk]."""
        del state, rng
        return elu_feature_map(q.astype(jnp.float32)), elu_feature_map(k.astype(jnp.float32))

    # -- weights -------------------------------------------------------------------------
    def init_weights_and_state(self, input_signature, rng):
        x_sig = input_signature[0] if self._masked else input_signature
        if len(x_sig.shape) != 3:
            raise ValueError(f"{self.name}: expected x of shape (batch, length, d_model), "
                             f"got {tuple(x_sig.shape)}")
        r_w, r_f = jax.random.split(rng)
        weights = init_projections(r_w, x_sig.shape[-1], self._n_heads, self._d_qk, self._d_v,
                                   self._use_bias)
        state = self.init_features(r_f)
        if self._mode == "predict":
            s, z = empty_prefix_state(x_sig.shape[0], self._n_heads, self.n_features(),
                                      self._d_v)
            state = {**state, "s": s, "z": z}
        return weights, (state or EMPTY)

    def pack_for_decoding(self, weights, dtype: str):
        """These weights with the four kernels as PackedKernels (see `core.pack_kernel`)."""
        return pack_projections(weights, dtype)

    # -- forward -------------------------------------------------------------------------
    def apply(self, x, weights, state, rng):
        given_mask = x[1] if self._masked else None
        x, mask = layer_inputs(x, self._masked, self.name, d_model_of(weights))
        rng_f, rng_out = (None, None) if rng is None else jax.random.split(rng)
        q, k, v = (project_heads(x, weights, n, self._n_heads) for n in ("q", "k", "v"))
        phi_q, phi_k = self.features(q, k, state, rng_f)
        if self._mode == "predict":
            if state["s"].shape[0] != x.shape[0]:
                raise ValueError(f"{self.name}: predict state was built for batch "
                                 f"{state['s'].shape[0]}, got inputs of batch {x.shape[0]}")
            out, (s, z) = causal_linear_attention(
                phi_q, phi_k, v, (state["s"], state["z"]), mask, self._chunk_len, self._eps)
            state = {**state, "s": s, "z": z}
        elif self._causal:
            out, _ = causal_linear_attention(phi_q, phi_k, v, None, mask, self._chunk_len,
                                             self._eps)
        else:
            out = linear_attention(phi_q, phi_k, v, mask, self._eps)
        y = project_output(out.astype(x.dtype), weights)
        y = dropout(y, self._output_dropout, rng_out, self._mode)
        return ((y, given_mask) if self._masked else y), state


__all__ = ["LinearAttention", "causal_linear_attention", "elu_feature_map", "empty_prefix_state",
           "linear_attention", "mask_keys", "normalise"]
