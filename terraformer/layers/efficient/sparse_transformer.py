"""Sparse Transformer attention (Child et al. 2019): the strided and the fixed factorised patterns.

Every head attends to the *union* of the pattern's two factorised sets (the paper's "merged
head" variant, section 4.2), with blocks of `block_len = l` positions (the stride):

- `strided`: query i sees keys in its own block and the previous one (a chunk-level local
  window; non-causal: the next one too) and every key in the same column, `(i - j) % l == 0`.
- `fixed`: query i sees keys in its own block and the last `n_summary = c` positions of
  every block, `j % l >= l - c` (the "summary" columns).

Causal: keys after the query are hidden as well.

Computed as disjoint streams of `attention_core.blocked_attention`, merged by log-sum-exp
(see `block_sparse`): the window as relative chunk offsets; the strided columns on the
transposed sequence (chunks = columns of the `(L/l, l)` grid), the rows already in the window
excluded through shifted positions; the fixed summary keys gathered into chunks of their own
that every block of queries visits (`table_stream`).

Complexity per head, L = length: strided, time O(L (3l + L/l)) (O(L sqrt L) with l ~ sqrt L)
and memory O(L d) plus one cache-sized block of scores; fixed, time O(L (l + L c / l)) and
memory O(L d * ceil(L c / l^2)) (the queries repeated once per chunk of summary keys).
Causal decoding: yes (predict mode on the ring cache, the pattern as its key mask; a step
costs O(predict_mem_len) and equals the eval forward while the sequence fits the ring).
"""

from __future__ import annotations

import jax.numpy as jnp

from terraformer.checks import check_choice, check_int
from terraformer.layers.efficient.block_sparse import (
    NO_DROPOUT,
    AttentionDropout,
    BlockSparseAttention,
    chunks_of,
    merge_streams,
    reverse_positions,
    table_stream,
    window_stream,
)

PATTERNS = ("strided", "fixed")


class SparseTransformerAttention(BlockSparseAttention):
    """Sparse Transformer self-attention, `(batch, length, d_model) -> same`.

    Args (besides those of `BlockSparseAttention`: n_heads, d_qk, d_v, causal,
    output_dropout, mode, masked, predict_mem_len, attention_dropout):
      pattern: 'strided' or 'fixed'.
      block_len: the stride l (positions per block); lengths are padded to a multiple.
      n_summary: c, the summary positions at the end of each block ('fixed'), 1..block_len.
    """

    def __init__(self, n_heads: int = 1, d_qk: int = 64, d_v: int = 64, causal: bool = False,
                 output_dropout: float = 0.0, mode: str = "train", masked: bool = False,
                 pattern: str = "strided", block_len: int = 64, n_summary: int = 8,
                 predict_mem_len: int = 2048, attention_dropout: float = 0.0):
        super().__init__(n_heads, d_qk, d_v, causal, output_dropout, mode, masked, block_len,
                         predict_mem_len, name="SparseTransformerAttention",
                         attention_dropout=attention_dropout)
        self.pattern = check_choice("pattern", pattern, PATTERNS, self.name)
        self.n_summary = check_int("n_summary", n_summary, 1, self.name,
                                   maximum=self.block_len)

    def pattern_mask(self, q_pos, k_pos):
        q, k, l = q_pos[:, None], k_pos[None, :], self.block_len
        if self.pattern == "strided":
            near = jnp.abs(q // l - k // l) <= 1
            return (near | ((q - k) % l == 0))[None]
        return ((q // l == k // l) | (k % l >= l - self.n_summary))[None]

    def attend_blocks(self, q, k, v, k_pos, drop: AttentionDropout = NO_DROPOUT):
        b, h, length, _ = q.shape
        l = self.block_len
        n_blocks = length // l
        kp = chunks_of(jnp.broadcast_to(k_pos[:, None], (b, h, length)), l)
        qp = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32).reshape(1, n_blocks, l),
                              kp.shape)
        qc, kc, vc = chunks_of(q, l), chunks_of(k, l), chunks_of(v, l)
        if self.pattern == "strided":
            window = [-1, 0] if self.causal else [-1, 0, 1]
            streams = [window_stream(qc, kc, vc, qp, kp, window, self.causal,
                                     **drop.stream(0))]
            streams += self._columns(qc, kc, vc, kp, n_blocks, drop)
        else:
            streams = [window_stream(qc, kc, vc, qp, kp, [0], self.causal, **drop.stream(0))]
            streams += self._summaries(qc, kc, vc, kp, qp, length, drop)
        return merge_streams(streams).reshape(b, h, length, -1)

    def _columns(self, qc, kc, vc, kp, n_blocks, drop):
        """Same-column keys outside the window (rows at least 2 away), on the transposed grid:
        chunks are the l columns, each of n_blocks rows."""
        def t(a):  # (n, N, l, ...) <-> (n, l, N, ...)
            return jnp.swapaxes(a, 1, 2)

        rows = jnp.broadcast_to(jnp.arange(n_blocks, dtype=jnp.int32)[:, None], kp.shape[1:])
        rows = jnp.broadcast_to(rows, kp.shape)
        k_rows = jnp.where(kp >= 0, rows, -1)
        # Causal test k_row <= q_row - 2: the rows before the window.
        pairs = [(rows - 2, k_rows)]
        if not self.causal:  # and, reversed, the rows after it
            pairs.append((reverse_positions(rows, n_blocks) - 2,
                          reverse_positions(k_rows, n_blocks)))
        streams = []
        for i, (q_rows, k_r) in enumerate(pairs):
            out, lse = window_stream(t(qc), t(kc), t(vc), t(q_rows), t(k_r), [0], True,
                                     **drop.stream(1 + i))
            streams.append((jnp.swapaxes(out, 2, 3), jnp.swapaxes(lse, 2, 3)))
        return streams

    def _summaries(self, qc, kc, vc, kp, qp, length, drop):
        """The summary keys of the other blocks, gathered into chunks of block_len."""
        l, c = self.block_len, self.n_summary
        n, n_blocks = qc.shape[:2]
        n_keys = n_blocks * c
        pad = -n_keys % l

        def gather(a, fill=0):  # (n, N, l, ...) -> (n, S / l, l, ...), S = N c padded
            s = a[:, :, l - c:].reshape(n, n_keys, *a.shape[3:])
            s = jnp.pad(s, [(0, 0), (0, pad)] + [(0, 0)] * (s.ndim - 2), constant_values=fill)
            return s.reshape(n, (n_keys + pad) // l, l, *a.shape[3:])

        ks, vs, kps = gather(kc), gather(vc), gather(kp, -1)
        table = jnp.broadcast_to(jnp.arange(ks.shape[1]), (n_blocks, ks.shape[1]))
        n_heads = self.n_heads
        block_start = (qp // l) * l
        # Causal test k <= block start - 1: summary keys of earlier blocks.
        streams = [table_stream(qc, ks, vs, block_start - 1, kps, table, n_heads, True,
                                **drop.stream(1))]
        if not self.causal:  # reversed, k >= next block's start: those of later blocks
            streams.append(table_stream(qc, ks, vs, reverse_positions(block_start + l, length),
                                        reverse_positions(kps, length), table, n_heads, True,
                                        **drop.stream(2)))
        return streams


__all__ = ["PATTERNS", "SparseTransformerAttention"]
