"""Block-sparse attention: the shared machinery of Sparse Transformer, Longformer and BigBird.

A block-sparse pattern is a union of *streams*, disjoint sets of keys per query, each one
call of `attention_core.blocked_attention`:

- a window stream: every chunk of queries on its neighbouring chunks (relative `offsets`);
- a table stream (`table_stream`): every chunk of queries on chunks named by a table of
  absolute chunk indices (global blocks, random blocks, summary keys), the queries repeated
  once per table column so that each column is one `offsets=[0]` call;
- a transposed stream: the same column of every block (Sparse Transformer's strided heads).

Element-level exclusions that keep streams disjoint are written as positions: a stream may
give its queries shifted positions (`q_pos`) so that the causal test `k_pos <= q_pos` means
"keys before the query's block", or reversed ones (`reverse_positions`) for "after it".
The streams are merged by their log-sum-exps (`merge_streams`), which equals one softmax
over the union of their keys.

Attention dropout (`AttentionDropout`): each stream drops its own weights with a key of its
own (the layer's key folded with the stream's index). A stream's output is its kept weights
times the values over its *undropped* normaliser, so that the merge weighs it by its share of
the undropped total: the merged result is the one softmax's weights, dropped and rescaled by
1 / (1 - rate), as in `SelfAttention`.

`BlockSparseAttention` is the layer around a pattern: projections, heads, padding to whole
blocks, output dropout, and predict mode on `kv_cache`'s ring with the pattern as a key mask
(`pattern_mask`), so that decoding equals the eval forward while the sequence fits
`predict_mem_len`.
"""

from __future__ import annotations

import abc
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from terraformer.checks import check_int, check_rate
from terraformer.layers import initializers as init_lib
from terraformer.layers import kv_cache
from terraformer.layers.attention import merge_heads, split_heads
from terraformer.layers.attention_core import blocked_attention
from terraformer.layers.base import EMPTY, Layer, check_mode
from terraformer.layers.core import dropout, matmul
from terraformer.layers.efficient.projections import layer_inputs


# -- streams ----------------------------------------------------------------------------------
class AttentionDropout(NamedTuple):
    """Dropout on the attention weights of a layer's streams (rate 0: none).

    `stream(i)` gives the keyword arguments of `blocked_attention` (and of `window_stream`,
    `table_stream`) for stream `i`; `dense(i)` those of `dot_product_attention`. Each stream
    draws from `rng` folded with its index, so that streams drop independently.
    """

    rate: float = 0.0
    rng: Any = None

    def stream(self, index: int) -> dict:
        if self.rate == 0.0:
            return {}
        return dict(dropout_rate=self.rate, dropout_rng=jax.random.fold_in(self.rng, index))

    def dense(self, index: int) -> dict:
        if self.rate == 0.0:
            return {}
        return dict(dropout_rate=self.rate, rng=jax.random.fold_in(self.rng, index),
                    mode="train")


NO_DROPOUT = AttentionDropout()


def attention_dropout_of(rate: float, mode: str, rng, who: str) -> AttentionDropout:
    """The attention dropout of a layer in `mode` (train only) for the `rng` given to apply;
    its key is `rng` folded with 1, the output dropout keeping `rng` itself."""
    if mode != "train" or rate == 0.0:
        return NO_DROPOUT
    if rng is None:
        raise ValueError(f"{who}: attention_dropout in train mode needs an rng; pass rng= to "
                         "apply")
    return AttentionDropout(rate, jax.random.fold_in(rng, 1))


def chunks_of(a, c: int):
    """`(b, h, L, ...) -> (b * h, L // c, c, ...)`."""
    b, h, length = a.shape[:3]
    return a.reshape(b * h, length // c, c, *a.shape[3:])


def window_stream(qc, kc, vc, q_pos, k_pos, offsets, causal: bool, **dropout):
    """Chunk i on chunks i + o, o in `offsets` (outside the sequence: masked).

    qc, kc: `(n, N, c, d)`; vc `(n, N, c, d_v)`; q_pos, k_pos `(n, N, c)` (k_pos < 0: hidden).
    `dropout`: `AttentionDropout.stream(i)`'s arguments, if any.
    Returns `(out (1, n, N, c, d_v), lse (1, n, N, c))`.
    """
    out, lse = blocked_attention(qc, kc, vc, q_pos, k_pos, offsets=list(offsets),
                                 scale=1.0 / math.sqrt(qc.shape[-1]), causal=causal,
                                 wrap=False, **dropout)
    return out[None], lse[None]


def table_stream(qc, kc, vc, q_pos, k_pos, table, n_heads: int, causal: bool, **dropout):
    """Chunk i on the chunks `table[..., i, :]` of `kc` (entries < 0: none).

    qc `(n, N, c, d)` with n = batch * n_heads; kc, vc, k_pos `(n, Nk, c, ...)`; table int
    `(N, W)` (shared by the heads) or `(n_heads, N, W)`. The queries are repeated W times:
    memory O(W * n * N * c * d). `dropout`: `AttentionDropout.stream(i)`'s arguments, if any.
    Returns `(out (W, n, N, c, d_v), lse (W, n, N, c))`.
    """
    n, n_q_chunks, c, d = qc.shape
    table = jnp.asarray(table, jnp.int32)
    if table.ndim == 2:
        table = jnp.broadcast_to(table, (n_heads,) + table.shape)
    width = table.shape[-1]
    batch = n // n_heads
    index = jnp.maximum(table, 0)
    heads = jnp.arange(n_heads)[:, None, None]

    def gather(a):  # (n, Nk, c, ...) -> (W * n, N, c, ...)
        a = a.reshape(batch, n_heads, *a.shape[1:])
        g = a[:, heads, index]  # (b, h, N, W, c, ...)
        g = jnp.moveaxis(g, 3, 0)
        return g.reshape(width * n, n_q_chunks, *a.shape[3:])

    kp = gather(k_pos)
    present = jnp.moveaxis(jnp.broadcast_to(table >= 0, (batch,) + table.shape), 3, 0)
    kp = jnp.where(present.reshape(width * n, n_q_chunks)[..., None], kp, -1)
    rep = (width,) + qc.shape
    out, lse = blocked_attention(
        jnp.broadcast_to(qc, rep).reshape(width * n, *qc.shape[1:]), gather(kc), gather(vc),
        jnp.broadcast_to(q_pos, (width,) + q_pos.shape).reshape(width * n, *q_pos.shape[1:]),
        kp, offsets=[0], scale=1.0 / math.sqrt(d), causal=causal, wrap=False, **dropout)
    return out.reshape(width, n, *out.shape[1:]), lse.reshape(width, n, *lse.shape[1:])


def merge_streams(streams):
    """One attention over the union of disjoint key sets, from each set's `(out, lse)`.

    streams: pairs `(out (S, n, N, c, d_v), lse (S, n, N, c))`. Weights are the softmax of
    the log-sum-exps over all S's (a query that sees no key of a stream has lse about
    MASK_VALUE there, so weight 0). Returns `(n, N, c, d_v)` float32.
    """
    outs = jnp.concatenate([o for o, _ in streams], axis=0)
    lses = jnp.concatenate([s for _, s in streams], axis=0)
    weights = jax.nn.softmax(lses, axis=0)
    return jnp.sum(weights[..., None] * outs.astype(jnp.float32), axis=0)


def reverse_positions(pos, length: int):
    """`length - 1 - pos` where pos >= 0, else -1: with these, the causal test `k <= q`
    reads `k_pos >= q_pos` in the original order."""
    return jnp.where(pos >= 0, length - 1 - pos, -1)


# -- the layer ------------------------------------------------------------------------------
class BlockSparseAttention(Layer, abc.ABC):
    """A block-sparse multi-head self-attention: `(batch, length, d_model) -> same`.

    Subclasses give the pattern twice: `attend_blocks` (the eval/train computation, from
    streams) and `pattern_mask` (the same pattern as a boolean mask on positions, for
    predict mode). Lengths are padded to a multiple of `block_len` (padding is never
    attended to, and cut from the output).

    Args:
      n_heads, d_qk, d_v: heads and their widths.
      causal: keys after the query are hidden (needed for predict mode).
      output_dropout: dropout on the output (train mode).
      mode: 'train', 'eval' or 'predict'.
      masked: take `(x, mask)`, mask `(batch, length)` True for real tokens; return `(y, mask)`.
      block_len: positions per block.
      predict_mem_len: the decoding ring; predict equals eval while the sequence fits in it.
      attention_dropout: dropout on the attention weights (train mode), as `SelfAttention`'s.
    Weights: `{'wq','wk','wv': [d_model, n_heads*d], 'wo': [n_heads*d_v, d_model]}`.
    """

    def __init__(self, n_heads: int = 1, d_qk: int = 64, d_v: int = 64, causal: bool = False,
                 output_dropout: float = 0.0, mode: str = "train", masked: bool = False,
                 block_len: int = 64, predict_mem_len: int = 2048, name: str | None = None,
                 attention_dropout: float = 0.0):
        n = 2 if masked else 1
        super().__init__(n_in=n, n_out=n, name=name)
        who = self.name
        self.n_heads = check_int("n_heads", n_heads, 1, who)
        self.d_qk = check_int("d_qk", d_qk, 1, who)
        self.d_v = check_int("d_v", d_v, 1, who)
        self.block_len = check_int("block_len", block_len, 1, who)
        self.predict_mem_len = check_int("predict_mem_len", predict_mem_len, 1, who)
        self.output_dropout = check_rate("output_dropout", output_dropout, who)
        self.attention_dropout = check_rate("attention_dropout", attention_dropout, who)
        self.causal, self.masked = bool(causal), bool(masked)
        self.mode = check_mode(mode)
        if self.mode == "predict" and not self.causal:
            raise ValueError(f"{who}: predict mode needs causal=True")

    # -- subclass hooks -----------------------------------------------------------------------
    @abc.abstractmethod
    def attend_blocks(self, q, k, v, k_pos, drop: AttentionDropout = NO_DROPOUT):
        """q, k `(b, h, Lp, d_qk)`, v `(b, h, Lp, d_v)`, Lp a multiple of block_len; k_pos
        `(b, Lp)` int32, the position of each key, -1 for padding -> `(b, h, Lp, d_v)`.
        `drop`: the attention dropout, applied to each stream (`drop.stream(i)`) and dense
        row (`drop.dense(i)`) with a distinct index."""

    @abc.abstractmethod
    def pattern_mask(self, q_pos, k_pos):
        """Which keys each query may see, causality aside: bool `(1 or n_heads, n_q, n_k)`
        for positions `q_pos (n_q,)`, `k_pos (n_k,)` (k_pos < 0: slots never written)."""

    # -- weights --------------------------------------------------------------------------
    def init_weights_and_state(self, input_signature, rng):
        x_sig = input_signature[0] if self.masked else input_signature
        d_model, h = x_sig.shape[-1], self.n_heads
        keys = jax.random.split(rng, 4)
        dims = {"wq": h * self.d_qk, "wk": h * self.d_qk, "wv": h * self.d_v}
        weights = {name: init_lib.glorot_uniform(key, (d_model, d))
                   for (name, d), key in zip(dims.items(), keys)}
        weights["wo"] = init_lib.glorot_uniform(keys[3], (h * self.d_v, d_model))
        state = EMPTY
        if self.mode == "predict":
            batch = x_sig.shape[0]
            k = kv_cache.new_ring(batch, h, self.predict_mem_len, self.d_qk, x_sig.dtype)
            state = {"k": k,
                     "v": kv_cache.new_ring(batch, h, self.predict_mem_len, self.d_v,
                                            x_sig.dtype),
                     "k_valid": jnp.zeros((batch, k.shape[2]), bool),
                     "position": jnp.zeros((), jnp.int32)}
        return weights, state

    def predict_context(self) -> int | None:
        """`predict_mem_len` in predict mode: beyond it the oldest keys are forgotten."""
        return self.predict_mem_len if self.mode == "predict" else None

    # -- forward --------------------------------------------------------------------------
    def apply(self, inputs, weights, state, rng):
        x, mask = layer_inputs(inputs, self.masked, self.name, weights["wq"].shape[-2])
        q, k, v = (split_heads(matmul(x, weights[n]), self.n_heads) for n in ("wq", "wk", "wv"))
        if self.mode == "predict":
            out, state = self._attend_cached(q, k, v, mask, state)
        else:
            drop = attention_dropout_of(self.attention_dropout, self.mode, rng, self.name)
            out = self._attend(q, k, v, mask, drop)
        y = matmul(merge_heads(out.astype(x.dtype)), weights["wo"])
        y = dropout(y, self.output_dropout, rng, self.mode)
        return ((y, inputs[1]) if self.masked else y), state

    def _attend(self, q, k, v, mask, drop):
        b, _, length, _ = q.shape
        pad = -length % self.block_len
        k_pos = jnp.broadcast_to(jnp.arange(length + pad, dtype=jnp.int32), (b, length + pad))
        valid = jnp.ones((b, length), bool) if mask is None else mask.astype(bool)
        k_pos = jnp.where(jnp.pad(valid, [(0, 0), (0, pad)]), k_pos, -1)
        if pad:
            padding = [(0, 0), (0, 0), (0, pad), (0, 0)]
            q, k, v = (jnp.pad(a, padding) for a in (q, k, v))
        return self.attend_blocks(q, k, v, k_pos, drop)[:, :, :length]

    def _attend_cached(self, q, k, v, mask, state):
        n_new, mem_len = q.shape[2], self.predict_mem_len
        if n_new > mem_len:
            raise ValueError(f"{self.name}: {n_new} tokens in one predict call exceed "
                             f"predict_mem_len={mem_len}; feed the prompt in smaller chunks")
        start = state["position"]
        new_valid = jnp.ones((q.shape[0], n_new), bool) if mask is None else mask.astype(bool)
        state = dict(state)
        state["k_valid"] = kv_cache.ring_write(state["k_valid"], new_valid, start, axis=1)
        state["position"] = start + n_new
        q_pos = start + jnp.arange(n_new, dtype=jnp.int32)
        lo = jnp.maximum(start - mem_len + 1, 0)

        def key_mask(k_pos, slot0, block_len):
            allowed = kv_cache.window_mask(q_pos, k_pos, mem_len)
            allowed = allowed[None] & self.pattern_mask(q_pos, k_pos)
            valid = lax.dynamic_slice_in_dim(state["k_valid"], slot0, block_len, axis=1)
            return allowed[None] & valid[:, None, None, :]

        out, state["k"], state["v"] = kv_cache.cached_attention(
            q, q_pos, k, v, state["k"], state["v"], key_mask, lo,
            kv_cache.ring_layout(mem_len)[1])
        return out, state


__all__ = ["NO_DROPOUT", "AttentionDropout", "BlockSparseAttention", "attention_dropout_of",
           "chunks_of", "merge_streams", "reverse_positions",
           "table_stream", "window_stream"]
