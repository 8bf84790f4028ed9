"""Sparse Sinkhorn attention (Tay et al. 2020): learned sorting of blocks.

The sequence is cut in N blocks of `block_len`. Per head, a sorting network scores every
block against every block, `R = relu(summary of the block's keys @ w_sort)` (`w_sort: d_qk x
n_max_blocks`, the first N columns used), and Sinkhorn normalisation (`n_sinkhorn_iters`
alternating row and column normalisations in the log domain of `R / temperature`) turns it
into a block-to-block matrix S (a relaxed permutation). The sorted keys and values of block i
are `sum_j S_ij * (keys, values of block j)`, and every query of block i attends to the keys
of its own block and of its sorted block (2 * block_len keys), one softmax over both.

Non-causal: the summary is the mean of the block's keys and S is doubly stochastic (columns
sum to one exactly, rows as the iterations converge). No padding mask: a sorted block mixes
the keys of whole blocks, so a padded token cannot be hidden inside a mixture; the length
must be a multiple of block_len.

Causal (the paper's causal Sinkhorn balancing, made strictly causal):

- the sort key of block i is the running mean of the keys up to the block's first position
  (the cumulative summary: nothing after the block's first token, which every query of the
  block may see);
- block i may only be sorted to earlier blocks, j < i (S is strictly lower triangular: a
  mixture of block i itself would show a query the keys after it); block 0 has no sorted
  block;
- the normalisation only ever sums over the past. A row is normalised over its allowed
  entries; a column over the rows *up to the current one* (`lax.cumlogsumexp` down the
  column, at each iteration). Row i of S then depends on rows 0..i of R alone, and R's row i
  on the keys up to block i's first position: no output depends on a later token. (A column
  normalised over all rows, as in the non-causal form, would carry the later blocks' scores
  into an early block's sort.) This is also what decoding computes row by row: the predict
  state keeps, per iteration, each column's running log-sum-exp.

Lengths that are not a multiple of block_len are padded at the end when causal (the padding
comes after every real token, so nothing real sees it).

Attention dropout (train mode): on the one softmax over both blocks, each of the two streams
dropping with a key of its own (see `block_sparse.AttentionDropout`).

Computed as two streams of `attention_core.blocked_attention` (own block, sorted block), merged
by log-sum-exp (`block_sparse.merge_streams`).

Complexity per head, L = length, b = block_len, N = L / b: time O(L b d + N^2 d + L N d)
(the attention, the sorting network and normalisation, the mixing of blocks), memory
O(L d + N^2) plus a cache-sized block of scores. Causal decoding: yes. The predict cache holds
`max_length` positions (every past block may be sorted to); a step costs O(b d) for the
attention, plus O(N_max (b d + n_iters)) when a block starts (its sort and its mixture).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from terraformer.checks import ArgumentError, check_int, check_number, check_rate
from terraformer.layers import initializers as init_lib
from terraformer.layers.attention import merge_heads, split_heads
from terraformer.layers.attention_core import MASK_VALUE
from terraformer.layers.base import EMPTY, Layer, check_mode
from terraformer.layers.core import check_feature_dim, dropout, matmul
from terraformer.layers.efficient.block_sparse import (
    attention_dropout_of,
    chunks_of,
    merge_streams,
    window_stream,
)

# The log of a forbidden entry of the sorting matrix: exp() of it is 0, and it stays finite so
# that a row or column with nothing allowed yet gives no NaN (it is masked again after use).
_FORBIDDEN = -1e30


def sinkhorn(log_alpha, n_iters: int):
    """Sinkhorn normalisation in the log domain: rows, then columns, `n_iters` times.

    log_alpha: `(..., N, N)`. Returns the doubly stochastic `exp(...)` (columns sum to one
    exactly, rows to one as the iterations converge).
    """
    for _ in range(n_iters):
        log_alpha = log_alpha - jax.nn.logsumexp(log_alpha, axis=-1, keepdims=True)
        log_alpha = log_alpha - jax.nn.logsumexp(log_alpha, axis=-2, keepdims=True)
    return jnp.exp(log_alpha)


def causal_sinkhorn(log_alpha, n_iters: int):
    """Causal Sinkhorn normalisation: entries j < i only; rows over their entries, columns
    over the rows up to the current one (see the module docstring).

    log_alpha: `(..., N, N)`. Returns `(..., N, N)`, strictly lower triangular; row i depends
    on rows 0..i of `log_alpha` only.
    """
    n = log_alpha.shape[-1]
    allowed = jnp.broadcast_to(jnp.tril(jnp.ones((n, n), bool), -1), log_alpha.shape)
    x = jnp.where(allowed, log_alpha, _FORBIDDEN)
    for _ in range(n_iters):
        x = jnp.where(allowed, x - jax.nn.logsumexp(x, axis=-1, keepdims=True), _FORBIDDEN)
        x = jnp.where(allowed, x - lax.cumlogsumexp(x, axis=x.ndim - 2), _FORBIDDEN)
    return jnp.where(allowed, jnp.exp(x), 0.0)


def causal_sinkhorn_row(scores, row, column_lse, n_iters: int):
    """Row `row` of `causal_sinkhorn`, given the rows before it as running column sums.

    scores: `(..., N)`, row `row` of `log_alpha`; column_lse: `(..., n_iters, N)`, per
    iteration the log-sum-exp down each column of the rows before (`_FORBIDDEN` for none).
    Returns `(the row (..., N), column_lse with this row added)`.
    """
    allowed = jnp.broadcast_to(jnp.arange(scores.shape[-1]) < row, scores.shape)
    x = jnp.where(allowed, scores, _FORBIDDEN)
    sums = []
    for t in range(n_iters):
        x = jnp.where(allowed, x - jax.nn.logsumexp(x, axis=-1, keepdims=True), _FORBIDDEN)
        total = jnp.logaddexp(column_lse[..., t, :], x)
        sums.append(total)
        x = jnp.where(allowed, x - total, _FORBIDDEN)
    return jnp.where(allowed, jnp.exp(x), 0.0), jnp.stack(sums, axis=-2)


class SinkhornAttention(Layer):
    """Sparse Sinkhorn self-attention, `(batch, length, d_model) -> same`.

    Args:
      n_heads, d_qk, d_v: heads and their widths.
      causal: the causal form (see the module docstring); needed for predict mode.
      output_dropout: dropout on the output (train mode).
      mode: 'train', 'eval' or 'predict' (causal only).
      block_len: positions per block; it must divide the length unless causal.
      max_length: the longest input; the sorting network scores max_length / block_len
        blocks (a multiple of block_len); the predict cache holds max_length positions.
      n_sinkhorn_iters: Sinkhorn iterations (>= 1).
      temperature: R is divided by it before the normalisation (> 0; lower: closer to a
        hard permutation).
      attention_dropout: dropout on the attention weights (train mode), as `SelfAttention`'s.
    Weights: `{'wq','wk','wv': [d_model, n_heads*d], 'wo': [n_heads*d_v, d_model],
    'w_sort': [n_heads, d_qk, max_length / block_len]}`.
    """

    def __init__(self, n_heads: int = 1, d_qk: int = 64, d_v: int = 64, causal: bool = False,
                 output_dropout: float = 0.0, mode: str = "train", block_len: int = 64,
                 max_length: int = 8192, n_sinkhorn_iters: int = 8, temperature: float = 0.75,
                 attention_dropout: float = 0.0):
        super().__init__(n_in=1, n_out=1, name="SinkhornAttention")
        who = self.name
        self.causal = bool(causal)
        self.mode = check_mode(mode)
        if self.mode == "predict" and not self.causal:
            raise ArgumentError(f"{who}: predict mode needs causal=True")
        self.n_heads = check_int("n_heads", n_heads, 1, who)
        self.d_qk = check_int("d_qk", d_qk, 1, who)
        self.d_v = check_int("d_v", d_v, 1, who)
        self.block_len = check_int("block_len", block_len, 1, who)
        self.max_length = check_int("max_length", max_length, 1, who)
        if self.max_length % self.block_len:
            raise ArgumentError(f"{who}: block_len={self.block_len} must divide "
                                f"max_length={self.max_length}")
        self.n_sinkhorn_iters = check_int("n_sinkhorn_iters", n_sinkhorn_iters, 1, who)
        self.temperature = check_number("temperature", temperature, who, minimum=0.0,
                                        allow_minimum=False)
        self.output_dropout = check_rate("output_dropout", output_dropout, who)
        self.attention_dropout = check_rate("attention_dropout", attention_dropout, who)

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
        state = EMPTY
        if self.mode == "predict":
            b, dtype, l = input_signature.shape[0], input_signature.dtype, self.block_len
            state = {
                "k": jnp.zeros((b, h, self.max_length, self.d_qk), dtype),
                "v": jnp.zeros((b, h, self.max_length, self.d_v), dtype),
                "k_sum": jnp.zeros((b, h, self.d_qk), jnp.float32),
                "column_lse": jnp.full((b, h, self.n_sinkhorn_iters, n_max), _FORBIDDEN,
                                       jnp.float32),
                "sorted_k": jnp.zeros((b, h, l, self.d_qk), dtype),
                "sorted_v": jnp.zeros((b, h, l, self.d_v), dtype),
                "position": jnp.zeros((), jnp.int32),
            }
        return weights, state

    def predict_context(self) -> int | None:
        """`max_length` in predict mode: the cache holds that many positions."""
        return self.max_length if self.mode == "predict" else None

    def _check_length(self, length: int) -> None:
        if length % self.block_len and not self.causal:
            raise ValueError(f"{self.name}: block_len={self.block_len} must divide the "
                             f"length, got length {length}")
        if length > self.max_length:
            raise ValueError(f"{self.name}: length {length} exceeds max_length="
                             f"{self.max_length}")

    def _scores(self, summary, weights, n_blocks):
        """`relu(summary @ w_sort) / temperature`, float32: `(b, h, n, n_blocks)` for
        `summary (b, h, n, d_qk)`."""
        w_sort = weights["w_sort"][:, :, :n_blocks].astype(jnp.float32)
        scores = jax.nn.relu(jnp.einsum("bhnd,hdm->bhnm", summary.astype(jnp.float32), w_sort))
        return scores / self.temperature

    def sorting_matrix(self, k, weights):
        """The block-to-block matrix S of keys `k (batch, n_heads, length, d_qk)`:
        `(batch, n_heads, N, N)`, N = length / block_len."""
        b, h, length, d = k.shape
        l = self.block_len
        n_blocks = length // l
        if self.causal:
            starts = jnp.arange(n_blocks) * l
            running = jnp.cumsum(k.astype(jnp.float32), axis=2)[:, :, starts]
            summary = running / (starts + 1).astype(jnp.float32)[None, None, :, None]
            return causal_sinkhorn(self._scores(summary, weights, n_blocks),
                                   self.n_sinkhorn_iters)
        summary = jnp.mean(k.reshape(b, h, n_blocks, l, d), axis=3)
        return sinkhorn(self._scores(summary, weights, n_blocks), self.n_sinkhorn_iters)

    def apply(self, x, weights, state, rng):
        if x.ndim != 3:
            raise ValueError(f"{self.name}: expected x of shape (batch, length, d_model), "
                             f"got {tuple(x.shape)}")
        check_feature_dim(x, weights["wq"].shape[-2], self.name)
        q, k, v = (split_heads(matmul(x, weights[n]), self.n_heads) for n in ("wq", "wk", "wv"))
        if self.mode == "predict":
            out, state = self._attend_cached(q, k, v, weights, state)
        else:
            self._check_length(x.shape[1])
            drop = attention_dropout_of(self.attention_dropout, self.mode, rng, self.name)
            out = self._attend(q, k, v, weights, drop)
        y = matmul(merge_heads(out.astype(x.dtype)), weights["wo"])
        return dropout(y, self.output_dropout, rng, self.mode), state

    def _attend(self, q, k, v, weights, drop):
        b, h, length, _ = q.shape
        l = self.block_len
        pad = -length % l
        if pad:  # causal only (see _check_length): the padding follows every real token
            q, k, v = (jnp.pad(a, [(0, 0), (0, 0), (0, pad), (0, 0)]) for a in (q, k, v))
        n_blocks = (length + pad) // l
        s = self.sorting_matrix(k, weights)

        def sort(a):  # (b, h, L, d) -> the sorted blocks, (b * h, N, l, d)
            blocks = a.reshape(b, h, n_blocks, l, a.shape[-1]).astype(jnp.float32)
            return jnp.einsum("bhij,bhjtd->bhitd", s, blocks).reshape(
                b * h, n_blocks, l, a.shape[-1]).astype(a.dtype)

        pos = jnp.broadcast_to(jnp.arange(length + pad, dtype=jnp.int32).reshape(1, n_blocks, l),
                               (b * h, n_blocks, l))
        sorted_pos = pos
        if self.causal:  # block 0 has no sorted block: its (all-zero) mixture is hidden
            sorted_pos = jnp.where(pos >= l, pos, -1)
        qc, kc, vc = chunks_of(q, l), chunks_of(k, l), chunks_of(v, l)
        out = merge_streams([
            window_stream(qc, kc, vc, pos, pos, [0], self.causal, **drop.stream(0)),
            window_stream(qc, sort(k), sort(v), pos, sorted_pos, [0], False,
                          **drop.stream(1))])
        return out.reshape(b, h, length + pad, -1)[:, :, :length]

    # -- predict ------------------------------------------------------------------------------
    def _attend_cached(self, q, k, v, weights, state):
        """The causal form for n new positions, after `state['position']` earlier ones."""
        b, h, n, _ = q.shape
        l, n_max = self.block_len, self.max_length // self.block_len
        if n > self.max_length:
            raise ValueError(f"{self.name}: {n} tokens in one predict call exceed "
                             f"max_length={self.max_length}")
        start = state["position"]
        state = dict(state)
        state["k"] = lax.dynamic_update_slice_in_dim(state["k"], k.astype(state["k"].dtype),
                                                     start, axis=2)
        state["v"] = lax.dynamic_update_slice_in_dim(state["v"], v.astype(state["v"].dtype),
                                                     start, axis=2)
        running = state["k_sum"][:, :, None] + jnp.cumsum(k.astype(jnp.float32), axis=2)
        state["k_sum"] = running[:, :, -1]
        # The blocks that start among the new positions: at most ceil(n / l), from first_new.
        n_starts = -(-n // l)
        first_new = (start + l - 1) // l
        rows = first_new + jnp.arange(n_starts)
        starts = rows * l
        begins = (starts < start + n) & (rows < n_max)
        summary = (jnp.take(running, jnp.clip(starts - start, 0, n - 1), axis=2)
                   / (starts + 1).astype(jnp.float32)[None, None, :, None])
        scores = self._scores(summary, weights, n_max)  # (b, h, n_starts, n_max)

        def sort_row(column_lse, i):
            row, updated = causal_sinkhorn_row(scores[:, :, i], rows[i], column_lse,
                                               self.n_sinkhorn_iters)
            return jnp.where(begins[i], updated, column_lse), row

        state["column_lse"], s = lax.scan(sort_row, state["column_lse"], jnp.arange(n_starts))
        s = jnp.moveaxis(s, 0, 2)  # (b, h, n_starts, n_max)

        def mix(caches):  # the new blocks' sorted blocks, (b, h, n_starts, l, d) each
            return tuple(jnp.einsum("bhij,bhjtd->bhitd", s, c.reshape(
                b, h, n_max, l, c.shape[-1]).astype(jnp.float32)).astype(c.dtype)
                for c in caches)

        def none_begins(caches):  # a step inside a block: nothing to mix
            return tuple(jnp.zeros((b, h, n_starts, l, c.shape[-1]), c.dtype) for c in caches)

        new_k, new_v = lax.cond(jnp.any(begins), mix, none_begins, (state["k"], state["v"]))
        # Sorted blocks of the query blocks: the current one (slot 0), then those starting now.
        sorted_k = jnp.concatenate([state["sorted_k"][:, :, None], new_k], axis=2)
        sorted_v = jnp.concatenate([state["sorted_v"][:, :, None], new_v], axis=2)
        q_pos = start + jnp.arange(n, dtype=jnp.int32)
        q_block = q_pos // l
        slot = q_block - first_new + 1
        last = slot[-1]
        state["sorted_k"] = jnp.take(sorted_k, last, axis=2)
        state["sorted_v"] = jnp.take(sorted_v, last, axis=2)
        state["position"] = start + n

        own = q_block[:, None] * l + jnp.arange(l)[None, :]  # (n, l): the query's block
        keys = jnp.concatenate([jnp.take(state["k"], own, axis=2),
                                jnp.take(sorted_k, slot, axis=2)], axis=3)
        values = jnp.concatenate([jnp.take(state["v"], own, axis=2),
                                  jnp.take(sorted_v, slot, axis=2)], axis=3)
        seen = jnp.concatenate([own <= q_pos[:, None],
                                jnp.broadcast_to((q_block >= 1)[:, None], (n, l))], axis=1)
        scores = jnp.einsum("bhnd,bhnkd->bhnk", q, keys,
                            preferred_element_type=jnp.float32) / math.sqrt(self.d_qk)
        p = jax.nn.softmax(jnp.where(seen[None, None], scores, MASK_VALUE), axis=-1)
        return jnp.einsum("bhnk,bhnkd->bhnd", p, values.astype(jnp.float32)), state


__all__ = ["SinkhornAttention", "causal_sinkhorn", "causal_sinkhorn_row", "sinkhorn"]
