"""The decoding cache: keys and values of past positions, kept in a ring, for every predict mode.

A predict-mode attention layer keeps its keys and values in `state` as ring buffers laid out
`[batch, n_heads, ring, d]`, so that a query's dot with the cache is a plain batched product.
Position `p` lives in slot `p % ring`; shapes never change between decoding steps. A ring of 8
slots in 2 blocks of 4, after positions 0..10 were written:

    slot       0   1   2   3 |  4   5   6   7
    position   8   9  10   3 |  4   5   6   7
                       ^ newest (hi = 10)
    key_positions(hi=10, slot0=0, length=4, ring=8) = [8, 9, 10, 3]

A query at position 10 that may see keys from `lo = 5` on visits the blocks from the newest
backwards, block 0 (slots 0..3) then block 1 (slots 4..7), and stops after the block holding
`lo`: `ring_attention` combines the blocks with a running (online) softmax, so a step costs
what the window holds, not the whole buffer. The masks (`window_mask`) hide the stale slot 3
(position 3 < lo) and anything after the query.

- `ring_layout(mem_len)`: `(ring, block_len)` for a cache that must hold `mem_len` positions.
  Up to `2 * PREDICT_BLOCK_LEN` positions the ring is one block of exactly `mem_len` slots,
  read whole, in place, by every step. Beyond, blocks of `PREDICT_BLOCK_LEN` with `mem_len`
  rounded up: a step visits only those in use, each copied out of the cache first (XLA slices
  a block before a product), so a slot read in place costs less than one copied out.
- `new_ring(...)`, `ring_write(cache, new, start, axis)`: an empty ring, and the write of new
  positions (one token: `dynamic_update_slice`, in place in a compiled loop; several: a
  scatter, since they may wrap around the end of the ring).
- `key_positions`, `window_mask`: the position of each slot of a block, and which of them a
  query may see (causal, a window of chunks, the last `mem_len` positions).
- `ring_attention(...)`: new queries over the cache, visiting only the blocks in use; one
  decoding query reads the whole ring in place once those blocks cover half of it (cheaper
  than the copies XLA makes of the blocks it visits).
- `cached_attention(...)`: write, then attend (or, for one token, attend, then write: see
  there).
- `write_at(buffer, new, start, axis)`: the write of a linear (non-ring) buffer, as the LSH
  layer's cache uses (its positions are shifted out in blocks, not overwritten in a ring).

Attention from the cache equals the full forward pass as long as every key a query may look
at is still in the ring: always for local attention when `mem_len >= (n_chunks_before + 1) *
chunk_len + tokens per call`, and for full attention while the total length fits in
`mem_len`; beyond that it is a sliding window over the last `mem_len` positions (query q sees
keys q - mem_len < p <= q), so feeding tokens one at a time or in chunks gives the same
outputs while a chunk is at most ring - mem_len + 1 tokens (token by token always).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from terraformer.layers.attention_core import MASK_VALUE, position_mask

PREDICT_BLOCK_LEN = 256  # key positions per block of a predict cache
DECODING_BLOCK_KEYS = 4096  # most key positions one query visits per block of the ring
WHOLE_RING_MAX_SLOTS = 1 << 18  # largest ring one query may read whole (scores: 1 MiB a head)


def ring_layout(mem_len: int) -> tuple[int, int]:
    """(ring slots, block length) of a predict cache that must hold `mem_len` positions.

    Up to 2 * PREDICT_BLOCK_LEN positions: one block of exactly mem_len slots, which each
    decoding step reads whole, in place. Beyond: blocks of PREDICT_BLOCK_LEN, mem_len rounded
    up, of which a step visits only those in use.
    """
    block_len = PREDICT_BLOCK_LEN
    if mem_len <= 2 * block_len:
        return mem_len, mem_len
    return -(-mem_len // block_len) * block_len, block_len


def new_ring(batch: int, n_heads: int, mem_len: int, d: int, dtype):
    """An empty ring `[batch, n_heads, ring, d]` (zeros) for `mem_len` positions."""
    ring, _ = ring_layout(mem_len)
    return jnp.zeros((batch, n_heads, ring, d), dtype)


def ring_write(cache, new, start, axis: int):
    """`cache` with `new` written at ring slots (start + i) % ring_len along `axis`.

    One token is a `dynamic_update_slice` (in place in a compiled loop); several are a
    scatter, since they may wrap around the end of the ring.
    """
    n, ring = new.shape[axis], cache.shape[axis]
    new = new.astype(cache.dtype)
    if n == 1:
        return lax.dynamic_update_slice_in_dim(cache, new, start % ring, axis)
    slots = (start + jnp.arange(n)) % ring
    index = (slice(None),) * axis + (slots,)
    return cache.at[index].set(new)


def write_at(buffer, new, start, axis: int):
    """`buffer` with `new` written at positions start .. start + n - 1 along `axis` of a
    linear buffer (a start past the end is clamped, as `dynamic_update_slice` does)."""
    return lax.dynamic_update_slice_in_dim(buffer, new.astype(buffer.dtype), start, axis)


def key_positions(hi, slot0, length: int, ring: int):
    """The position held by each of the slots slot0 .. slot0 + length - 1 of a ring whose
    newest position is `hi`: int32 `[length]` (negative for slots never written)."""
    return hi - (hi - slot0 - jnp.arange(length)) % ring


def window_mask(q_pos, k_pos, mem_len: int | None = None, chunk_len: int | None = None,
                n_chunks_before: int = 0):
    """Which cached keys each new query may see: bool `[n_q, n_k]`.

    Causal; with `chunk_len`, only keys of the query's chunk and the `n_chunks_before` before
    it; with `mem_len`, only the last `mem_len` positions (q - mem_len < p <= q). Slots never
    written have `k_pos < 0` and are hidden.
    """
    allowed = position_mask(q_pos, k_pos, True, chunk_len, n_chunks_before, 0)
    if mem_len is not None:
        allowed &= k_pos[None, :] > q_pos[:, None] - mem_len
    return allowed


def cached_attention(q, q_pos, k, v, k_cache, v_cache, key_mask, lo, block_len: int):
    """Writes new keys/values into ring caches and attends over them: (out, k_cache, v_cache).

    q, k, v: [batch, n_heads, n, d] at positions q_pos [n]; caches and `key_mask` as in
    `ring_attention` (the mask sees the slots after the write). One token (decoding) attends
    over the caches as they were plus itself, and only then is written: a computation that
    reads a cache after updating it makes XLA copy the whole cache (twice) every step, where
    reading first lets the update happen in place.
    """
    one_token = q.shape[2] == 1
    if one_token:
        out = ring_attention(q, q_pos, k_cache, v_cache, key_mask, lo,
                             decoding_block_len(k_cache.shape[2], block_len), new_kv=(k, v))
    k_cache = ring_write(k_cache, k, q_pos[0], axis=2)
    v_cache = ring_write(v_cache, v, q_pos[0], axis=2)
    if not one_token:
        out = ring_attention(q, q_pos, k_cache, v_cache, key_mask, lo, block_len)
    return out, k_cache, v_cache


def decoding_block_len(ring: int, block_len: int) -> int:
    """The largest multiple of block_len that divides the ring and is at most
    DECODING_BLOCK_KEYS and a quarter of the ring (at least block_len).

    One query's scores per block are small, so fewer, larger blocks cost less per step than
    many loop iterations over small ones; but a step reads every slot of each block it
    visits, so blocks of a whole ring would read its unwritten slots too (a 2,048-slot ring
    holding 200 positions would read 2,048 keys a token).
    """
    n_blocks = ring // block_len
    cap = min(DECODING_BLOCK_KEYS, ring // 4) // block_len
    best = 1
    for m in range(1, max(1, cap) + 1):
        if n_blocks % m == 0:
            best = m
    return best * block_len


def ring_attention(q, q_pos, k_cache, v_cache, key_mask, lo, block_len: int, new_kv=None):
    """Attention of new queries over a ring-buffer cache, visiting only the blocks in use.

    Args:
      q: [batch, n_heads, n, d_qk] at consecutive positions q_pos [n] (int32).
      k_cache, v_cache: [batch, n_heads, ring, d] with ring a multiple of block_len; slot s
        holds the latest position p <= q_pos[-1] with p % ring == s (written before calling,
        unless `new_kv` is given).
      key_mask: (k_pos [block_len], first slot, block_len) -> bool mask broadcastable to
        [batch, n_heads, n, block_len] (True = may attend); k_pos < 0 marks unwritten slots.
      lo: the smallest key position any query may see (int32 scalar).
      new_kv: for one query (n = 1), its own key and value [batch, n_heads, 1, d] when the
        caches do not hold them yet: its slot's stale entry is skipped and the new key is
        attended to directly (masked by `key_mask` at its position and slot).
    Returns:
      [batch, n_heads, n, d_v]. Cost grows with the blocks between lo and q_pos[-1], not with
      the ring: blocks are combined with a running (online) softmax. One query (decoding)
      whose blocks cover at least half the ring reads the whole ring instead, in place
      (rings of at most WHOLE_RING_MAX_SLOTS).
    """
    ring = k_cache.shape[2]
    n_blocks = ring // block_len
    hi = q_pos[-1]
    scale = 1.0 / jnp.sqrt(jnp.asarray(q.shape[-1], jnp.float32))

    def scores_of(kb, allowed):
        scores = jnp.einsum("...qd,...kd->...qk", q, kb.astype(q.dtype)).astype(jnp.float32)
        return jnp.where(allowed, scores * scale, MASK_VALUE)

    def fold(carry, scores, vb):
        m, total, acc = carry
        m_new = jnp.maximum(m, scores.max(-1))
        p = jnp.exp(scores - m_new[..., None])
        correction = jnp.exp(m - m_new)
        total = total * correction + p.sum(-1)
        acc = acc * correction[..., None] + jnp.einsum("...qk,...kd->...qd", p,
                                                       vb.astype(jnp.float32))
        return m_new, total, acc

    def visit(carry, slot0, length: int):
        """The running softmax after slots slot0 .. slot0 + length - 1 (the whole ring,
        read in place, when length == ring)."""
        k_pos = key_positions(hi, slot0, length, ring)
        kb = lax.dynamic_slice_in_dim(k_cache, slot0, length, axis=2)
        vb = lax.dynamic_slice_in_dim(v_cache, slot0, length, axis=2)
        allowed = key_mask(k_pos, slot0, length)
        if new_kv is not None:
            stale = k_pos == hi  # the slot the new key will take
            allowed = allowed & ~lax.broadcast_to_rank(stale, allowed.ndim)
        return fold(carry, scores_of(kb, allowed), vb)

    def body(j, carry):
        return visit(carry, ((hi // block_len - j) % n_blocks) * block_len, block_len)

    def finish(carry):
        _, total, acc = carry
        return (acc / total[..., None]).astype(q.dtype)

    shape = q.shape[:-1]
    if new_kv is None:
        carry = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
                 jnp.zeros(shape + (v_cache.shape[-1],), jnp.float32))
    else:  # the running softmax after the new key alone: max = its score, weight 1
        k_new, v_new = new_kv
        score = scores_of(k_new, key_mask(hi[None], hi % ring, 1))[..., 0]
        carry = (jnp.broadcast_to(score, shape), jnp.ones(shape, jnp.float32),
                 jnp.broadcast_to(v_new.astype(jnp.float32), shape + (v_cache.shape[-1],)))
    if n_blocks == 1:
        return finish(body(0, carry))
    count = jnp.minimum(hi // block_len - lo // block_len + 1, n_blocks)

    def visit_blocks(carry):
        return lax.fori_loop(0, count, body, carry)

    def whole_ring(carry):
        return visit(carry, 0, ring)

    if new_kv is None or ring > WHOLE_RING_MAX_SLOTS:
        return finish(visit_blocks(carry))
    # One query, once the blocks in use cover half the ring: the whole ring read in place
    # costs less than those blocks, each copied out of the cache before the products.
    return finish(lax.cond(2 * count * block_len >= ring, whole_ring, visit_blocks, carry))
