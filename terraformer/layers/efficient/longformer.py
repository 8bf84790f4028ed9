"""Longformer attention (Beltagy et al. 2020): a sliding window plus global tokens.

Query i sees the keys within `window` positions of its block, counted in whole blocks of
`block_len` (the chunked form of Longformer's own implementation: blocks `i // l - window / l`
.. `i // l + window / l`, a superset of the token window |i - j| <= window), and the first
`n_global` positions, which are global: every query attends to them and (non-causal) they
attend to every key. Causal: keys after the query are hidden as well, so that a global query
sees the keys before it (all of them global).

Computed as two disjoint streams of `attention_core.blocked_attention` merged by log-sum-exp
(`block_sparse`): the window as relative chunk offsets with the global keys taken out, the
global keys as the first chunks that every block of queries visits. The global queries'
rows (non-causal) are one `dot_product_attention` over all keys.

Complexity per head, L = length, w = window, g = n_global, l = block_len: time
O(L (2w + l) + L g + g L), memory O(L d ceil(g / l)) (queries repeated once per chunk of
global keys) plus a cache-sized block of scores and the g x L scores of the global rows.
Causal decoding: yes (predict mode on the ring cache with the pattern as its key mask; a step
costs O(predict_mem_len), equal to the eval forward while the sequence fits the ring).
"""

from __future__ import annotations

import jax.numpy as jnp

from terraformer.checks import ArgumentError, check_int
from terraformer.layers.attention_core import dot_product_attention
from terraformer.layers.efficient.block_sparse import (
    NO_DROPOUT,
    AttentionDropout,
    BlockSparseAttention,
    chunks_of,
    merge_streams,
    table_stream,
    window_stream,
)


class LongformerAttention(BlockSparseAttention):
    """Longformer self-attention, `(batch, length, d_model) -> same`.

    Args (besides those of `BlockSparseAttention`: n_heads, d_qk, d_v, causal,
    output_dropout, mode, masked, predict_mem_len, attention_dropout):
      block_len: positions per block; lengths are padded to a multiple.
      window: positions seen on each side (before only when causal), a multiple of
        block_len.
      n_global: the first n_global positions are global tokens.
    """

    def __init__(self, n_heads: int = 1, d_qk: int = 64, d_v: int = 64, causal: bool = False,
                 output_dropout: float = 0.0, mode: str = "train", masked: bool = False,
                 block_len: int = 64, window: int = 128, n_global: int = 1,
                 predict_mem_len: int = 2048, attention_dropout: float = 0.0):
        super().__init__(n_heads, d_qk, d_v, causal, output_dropout, mode, masked, block_len,
                         predict_mem_len, name="LongformerAttention",
                         attention_dropout=attention_dropout)
        self.window = check_int("window", window, 0, self.name)
        if self.window % self.block_len:
            raise ArgumentError(f"{self.name}: window must be a multiple of "
                                f"block_len={self.block_len}, got {window}")
        self.n_global = check_int("n_global", n_global, 0, self.name)

    def pattern_mask(self, q_pos, k_pos):
        q, k, l = q_pos[:, None], k_pos[None, :], self.block_len
        near = jnp.abs(q // l - k // l) <= self.window // l
        return (near | (k < self.n_global) | (q < self.n_global))[None]

    def attend_blocks(self, q, k, v, k_pos, drop: AttentionDropout = NO_DROPOUT):
        b, h, length, _ = q.shape
        l, g = self.block_len, min(self.n_global, q.shape[2])
        n_blocks, w = length // l, self.window // l
        kp = chunks_of(jnp.broadcast_to(k_pos[:, None], (b, h, length)), l)
        qp = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32).reshape(1, n_blocks, l),
                              kp.shape)
        qc, kc, vc = chunks_of(q, l), chunks_of(k, l), chunks_of(v, l)
        offsets = range(-w, 1 if self.causal else w + 1)
        # The global keys leave the window: they come once, through their own stream.
        streams = [window_stream(qc, kc, vc, qp, jnp.where(kp < g, -1, kp), offsets,
                                 self.causal, **drop.stream(0))]
        if g:
            n_global_chunks = -(-g // l)
            table = jnp.broadcast_to(jnp.arange(n_global_chunks), (n_blocks, n_global_chunks))
            streams.append(table_stream(qc, kc, vc, qp, jnp.where(kp < g, kp, -1), table,
                                        self.n_heads, self.causal, **drop.stream(1)))
        out = merge_streams(streams).reshape(b, h, length, -1)
        if g and not self.causal:  # the global queries see every key
            seen = (k_pos >= 0)[:, None, None, :]
            rows = dot_product_attention(q[:, :, :g], k, v, seen, **drop.dense(2))
            out = out.at[:, :, :g].set(rows.astype(out.dtype))
        return out


__all__ = ["LongformerAttention"]
