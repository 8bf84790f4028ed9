"""The one softmax attention of the package: masks, a dense form and a blocked form.

Every attention layer builds on these pieces:

- `MASK_VALUE`: the score a masked key gets (finite, so that a query that may see no key at
  all gets a uniform average instead of NaN).
- `position_mask(q_pos, k_pos, causal, chunk_len, n_chunks_before, n_chunks_after)`: which
  keys each query may see, from their positions (padding: `k_pos < 0`; causal; a window of
  whole chunks).
- `dot_product_attention(q, k, v, mask)`: `softmax(q kᵀ / sqrt(d)) v` with a boolean mask,
  every score materialised and differentiated by JAX (full attention, cross attention).
- `blocked_attention(q, k, v, q_pos, k_pos, offsets=...)`: each chunk of queries on a window
  of chunks of keys, computed a cache-sized block of chunks at a time with its own gradient
  (local attention, LSH attention over the hash-sorted sequence).
- `blockwise_attention(q, k, v, key_mask, causal=..., block_len=...)`: exact full attention,
  each block of queries over the blocks of keys with a running max and normaliser and a
  recompute-in-backward gradient (the FlashAttention algorithm): `dot_product_attention`'s
  result without its length x length scores (`BlockwiseAttention`, and `SelfAttention` from
  `attention.BLOCKWISE_MIN_LEN` positions on).

Shapes of `blocked_attention`:

- `q, k: (n, n_chunks, c, d_qk)`, `v: (n, n_chunks, c, d_v)`: `n` independent sequences
  (batch x heads x hash rounds), each cut in `n_chunks` chunks of `c` positions.
- `q_pos, k_pos: (n, n_chunks, c)` int32: the position of each query and key; `k_pos < 0`
  marks a key that is never attended to (padding).
- Chunk `i` attends to chunks `i + o` for `o` in `offsets`: modulo `n_chunks` with `wrap=True`
  (LSH: the sorted sequence is a ring), else chunks outside `[0, n_chunks)` are masked
  (local attention: the sequence has two ends).
- `k`, `v` and `k_pos` may have more chunks than `q` (`n_k_chunks`): then chunk `i` attends to
  key chunks `(i + o) mod n_k_chunks` (`wrap=True`), e.g. a shard's own chunks with its
  neighbours' edge chunks around them (`ring.halo_attention`).
- Returns `out: (n, n_chunks, c, d_v)` and `lse: (n, n_chunks, c)`, float32.

Masking: a key with `k_pos < 0`, from a chunk outside the sequence (`wrap=False`), or (causal)
with `k_pos > q_pos` scores `MASK_VALUE`; with `self_value` set, a key at the query's own
position scores `self_value` (shared-QK attention).

Why a custom gradient: the scores are computed a block of chunks at a time, sized to stay in
cache (`chunks_per_block`), forward and backward; the backward recomputes each block's
probabilities from the saved log-sum-exp (as FlashAttention does) instead of differentiating
through the softmax, so nothing of size `c x window` outlives its block and each score is
exponentiated once per pass.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from terraformer.checks import check_int, check_rate
from terraformer.layers.core import dropout, fold_last_axis

MASK_VALUE = -1e9
# Scores (float32) per block: small enough that a block's scores stay in the CPU's cache.
BLOCK_SCORES = 1 << 19


def position_mask(q_pos, k_pos, causal: bool = False, chunk_len: int | None = None,
                  n_chunks_before: int = 0, n_chunks_after: int = 0):
    """Which keys each query may see, from their positions: bool `[..., n_q, n_k]`.

    `q_pos [..., n_q]`, `k_pos [..., n_k]` int. A key is hidden when `k_pos < 0` (padding),
    when `causal` and it comes after the query, and, with `chunk_len`, when its chunk
    (`pos // chunk_len`) is more than `n_chunks_before` before or `n_chunks_after` after the
    query's.
    """
    qp, kp = q_pos[..., :, None], k_pos[..., None, :]
    allowed = kp >= 0
    if causal:
        allowed &= kp <= qp
    if chunk_len is not None:
        q_chunk, k_chunk = qp // chunk_len, kp // chunk_len
        allowed &= k_chunk >= q_chunk - n_chunks_before
        allowed &= k_chunk <= q_chunk + n_chunks_after
    return allowed


def dot_product_attention(q, k, v, mask=None, dropout_rate=0.0, rng=None, mode="eval"):
    """softmax(q kᵀ / sqrt(d)) v with a boolean mask (True = may attend).

    Args:
      q: [..., n_q, d_qk]; k: [..., n_k, d_qk]; v: [..., n_k, d_v].
      mask: bool, broadcastable to [..., n_q, n_k], or None.
      dropout_rate, rng, mode: dropout on the attention weights (`train` mode only).
    Returns:
      [..., n_q, d_v] in v's dtype; scores and softmax in at least float32.
    """
    scores = jnp.einsum("...qd,...kd->...qk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    scores = scores.astype(jnp.promote_types(q.dtype, jnp.float32))
    if mask is not None:
        scores = jnp.where(mask, scores, MASK_VALUE)
    weights = jax.nn.softmax(scores, axis=-1)
    weights = dropout(weights, dropout_rate, rng, mode).astype(v.dtype)
    return jnp.einsum("...qk,...kd->...qd", weights, v)


def blocks_of(n_chunks: int, scores_per_chunk: int, chunks_per_block: int | None) -> int:
    """Chunks per block: a divisor of `n_chunks`, at most `chunks_per_block` (default: cache)."""
    target = chunks_per_block or max(1, BLOCK_SCORES // max(1, scores_per_chunk))
    target = max(1, min(int(target), n_chunks))
    return max(m for m in range(1, target + 1) if n_chunks % m == 0)


def blocked_attention(q, k, v, q_pos, k_pos, *, offsets, scale, causal=False, self_value=None,
                      wrap=True, dropout_rate=0.0, dropout_rng=None, chunks_per_block=None):
    """Each chunk of queries on a window of chunks of keys, block by block, with a
    recompute-in-backward gradient (see the module docstring for shapes and masking).

    `dropout_rate` applies whenever it is > 0 (the caller decides the mode) and needs
    `dropout_rng`; each block draws its own mask from it.
    """
    if dropout_rate > 0.0 and dropout_rng is None:
        raise ValueError("blocked_attention: dropout_rate > 0 needs a dropout_rng")
    if dropout_rng is None:
        dropout_rng = jax.random.PRNGKey(0)
    n, n_chunks, c, _ = q.shape
    block = blocks_of(n_chunks, n * c * len(offsets) * k.shape[2], chunks_per_block)
    config = _Config(tuple(int(o) for o in offsets), float(scale), bool(causal),
                     None if self_value is None else float(self_value), bool(wrap),
                     float(dropout_rate), block)
    return _blocked_attention(config, q, k, v, q_pos, k_pos, dropout_rng)


class _Config(NamedTuple):
    """Static (hashable) settings of one blocked attention."""

    offsets: tuple[int, ...]
    scale: float
    causal: bool
    self_value: float | None
    wrap: bool
    dropout_rate: float
    block: int


def _window_chunks(a, start, block, offsets):
    """Chunks `(start + j + o) mod n_chunks` of `a (n, n_chunks, ...)` for j < block, o in
    offsets -> `(n, block, len(offsets) * c, ...)`."""
    n_chunks = a.shape[1]
    index = (start + jnp.arange(block)[:, None] + jnp.asarray(offsets)[None, :]) % n_chunks
    w = jnp.take(a, index.reshape(-1), axis=1)  # (n, block * n_off, c, ...)
    return w.reshape(a.shape[0], block, len(offsets) * a.shape[2], *a.shape[3:])


def _scores(config, qb, kw, qp, kp):
    """Masked scores of a block and where they were replaced: `(n, m, c, W)` each."""
    s = jnp.einsum("nmqd,nmkd->nmqk", qb, kw, preferred_element_type=jnp.float32)
    return _mask(config, s * config.scale, qp[..., :, None], kp[..., None, :])


def _scores_t(config, qb, kw, qp, kp):
    """`_scores` transposed: `(n, m, W, c)` (keys x queries), for the backward pass."""
    s = jnp.einsum("nmkd,nmqd->nmkq", kw, qb, preferred_element_type=jnp.float32)
    return _mask(config, s * config.scale, qp[..., None, :], kp[..., :, None])


def _mask(config, s, qp, kp):
    """Scores with the masking rules applied, and where a score was replaced by a constant;
    `qp`, `kp` are the query and key positions broadcastable to `s`."""
    masked = kp < 0
    if config.causal:
        masked = masked | (kp > qp)
    replaced = masked
    if config.self_value is not None:
        is_self = kp == qp
        s = jnp.where(is_self, config.self_value, s)
        replaced = replaced | is_self
    return jnp.where(masked, MASK_VALUE, s), replaced


def _keep(config, rng, start, shape):
    """The dropout mask of the block starting at chunk `start`, scaled by 1 / (1 - rate)."""
    keep = jax.random.bernoulli(jax.random.fold_in(rng, start), 1.0 - config.dropout_rate, shape)
    return keep.astype(jnp.float32) / (1.0 - config.dropout_rate)


def _block_inputs(config, q, k, v, q_pos, k_pos, start):
    m = config.block
    qb = lax.dynamic_slice_in_dim(q, start, m, axis=1)
    qp = lax.dynamic_slice_in_dim(q_pos, start, m, axis=1)
    kw = _window_chunks(k, start, m, config.offsets)
    vw = _window_chunks(v, start, m, config.offsets)
    kp = _window_chunks(k_pos, start, m, config.offsets)
    if not config.wrap:  # keys of chunks outside the sequence: as padding
        n_chunks, c = q.shape[1], q.shape[2]
        chunk = start + jnp.arange(m)[:, None] + jnp.asarray(config.offsets)[None, :]
        inside = jnp.repeat((chunk >= 0) & (chunk < n_chunks), c, axis=1)  # (m, n_off * c)
        kp = jnp.where(inside[None], kp, -1)
    return qb, kw, vw, qp, kp


def _forward(config, q, k, v, q_pos, k_pos, rng):
    n, n_chunks, c, _ = q.shape
    m = config.block
    out = jnp.zeros((n, n_chunks, c, v.shape[-1]), jnp.float32)
    lse = jnp.zeros((n, n_chunks, c), jnp.float32)

    def body(b, carry):
        out, lse = carry
        start = b * m
        qb, kw, vw, qp, kp = _block_inputs(config, q, k, v, q_pos, k_pos, start)
        s, _ = _scores(config, qb, kw, qp, kp)
        top = fold_last_axis(s, jnp.maximum, jnp.max)[..., None]
        e = jnp.exp(s - top)
        total = fold_last_axis(e, jnp.add, jnp.sum)
        if config.dropout_rate > 0.0:
            e = e * _keep(config, rng, start, e.shape)
        o = jnp.einsum("nmqk,nmkd->nmqd", e, vw.astype(jnp.float32)) / total[..., None]
        block_lse = top[..., 0] + jnp.log(total)
        out = lax.dynamic_update_slice_in_dim(out, o, start, axis=1)
        lse = lax.dynamic_update_slice_in_dim(lse, block_lse, start, axis=1)
        return out, lse

    return lax.fori_loop(0, n_chunks // m, body, (out, lse))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _blocked_attention(config, q, k, v, q_pos, k_pos, rng):
    return _forward(config, q, k, v, q_pos, k_pos, rng)


def _blocked_attention_fwd(config, q, k, v, q_pos, k_pos, rng):
    out, lse = _forward(config, q, k, v, q_pos, k_pos, rng)
    return (out, lse), (q, k, v, q_pos, k_pos, rng, out, lse)


def _blocked_attention_bwd(config, residuals, cotangents):
    q, k, v, q_pos, k_pos, rng, out, lse = residuals
    d_out, d_lse = cotangents
    n, n_chunks, c, _ = q.shape
    m, offsets = config.block, config.offsets
    before, after = max(0, -min(offsets)), max(0, max(offsets))
    # dk, dv are accumulated in buffers with `before` extra chunks in front and `after` at the
    # back, so that every block adds its window's contribution as one contiguous slice; the
    # extra chunks are folded onto the chunks they wrap around to at the end.
    padded = before + n_chunks + after
    dq = jnp.zeros(q.shape, jnp.float32)
    dk = jnp.zeros((n, padded, c, k.shape[-1]), jnp.float32)
    dv = jnp.zeros((n, padded, c, v.shape[-1]), jnp.float32)
    delta = jnp.sum(d_out * out, axis=-1) if config.dropout_rate == 0.0 else None

    def body(b, carry):
        dq, dk, dv = carry
        start = b * m
        qb, kw, vw, qp, kp = _block_inputs(config, q, k, v, q_pos, k_pos, start)
        # Transposed scores (keys x queries): three of the five products below then contract
        # over the last axis of both operands, the layout XLA's CPU dot handles best.
        s_t, replaced_t = _scores_t(config, qb, kw, qp, kp)
        lse_b = lax.dynamic_slice_in_dim(lse, start, m, axis=1)
        p_t = jnp.exp(s_t - lse_b[..., None, :])
        # A query that sees no key at all has every score at MASK_VALUE and a uniform softmax,
        # which exp(s - lse) cannot give back: lse rounds to MASK_VALUE in float32.
        p_t = jnp.where(lse_b[..., None, :] < MASK_VALUE / 2, 1.0 / s_t.shape[-2], p_t)
        do = lax.dynamic_slice_in_dim(d_out, start, m, axis=1)
        dl = lax.dynamic_slice_in_dim(d_lse, start, m, axis=1)
        dp_t = jnp.einsum("nmkd,nmqd->nmkq", vw.astype(jnp.float32), do)
        do_t = jnp.swapaxes(do, -1, -2)
        if config.dropout_rate > 0.0:
            keep_t = jnp.swapaxes(_keep(config, rng, start, p_t.shape[:2] + p_t.shape[:1:-1]),
                                  -1, -2)
            dvw = jnp.einsum("nmkq,nmdq->nmkd", p_t * keep_t, do_t)
            dp_t = dp_t * keep_t
            row = jnp.sum(p_t * dp_t, axis=-2)
        else:
            dvw = jnp.einsum("nmkq,nmdq->nmkd", p_t, do_t)
            row = lax.dynamic_slice_in_dim(delta, start, m, axis=1)
        ds_t = p_t * (dp_t - row[..., None, :] + dl[..., None, :])
        ds_t = jnp.where(replaced_t, 0.0, ds_t) * config.scale
        dkw = jnp.einsum("nmkq,nmdq->nmkd", ds_t, jnp.swapaxes(qb.astype(jnp.float32), -1, -2))
        # dq from ds (queries x keys): XLA:CPU contracts ds_t over its first axis slowly.
        dqb = jnp.einsum("nmqk,nmkd->nmqd", jnp.swapaxes(ds_t, -1, -2), kw.astype(jnp.float32))
        dq = lax.dynamic_update_slice_in_dim(dq, dqb, start, axis=1)
        for i, o in enumerate(offsets):
            at = start + before + o
            piece = slice(i * c, (i + 1) * c)
            dk = _add_slice(dk, dkw[:, :, piece], at)
            dv = _add_slice(dv, dvw[:, :, piece], at)
        return dq, dk, dv

    dq, dk, dv = lax.fori_loop(0, n_chunks // m, body, (dq, dk, dv))
    dk, dv = (_fold_wrapped(a, before, k.shape[1]) for a in (dk, dv))
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None)


def _add_slice(buffer, update, start):
    """`buffer[:, start:start + m] += update` for `update (n, m, ...)`."""
    current = lax.dynamic_slice_in_dim(buffer, start, update.shape[1], axis=1)
    return lax.dynamic_update_slice_in_dim(buffer, current + update, start, axis=1)


def _fold_wrapped(buffer, before, n_chunks):
    """Adds the extra front/back chunks of a padded gradient buffer onto the chunks they wrap
    around to: `(n, before + n_q_chunks + after, ...) -> (n, n_chunks, ...)`, `n_chunks` the
    keys' chunks (at most `n_q_chunks + after`)."""
    out = buffer[:, before:before + n_chunks]
    for t in range(buffer.shape[1]):
        if before <= t < before + n_chunks:
            continue
        target = (t - before) % n_chunks
        out = out.at[:, target].add(buffer[:, t])
    return out


_blocked_attention.defvjp(_blocked_attention_fwd, _blocked_attention_bwd)


# -- exact attention over key/value blocks (the FlashAttention algorithm) -------------------------

BLOCKWISE_BLOCK_LEN = 512  # default query and key positions per block of `blockwise_attention`
_FUSED_DTYPES = ("bfloat16", "float16")  # what the cuDNN fused kernel takes


def blockwise_attention(q, k, v, key_mask=None, *, causal=False,
                        block_len: int = BLOCKWISE_BLOCK_LEN, dropout_rate=0.0, dropout_rng=None):
    """Exact softmax attention, `dot_product_attention`'s result, a block of keys at a time.

    Args:
      q: [..., n_q, d_qk]; k: [..., n_k, d_qk]; v: [..., n_k, d_v] (same leading axes).
      key_mask: bool broadcastable to [..., n_k] (True = may be attended to), or None.
      causal: query i sees keys j <= i (needs n_q == n_k).
      block_len: query and key positions per block (at most the length); lengths that are not
        a multiple are padded inside and the padding never attended to.
      dropout_rate, dropout_rng: dropout on the attention weights whenever the rate is > 0
        (the caller decides the mode); each pair of blocks draws its own mask.
    Returns:
      [..., n_q, d_v] in v's dtype.

    Each block of queries runs over the blocks of keys with a running max and normaliser
    (causal: only the blocks up to its own); the backward pass recomputes each block's
    probabilities from the saved log-sum-exp. Memory is the inputs and outputs plus one block
    of scores: O(length * d + block_len²) per sequence, never n_q x n_k. A query that may see
    no key gets the mean of all values, as in `dot_product_attention` (without dropout). On a
    GPU, half-precision inputs without dropout go to the fused cuDNN kernel instead.
    """
    who = "blockwise_attention"
    block_len = check_int("block_len", block_len, 1, who)
    dropout_rate = check_rate("dropout_rate", dropout_rate, who)
    if q.ndim < 2 or k.ndim != q.ndim or v.ndim != q.ndim:
        raise ValueError(f"{who}: q, k, v must have the same rank >= 2, got shapes "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    lead, n_q, n_k = q.shape[:-2], q.shape[-2], k.shape[-2]
    if k.shape[:-2] != lead or v.shape[:-1] != k.shape[:-1] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"{who}: expected q [..., n_q, d_qk], k [..., n_k, d_qk], "
                         f"v [..., n_k, d_v], got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if causal and n_q != n_k:
        raise ValueError(f"{who}: causal attention needs as many queries as keys, got "
                         f"n_q={n_q}, n_k={n_k}")
    if dropout_rate > 0.0 and dropout_rng is None:
        raise ValueError(f"{who}: dropout_rate > 0 needs a dropout_rng")
    if key_mask is not None:
        key_mask = jnp.broadcast_to(jnp.asarray(key_mask, bool), lead + (n_k,))
    if _fused_kernel_applies(q, k, v, dropout_rate):
        return _fused_attention(q, k, v, key_mask, causal)
    n = math.prod(lead)
    bq, bk = min(block_len, n_q), min(block_len, n_k)
    k_pos = jnp.arange(n_k, dtype=jnp.int32)
    k_pos = (jnp.broadcast_to(k_pos, (n, n_k)) if key_mask is None
             else jnp.where(key_mask.reshape(n, n_k), k_pos, -1))
    q4 = _in_blocks(q.reshape(n, n_q, -1), bq, 0)
    k4 = _in_blocks(k.reshape(n, n_k, -1), bk, 0)
    v4 = _in_blocks(v.reshape(n, n_k, -1), bk, 0)
    kp4 = _in_blocks(k_pos, bk, -1)
    config = _BlockwiseConfig(1.0 / math.sqrt(q.shape[-1]), bool(causal), None,
                              float(dropout_rate))
    rng = jax.random.PRNGKey(0) if dropout_rng is None else dropout_rng
    out, lse = _blockwise(config, q4, k4, v4, kp4, rng)
    out = out.reshape(n, -1, v.shape[-1])[:, :n_q]
    # A query that sees no key: every score it met was MASK_VALUE, and it met only the blocks
    # it visited; the dense form averages all n_k values.
    empty = lse.reshape(n, -1)[:, :n_q, None] < MASK_VALUE / 2
    mean_v = jnp.mean(v.reshape(n, n_k, -1).astype(jnp.float32), axis=1, keepdims=True)
    out = jnp.where(empty, mean_v, out)
    return out.reshape(*lead, n_q, v.shape[-1]).astype(v.dtype)


class _BlockwiseConfig(NamedTuple):
    """Static settings of one blockwise attention (the fields `_mask` and `_keep` read)."""

    scale: float
    causal: bool
    self_value: float | None
    dropout_rate: float


def _in_blocks(a, block: int, fill):
    """`a (n, length, ...)` padded with `fill` to a multiple of `block` ->
    `(n, n_blocks, block, ...)`."""
    pad = -a.shape[1] % block
    if pad:
        a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2), constant_values=fill)
    return a.reshape(a.shape[0], a.shape[1] // block, block, *a.shape[2:])


def _fused_kernel_applies(q, k, v, dropout_rate) -> bool:
    """Whether the backend's fused attention takes these inputs: cuDNN on a GPU, [batch,
    heads, length, d] in half precision, equal query/value widths (a multiple of 8, at most
    128), no dropout."""
    return (jax.default_backend() == "gpu" and q.ndim == 4 and dropout_rate == 0.0
            and q.dtype.name in _FUSED_DTYPES and k.dtype == q.dtype and v.dtype == q.dtype
            and q.shape[-1] == v.shape[-1] and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128)


def _fused_attention(q, k, v, key_mask, causal):
    """The fused cuDNN kernel on [batch, heads, length, d] (it takes [batch, length, heads, d])."""
    mask = None if key_mask is None else key_mask[:, :, None, :]
    out = jax.nn.dot_product_attention(
        *(jnp.swapaxes(a, 1, 2) for a in (q, k, v)), mask=mask, is_causal=causal,
        implementation="cudnn")
    return jnp.swapaxes(out, 1, 2)


def _causal_key_blocks(i, bq: int, bk: int, n_kb: int):
    """How many key blocks the queries of block `i` may see: those starting at or before its
    last query."""
    return jnp.minimum(((i + 1) * bq - 1) // bk + 1, n_kb)


def _blockwise_scores(config, qb, kb, q_pos, k_pos):
    """Masked scores (n, bq, bk) of a query block on a key block, and where they were masked."""
    s = jnp.einsum("nqd,nkd->nqk", qb, kb, preferred_element_type=jnp.float32)
    return _mask(config, s * config.scale, q_pos[None, :, None], k_pos[:, None, :])


def _blockwise_forward(config, q, k, v, k_pos, rng):
    n, n_qb, bq, _ = q.shape
    n_kb, bk, d_v = k.shape[1], k.shape[2], v.shape[-1]

    def query_block(i, carry):
        out, lse = carry
        qb = lax.dynamic_index_in_dim(q, i, 1, keepdims=False)
        q_pos = i * bq + jnp.arange(bq)

        def key_block(j, acc):
            top, total, o = acc
            kb, vb, kp = (lax.dynamic_index_in_dim(a, j, 1, keepdims=False) for a in (k, v, k_pos))
            s, _ = _blockwise_scores(config, qb, kb, q_pos, kp)
            new_top = jnp.maximum(top, fold_last_axis(s, jnp.maximum, jnp.max))
            e = jnp.exp(s - new_top[..., None])
            correction = jnp.exp(top - new_top)
            total = total * correction + fold_last_axis(e, jnp.add, jnp.sum)
            if config.dropout_rate > 0.0:
                e = e * _keep(config, rng, i * n_kb + j, e.shape)
            o = o * correction[..., None] + jnp.einsum("nqk,nkd->nqd", e, vb.astype(jnp.float32))
            return new_top, total, o

        count = _causal_key_blocks(i, bq, bk, n_kb) if config.causal else n_kb
        init = (jnp.full((n, bq), -jnp.inf, jnp.float32), jnp.zeros((n, bq), jnp.float32),
                jnp.zeros((n, bq, d_v), jnp.float32))
        top, total, o = lax.fori_loop(0, count, key_block, init)
        out = lax.dynamic_update_index_in_dim(out, o / total[..., None], i, 1)
        lse = lax.dynamic_update_index_in_dim(lse, top + jnp.log(total), i, 1)
        return out, lse

    out = jnp.zeros((n, n_qb, bq, d_v), jnp.float32)
    lse = jnp.zeros((n, n_qb, bq), jnp.float32)
    return lax.fori_loop(0, n_qb, query_block, (out, lse))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _blockwise(config, q, k, v, k_pos, rng):
    return _blockwise_forward(config, q, k, v, k_pos, rng)


def _blockwise_fwd(config, q, k, v, k_pos, rng):
    out, lse = _blockwise_forward(config, q, k, v, k_pos, rng)
    return (out, lse), (q, k, v, k_pos, rng, out, lse)


def _blockwise_bwd(config, residuals, cotangents):
    q, k, v, k_pos, rng, out, lse = residuals
    d_out, d_lse = cotangents
    n, n_qb, bq, _ = q.shape
    n_kb, bk = k.shape[1], k.shape[2]
    # With or without dropout, sum_k p_qk * dp_qk (dp: the gradient of the kept weights) is
    # d_out . out for each query: the softmax backward needs no second pass over the keys.
    delta = jnp.sum(d_out * out, axis=-1)

    def key_block(j, carry):
        dq, dk, dv = carry
        kb, vb, kp = (lax.dynamic_index_in_dim(a, j, 1, keepdims=False) for a in (k, v, k_pos))
        kb32, vb32 = kb.astype(jnp.float32), vb.astype(jnp.float32)

        def query_block(i, acc):
            dq, dkb, dvb = acc
            qb, do, lse_b, delta_b, dl_b = (lax.dynamic_index_in_dim(a, i, 1, keepdims=False)
                                            for a in (q, d_out, lse, delta, d_lse))
            q_pos = i * bq + jnp.arange(bq)
            s, replaced = _blockwise_scores(config, qb, kb, q_pos, kp)
            p = jnp.exp(s - lse_b[..., None])
            dp = jnp.einsum("nqd,nkd->nqk", do, vb32)
            if config.dropout_rate > 0.0:
                keep = _keep(config, rng, i * n_kb + j, p.shape)
                dvb = dvb + jnp.einsum("nqk,nqd->nkd", p * keep, do)
                dp = dp * keep
            else:
                dvb = dvb + jnp.einsum("nqk,nqd->nkd", p, do)
            ds = p * (dp - delta_b[..., None] + dl_b[..., None])
            ds = jnp.where(replaced, 0.0, ds) * config.scale
            dkb = dkb + jnp.einsum("nqk,nqd->nkd", ds, qb.astype(jnp.float32))
            dqb = jnp.einsum("nqk,nkd->nqd", ds, kb32)
            dq = _add_slice(dq, dqb[:, None], i)
            return dq, dkb, dvb

        first = (j * bk) // bq if config.causal else 0
        init = (dq, jnp.zeros(kb.shape, jnp.float32), jnp.zeros(vb.shape, jnp.float32))
        dq, dkb, dvb = lax.fori_loop(first, n_qb, query_block, init)
        dk = lax.dynamic_update_index_in_dim(dk, dkb, j, 1)
        dv = lax.dynamic_update_index_in_dim(dv, dvb, j, 1)
        return dq, dk, dv

    init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32),
            jnp.zeros(v.shape, jnp.float32))
    dq, dk, dv = lax.fori_loop(0, n_kb, key_block, init)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)
