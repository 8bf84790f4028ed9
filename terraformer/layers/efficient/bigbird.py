"""BigBird attention (Zaheer et al. 2020), blockified: window + global + random blocks.

With blocks of `block_len` positions, a query in block i sees:

- the window: blocks i - n_window_blocks .. i + n_window_blocks (causal: .. i);
- the global blocks: the first `n_global_blocks` blocks (every query sees them and,
  non-causal, their queries see every key);
- `n_random_blocks` random blocks per query block and head, outside its window and the
  global blocks (causal: before its window), distinct.

Causal: keys after the query are hidden as well. The random choice is fixed when the layer is
built: block i of head h draws from `numpy.random.default_rng((seed, h, i))` among its
candidates (`random_blocks`), so train, eval and predict see the same pattern, and a causal
block's choice does not depend on the length.

Computed as three disjoint streams of `attention_core.blocked_attention` merged by
log-sum-exp (`block_sparse`): the window as relative chunk offsets without the global keys,
the global blocks and the random blocks as tables of absolute chunks (`table_stream`). The
global queries' rows (non-causal) are one `dot_product_attention` over all keys.

Complexity per head, L = length, l = block_len, w/g/r the window/global/random blocks: time
O(L l (2w + 1 + g + r) + g l L); memory O(L d (g + r)) (queries repeated once per global and
random block) plus a cache-sized block of scores and the g l x L scores of the global rows.
Causal decoding: yes (predict mode on the ring cache with the pattern as its key mask; a step
costs O(predict_mem_len), equal to the eval forward while the sequence fits the ring).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from terraformer.checks import check_int
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


class BigBirdAttention(BlockSparseAttention):
    """BigBird self-attention, `(batch, length, d_model) -> same`.

    Args (besides those of `BlockSparseAttention`: n_heads, d_qk, d_v, causal,
    output_dropout, mode, masked, predict_mem_len, attention_dropout):
      block_len: positions per block; lengths are padded to a multiple.
      n_window_blocks: blocks of the window on each side (before only when causal).
      n_global_blocks: the first blocks, global.
      n_random_blocks: random blocks per query block and head (fewer where fewer are left).
      seed: the random choice of blocks (numpy), fixed at build.
    """

    def __init__(self, n_heads: int = 1, d_qk: int = 64, d_v: int = 64, causal: bool = False,
                 output_dropout: float = 0.0, mode: str = "train", masked: bool = False,
                 block_len: int = 64, n_window_blocks: int = 1, n_global_blocks: int = 1,
                 n_random_blocks: int = 2, seed: int = 0, predict_mem_len: int = 2048,
                 attention_dropout: float = 0.0):
        super().__init__(n_heads, d_qk, d_v, causal, output_dropout, mode, masked, block_len,
                         predict_mem_len, name="BigBirdAttention",
                         attention_dropout=attention_dropout)
        self.n_window_blocks = check_int("n_window_blocks", n_window_blocks, 0, self.name)
        self.n_global_blocks = check_int("n_global_blocks", n_global_blocks, 0, self.name)
        self.n_random_blocks = check_int("n_random_blocks", n_random_blocks, 0, self.name)
        self.seed = check_int("seed", seed, 0, self.name)
        self._tables = {}

    def random_blocks(self, n_blocks: int) -> np.ndarray:
        """The random blocks of a sequence of `n_blocks` blocks: int `(n_heads, n_blocks,
        n_random_blocks)`, -1 where a query block has fewer candidates."""
        if n_blocks not in self._tables:
            w, g, r = self.n_window_blocks, self.n_global_blocks, self.n_random_blocks
            table = np.full((self.n_heads, n_blocks, r), -1, np.int32)
            for i in range(g if not self.causal else 0, n_blocks):
                top = i - w if self.causal else n_blocks
                candidates = [j for j in range(g, top) if abs(j - i) > w]
                if not candidates:
                    continue
                for h in range(self.n_heads):
                    rng = np.random.default_rng((self.seed, h, i))
                    pick = rng.choice(len(candidates), min(r, len(candidates)), replace=False)
                    table[h, i, :len(pick)] = np.asarray(candidates)[np.sort(pick)]
            self._tables[n_blocks] = table
        return self._tables[n_blocks]

    def pattern_mask(self, q_pos, k_pos):
        l = self.block_len
        n_blocks = -(-self.predict_mem_len // l) + 1
        table = self.random_blocks(n_blocks)
        # Block-to-block lookup (n_heads, n_blocks, n_blocks): is key block j random for i?
        lookup = np.zeros((self.n_heads, n_blocks, n_blocks), bool)
        h, i, _ = np.nonzero(table >= 0)
        lookup[h, i, table[table >= 0]] = True
        qb, kb = q_pos // l, jnp.clip(k_pos // l, 0, n_blocks - 1)
        qb = jnp.clip(qb, 0, n_blocks - 1)
        random = jnp.asarray(lookup)[:, qb[:, None], kb[None, :]]
        q, k = q_pos[:, None], k_pos[None, :]
        g = self.n_global_blocks * l
        near = jnp.abs(q // l - k // l) <= self.n_window_blocks
        return (near | (k < g) | (q < g))[None] | random

    def attend_blocks(self, q, k, v, k_pos, drop: AttentionDropout = NO_DROPOUT):
        b, h, length, _ = q.shape
        l = self.block_len
        n_blocks, w = length // l, self.n_window_blocks
        n_global = min(self.n_global_blocks, n_blocks)
        g = n_global * l
        kp = chunks_of(jnp.broadcast_to(k_pos[:, None], (b, h, length)), l)
        qp = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32).reshape(1, n_blocks, l),
                              kp.shape)
        qc, kc, vc = chunks_of(q, l), chunks_of(k, l), chunks_of(v, l)
        offsets = range(-w, 1 if self.causal else w + 1)
        # The global keys leave the window: they come once, through their own stream.
        streams = [window_stream(qc, kc, vc, qp, jnp.where(kp < g, -1, kp), offsets,
                                 self.causal, **drop.stream(0))]
        if n_global:
            table = jnp.broadcast_to(jnp.arange(n_global), (n_blocks, n_global))
            streams.append(table_stream(qc, kc, vc, qp, kp, table, h, self.causal,
                                        **drop.stream(1)))
        if self.n_random_blocks:
            streams.append(table_stream(qc, kc, vc, qp, kp, self.random_blocks(n_blocks), h,
                                        self.causal, **drop.stream(2)))
        out = merge_streams(streams).reshape(b, h, length, -1)
        if g and not self.causal:  # the global queries see every key
            rows = dot_product_attention(q[:, :, :g], k, v, (k_pos >= 0)[:, None, None, :],
                                         **drop.dense(3))
            out = out.at[:, :, :g].set(rows.astype(out.dtype))
        return out


__all__ = ["BigBirdAttention"]
