"""Sparse Sinkhorn attention (Tay et al. 2020): learned sorting of blocks.

The sequence is cut in N blocks of `block_len`. Per head, a sorting network scores every
block against every block, `R = relu(mean of the block's keys @ w_sort)` (`w_sort: d_qk x
n_max_blocks`, the first N columns used), and Sinkhorn normalisation (`n_sinkhorn_iters`
alternating row and column normalisations in the log domain of `R / temperature`) turns it
into a doubly stochastic block-to-block matrix S (a relaxed permutation). The sorted keys and
values of block i are `sum_j S_ij * (keys, values of block j)`, and every query of block i
attends to the keys of its own block and of its sorted block (2 * block_len keys).

Computed as two streams of `attention_core.blocked_attention` (own block, sorted block), merged
by log-sum-exp (`block_sparse.merge_streams`): one softmax over the two blocks' keys.

Not causal, and no predict mode: the column normalisations make the sorting of an early
block depend on every later block, so an early output depends on future tokens; the paper's
causal variant changes the normalisation itself, which we do not implement. `causal=True` and
`mode='predict'` raise a ValueError. No padding mask either: a sorted block mixes the keys
of whole blocks, so a padded token cannot be hidden inside a mixture.

Complexity per head, L = length, b = block_len, N = L / b: time O(L b d + N^2 d + L N d)
(the attention, the sorting network, the mixing of blocks), memory O(L d + N^2) plus a
cache-sized block of scores. Causal decoding: no (see above).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from terraformer.checks import ArgumentError, check_int, check_number, check_rate
from terraformer.layers import initializers as init_lib
from terraformer.layers.attention import merge_heads, split_heads
from terraformer.layers.base import EMPTY, Layer, check_mode
from terraformer.layers.core import check_feature_dim, dropout, matmul
from terraformer.layers.efficient.block_sparse import chunks_of, merge_streams, window_stream


def sinkhorn(log_alpha, n_iters: int):
    """Sinkhorn normalisation in the log domain: rows, then columns, `n_iters` times.

    log_alpha: `(..., N, N)`. Returns the doubly stochastic `exp(...)` (columns sum to one
    exactly, rows to one as the iterations converge).
    """
    for _ in range(n_iters):
        log_alpha = log_alpha - jax.nn.logsumexp(log_alpha, axis=-1, keepdims=True)
        log_alpha = log_alpha - jax.nn.logsumexp(log_alpha, axis=-2, keepdims=True)
    return jnp.exp(log_alpha)


class SinkhornAttention(Layer):
    """Sparse Sinkhorn self-attention, `(batch, length, d_model) -> same` (non-causal).

    Args:
      n_heads, d_qk, d_v: heads and their widths.
      causal: must be False (see the module docstring).
      output_dropout: dropout on the output (train mode).
      mode: 'train' or 'eval' ('predict' raises: no causal decoding).
      block_len: positions per block; it must divide the length.
      max_length: the longest input; the sorting network scores max_length / block_len
        blocks (a multiple of block_len).
      n_sinkhorn_iters: Sinkhorn iterations (>= 1).
      temperature: R is divided by it before the normalisation (> 0; lower: closer to a
        hard permutation).
    Weights: `{'wq','wk','wv': [d_model, n_heads*d], 'wo': [n_heads*d_v, d_model],
    'w_sort': [n_heads, d_qk, max_length / block_len]}`.
    """

    def __init__(self, n_heads: int = 1, d_qk: int = 64, d_v: int = 64, causal: bool = False,
                 output_dropout: float = 0.0, mode: str = "train", block_len: int = 64,
                 max_length: int = 8192, n_sinkhorn_iters: int = 8, temperature: float = 0.75):
        super().__init__(n_in=1, n_out=1, name="SinkhornAttention")
        who = self.name
        if causal:
            raise ArgumentError(
                f"{who}: causal=True is not supported: Sinkhorn's column normalisation makes "
                "an early block's sorting depend on later blocks (the future)")
        self.mode = check_mode(mode)
        if self.mode == "predict":
            raise ArgumentError(f"{who}: mode='predict' is not supported: Sinkhorn attention "
                                "cannot decode causally (its sorting needs the future)")
        self.n_heads = check_int("n_heads", n_heads, 1, who)
        self.d_qk = check_int("d_qk", d_qk, 1, who)
        self.d_v = check_int("d_v", d_v, 1, who)
        self.causal = False
        self.block_len = check_int("block_len", block_len, 1, who)
        self.max_length = check_int("max_length", max_length, 1, who)
        if self.max_length % self.block_len:
            raise ArgumentError(f"{who}: block_len={self.block_len} must divide "
                                f"max_length={self.max_length}")
        self.n_sinkhorn_iters = check_int("n_sinkhorn_iters", n_sinkhorn_iters, 1, who)
        self.temperature = check_number("temperature", temperature, who, minimum=0.0,
                                        allow_minimum=False)
        self.output_dropout = check_rate("output_dropout", output_dropout, who)

    def init_weights_and_state(self, input_signature, rng):
        d_model, h = input_signature.shape[-1], self.n_heads
        keys = jax.random.split(rng, 5)
        dims = {"wq": h * self.d_qk, "wk": h * self.d_qk, "wv": h * self.d_v}
        weights = {name: init_lib.glorot_uniform(key, (d_model, d))
                   for (name, d), key in zip(dims.items(), keys)}
        weights["wo"] = init_lib.glorot_uniform(keys[3], (h * self.d_v, d_model))
        n_max = self.max_length // self.block_len
        weights["w_sort"] = jax.random.normal(keys[4], (h, self.d_qk, n_max)) / math.sqrt(
            self.d_qk)
        return weights, EMPTY

    def _check_length(self, length: int) -> None:
        if length % self.block_len:
            raise ValueError(f"{self.name}: block_len={self.block_len} must divide the "
                             f"length, got length {length}")
        if length > self.max_length:
            raise ValueError(f"{self.name}: length {length} exceeds max_length="
                             f"{self.max_length}")

    def sorting_matrix(self, k, weights):
        """The block-to-block matrix S of keys `k (batch, n_heads, length, d_qk)`:
        `(batch, n_heads, N, N)`, N = length / block_len."""
        b, h, length, d = k.shape
        n_blocks = length // self.block_len
        summary = jnp.mean(k.reshape(b, h, n_blocks, self.block_len, d), axis=3)
        w_sort = weights["w_sort"][:, :, :n_blocks].astype(jnp.float32)
        scores = jax.nn.relu(jnp.einsum("bhnd,hdm->bhnm", summary.astype(jnp.float32), w_sort))
        return sinkhorn(scores / self.temperature, self.n_sinkhorn_iters)

    def apply(self, x, weights, state, rng):
        if x.ndim != 3:
            raise ValueError(f"{self.name}: expected x of shape (batch, length, d_model), "
                             f"got {tuple(x.shape)}")
        check_feature_dim(x, weights["wq"].shape[-2], self.name)
        b, length = x.shape[:2]
        self._check_length(length)
        q, k, v = (split_heads(matmul(x, weights[n]), self.n_heads) for n in ("wq", "wk", "wv"))
        l, h = self.block_len, self.n_heads
        n_blocks = length // l
        s = self.sorting_matrix(k, weights)

        def sort(a):  # (b, h, L, d) -> the sorted blocks, (b * h, N, l, d)
            blocks = a.reshape(b, h, n_blocks, l, a.shape[-1]).astype(jnp.float32)
            return jnp.einsum("bhij,bhjtd->bhitd", s, blocks).reshape(
                b * h, n_blocks, l, a.shape[-1]).astype(a.dtype)

        pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32).reshape(1, n_blocks, l),
                               (b * h, n_blocks, l))
        qc, kc, vc = chunks_of(q, l), chunks_of(k, l), chunks_of(v, l)
        out = merge_streams([window_stream(qc, kc, vc, pos, pos, [0], False),
                             window_stream(qc, sort(k), sort(v), pos, pos, [0], False)])
        out = out.reshape(b, h, length, -1)
        y = matmul(merge_heads(out.astype(x.dtype)), weights["wo"])
        return dropout(y, self.output_dropout, rng, self.mode), state


__all__ = ["SinkhornAttention", "sinkhorn"]
