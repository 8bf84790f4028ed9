"""Routing attention (Roy et al. 2021): online k-means routes tokens to clusters; each token
attends within its cluster.

Queries and keys are shared (one `qk` projection, keys of unit length, as in LSH attention)
so that a token's query and key share a cluster: `n_clusters` centroids per head, unit
vectors kept in the layer's state, assign each token to its nearest centroid (cosine). In
train mode the centroids move toward the mean of their tokens by an exponential moving average
(`centroid_decay`) after routing, and are renormalised; eval and predict leave them alone.

Balanced windows within a cluster: a token's *rank* in its cluster is the number of earlier
tokens routed there, and token i sees the keys j of its cluster whose rank falls in the same
window of `chunk_len` ranks (`rank // chunk_len`); causal: j <= i as well. A token's window
depends on earlier tokens only, so the causal layer never looks ahead, not even through the
pattern, and decodes exactly.

Computed as in `lsh.py`: sort by (cluster, position), but each cluster's run starts at a
multiple of `chunk_len` (runs padded with empty slots, at most n_clusters * (chunk_len - 1) in
all), so that every chunk of the sorted sequence is one window of one cluster; then one
`attention_core.blocked_attention` (chunks on themselves) and the sort undone by a gather.

Complexity per head, L = length, c = chunk_len, C = n_clusters: time O(L c + L C d) (the
attention plus the routing), memory O((L + C c) d + L C) plus a cache-sized block of scores.
Causal decoding: yes (predict mode: the ring cache holds each key's cluster and window; a
step costs O(predict_mem_len); equal to the eval forward while the sequence fits the ring).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from terraformer.checks import check_int, check_number, check_rate
from terraformer.layers import initializers as init_lib
from terraformer.layers import kv_cache
from terraformer.layers.attention import merge_heads, split_heads
from terraformer.layers.attention_core import blocked_attention
from terraformer.layers.base import Layer, check_mode
from terraformer.layers.core import dropout, matmul
from terraformer.layers.efficient.block_sparse import attention_dropout_of
from terraformer.layers.efficient.projections import layer_inputs
from terraformer.layers.lsh import inverse_permutation, length_normalized


def assign_clusters(u, centroids):
    """The nearest centroid of each unit vector: `u (b, h, L, d)`, `centroids (h, C, d)` ->
    int32 `(b, h, L)`."""
    scores = jnp.einsum("bhld,hcd->bhlc", u.astype(jnp.float32), centroids)
    return jnp.argmax(scores, axis=-1).astype(jnp.int32)


def cluster_slots(clusters, n_clusters: int, chunk_len: int):
    """Where each token goes in the cluster-sorted sequence with chunk-aligned runs.

    clusters: int `(..., L)` in `[0, n_clusters]` (n_clusters: padding, sorted last).
    Returns `(slot (..., L), n_slots)`: tokens sorted by (cluster, position), each cluster's
    run starting at a multiple of chunk_len; `n_slots`, a multiple of chunk_len, bounds every
    slot.
    """
    length = clusters.shape[-1]
    c = chunk_len
    positions = lax.broadcasted_iota(jnp.int32, clusters.shape, clusters.ndim - 1)
    key = lax.sort(clusters * length + positions, dimension=clusters.ndim - 1)
    order, sorted_clusters = key % length, key // length
    rows = clusters.reshape(-1, length)
    counts = jax.vmap(lambda r: jnp.bincount(r, length=n_clusters + 1))(rows)
    counts = counts.reshape(*clusters.shape[:-1], n_clusters + 1)
    starts = jnp.cumsum(counts, axis=-1) - counts
    padded = -(-counts // c) * c
    padded_starts = jnp.cumsum(padded, axis=-1) - padded
    rank = positions - jnp.take_along_axis(starts, sorted_clusters, axis=-1)
    slot_sorted = jnp.take_along_axis(padded_starts, sorted_clusters, axis=-1) + rank
    slot = jnp.take_along_axis(slot_sorted, inverse_permutation(order), axis=-1)
    n_slots = -(-(length + (n_clusters + 1) * (c - 1)) // c) * c
    return slot, n_slots


def routing_attention(q, k, v, clusters, k_pos, *, n_clusters: int, chunk_len: int,
                      causal: bool, **dropout):
    """Attention within cluster windows (see the module docstring).

    q, k: `(b, h, L, d)`; v `(b, h, L, d_v)`; clusters int `(b, h, L)` in `[0, n_clusters]`
    (n_clusters for padding); k_pos int `(b, L)`, -1 for padding; `dropout`: the attention
    dropout's `dropout_rate`, `dropout_rng` of `blocked_attention`, if any.
    Returns `(b, h, L, d_v)`.
    """
    b, h, length, d = q.shape
    slot, n_slots = cluster_slots(clusters, n_clusters, chunk_len)
    rows = b * h
    flat = (jnp.arange(rows, dtype=jnp.int32)[:, None] * n_slots
            + slot.reshape(rows, length)).reshape(-1)
    token = jnp.full((rows * n_slots,), -1, jnp.int32)
    token = token.at[flat].set(jnp.tile(jnp.arange(length, dtype=jnp.int32), rows))
    token = token.reshape(b, h, n_slots)
    safe = jnp.maximum(token, 0)

    def to_slots(a):  # (b, h, L, d) -> (b * h, n_slots / c, c, d)
        s = jnp.take_along_axis(a, safe[..., None], axis=2)
        return s.reshape(rows, n_slots // chunk_len, chunk_len, a.shape[-1])

    kp_tokens = jnp.broadcast_to(k_pos[:, None], (b, h, length))
    k_slot_pos = jnp.where(token >= 0, jnp.take_along_axis(kp_tokens, safe, axis=2), -1)
    shape = (rows, n_slots // chunk_len, chunk_len)
    out, _ = blocked_attention(to_slots(q), to_slots(k), to_slots(v), token.reshape(shape),
                               k_slot_pos.reshape(shape), offsets=[0],
                               scale=1.0 / math.sqrt(d), causal=causal, wrap=False, **dropout)
    out = out.reshape(b, h, n_slots, -1)
    return jnp.take_along_axis(out, slot[..., None], axis=2)


def updated_centroids(centroids, u, clusters, decay: float):
    """One online k-means step: each centroid moves to `decay * c + (1 - decay) * mean` of its
    tokens (unchanged without tokens), renormalised. u `(b, h, L, d)` unit vectors; clusters
    `(b, h, L)` (values >= n_clusters are ignored)."""
    n_heads, n_clusters, d = centroids.shape
    u = jnp.swapaxes(u, 0, 1).reshape(n_heads, -1, d).astype(jnp.float32)
    cl = jnp.swapaxes(clusters, 0, 1).reshape(n_heads, -1)

    def per_head(u_h, c_h):
        sums = jnp.zeros((n_clusters + 1, d), jnp.float32).at[c_h].add(u_h)[:n_clusters]
        counts = jnp.bincount(c_h, length=n_clusters + 1)[:n_clusters]
        return sums, counts

    sums, counts = jax.vmap(per_head)(u, cl)
    mean = sums / jnp.maximum(counts, 1)[..., None]
    moved = decay * centroids + (1.0 - decay) * mean
    moved = jnp.where((counts > 0)[..., None], moved, centroids)
    return lax.stop_gradient(length_normalized(moved))


class RoutingAttention(Layer):
    """Routing self-attention, `(batch, length, d_model) -> same` (see the module docstring).

    Args:
      n_heads, d_qk, d_v: heads and their widths.
      causal: keys after the query are hidden (needed for predict mode).
      output_dropout: dropout on the output (train mode).
      mode: 'train', 'eval' or 'predict'.
      masked: take `(x, mask)`, mask `(batch, length)` True for real tokens; return `(y, mask)`.
      n_clusters: centroids per head.
      chunk_len: the window of ranks within a cluster.
      centroid_decay: the moving average's decay, in [0, 1).
      predict_mem_len: the decoding ring; predict equals eval while the sequence fits.
      attention_dropout: dropout on the attention weights (train mode), as `SelfAttention`'s.
    Weights: `{'w_qk': [d_model, n_heads*d_qk], 'w_v': [d_model, n_heads*d_v],
    'w_o': [n_heads*d_v, d_model]}`. State: `{'centroids': (n_heads, n_clusters, d_qk)}` unit
    vectors (drawn at init), plus the predict cache in predict mode.
    """

    def __init__(self, n_heads: int = 1, d_qk: int = 64, d_v: int = 64, causal: bool = False,
                 output_dropout: float = 0.0, mode: str = "train", masked: bool = False,
                 n_clusters: int = 16, chunk_len: int = 64, centroid_decay: float = 0.999,
                 predict_mem_len: int = 2048, attention_dropout: float = 0.0):
        n = 2 if masked else 1
        super().__init__(n_in=n, n_out=n, name="RoutingAttention")
        who = self.name
        self.n_heads = check_int("n_heads", n_heads, 1, who)
        self.d_qk = check_int("d_qk", d_qk, 1, who)
        self.d_v = check_int("d_v", d_v, 1, who)
        self.n_clusters = check_int("n_clusters", n_clusters, 1, who)
        self.chunk_len = check_int("chunk_len", chunk_len, 1, who)
        self.centroid_decay = check_number("centroid_decay", centroid_decay, who, minimum=0.0,
                                           maximum=1.0, allow_maximum=False)
        self.predict_mem_len = check_int("predict_mem_len", predict_mem_len, 1, who)
        self.output_dropout = check_rate("output_dropout", output_dropout, who)
        self.attention_dropout = check_rate("attention_dropout", attention_dropout, who)
        self.causal, self.masked = bool(causal), bool(masked)
        self.mode = check_mode(mode)
        if self.mode == "predict" and not self.causal:
            raise ValueError(f"{who}: predict mode needs causal=True")

    def init_weights_and_state(self, input_signature, rng):
        x_sig = input_signature[0] if self.masked else input_signature
        d_model, h = x_sig.shape[-1], self.n_heads
        r_qk, r_v, r_o, r_c = jax.random.split(rng, 4)
        weights = {"w_qk": init_lib.glorot_uniform(r_qk, (d_model, h * self.d_qk)),
                   "w_v": init_lib.glorot_uniform(r_v, (d_model, h * self.d_v)),
                   "w_o": init_lib.glorot_uniform(r_o, (h * self.d_v, d_model))}
        centroids = jax.random.normal(r_c, (h, self.n_clusters, self.d_qk), jnp.float32)
        state = {"centroids": length_normalized(centroids)}
        if self.mode == "predict":
            batch = x_sig.shape[0]
            ring = kv_cache.ring_layout(self.predict_mem_len)[0]
            state.update(
                k=kv_cache.new_ring(batch, h, self.predict_mem_len, self.d_qk, x_sig.dtype),
                v=kv_cache.new_ring(batch, h, self.predict_mem_len, self.d_v, x_sig.dtype),
                k_cluster=jnp.full((batch, h, ring), -1, jnp.int32),
                k_window=jnp.zeros((batch, h, ring), jnp.int32),
                k_valid=jnp.zeros((batch, ring), bool),
                counts=jnp.zeros((batch, h, self.n_clusters), jnp.int32),
                position=jnp.zeros((), jnp.int32))
        return weights, state

    def predict_context(self) -> int | None:
        """`predict_mem_len` in predict mode: beyond it the oldest keys are forgotten."""
        return self.predict_mem_len if self.mode == "predict" else None

    def clusters_of(self, x, weights, state):
        """The cluster of each token of `x (batch, length, d_model)`: `(batch, n_heads,
        length)` int32 (for inspection and tests)."""
        qk = split_heads(matmul(x, weights["w_qk"]), self.n_heads)
        return assign_clusters(length_normalized(qk), state["centroids"])

    def apply(self, inputs, weights, state, rng):
        x, mask = layer_inputs(inputs, self.masked, self.name, weights["w_qk"].shape[-2])
        b, length = x.shape[:2]
        valid = jnp.ones((b, length), bool) if mask is None else mask
        qk = split_heads(matmul(x, weights["w_qk"]), self.n_heads)
        v = split_heads(matmul(x, weights["w_v"]), self.n_heads)
        u = length_normalized(qk)
        clusters = assign_clusters(lax.stop_gradient(u), state["centroids"])
        clusters = jnp.where(valid[:, None], clusters, self.n_clusters)
        if self.mode == "predict":
            out, state = self._attend_cached(qk, u, v, clusters, valid, state)
        else:
            k_pos = jnp.where(valid, jnp.arange(length, dtype=jnp.int32), -1)
            drop = attention_dropout_of(self.attention_dropout, self.mode, rng, self.name)
            out = routing_attention(qk, u, v, clusters, k_pos, n_clusters=self.n_clusters,
                                    chunk_len=self.chunk_len, causal=self.causal,
                                    **drop.stream(0))
            if self.mode == "train":
                state = dict(state, centroids=updated_centroids(
                    state["centroids"], lax.stop_gradient(u), clusters, self.centroid_decay))
        y = matmul(merge_heads(out.astype(x.dtype)), weights["w_o"])
        y = dropout(y, self.output_dropout, rng, self.mode)
        return ((y, inputs[1]) if self.masked else y), state

    def _attend_cached(self, q, k, v, clusters, valid, state):
        n_new, mem_len = q.shape[2], self.predict_mem_len
        if n_new > mem_len:
            raise ValueError(f"{self.name}: {n_new} tokens in one predict call exceed "
                             f"predict_mem_len={mem_len}; feed the prompt in smaller chunks")
        # Ranks: the cluster's count so far plus the new tokens before this one.
        one_hot = jax.nn.one_hot(clusters, self.n_clusters, dtype=jnp.int32)  # padding: 0s
        before = jnp.cumsum(one_hot, axis=2) - one_hot
        rank = jnp.sum((before + state["counts"][:, :, None]) * one_hot, axis=-1)
        window = rank // self.chunk_len
        start = state["position"]
        state = dict(state)
        state["counts"] = state["counts"] + jnp.sum(one_hot, axis=2)
        state["k_valid"] = kv_cache.ring_write(state["k_valid"], valid, start, axis=1)
        state["k_cluster"] = kv_cache.ring_write(state["k_cluster"], clusters, start, axis=2)
        state["k_window"] = kv_cache.ring_write(state["k_window"], window, start, axis=2)
        state["position"] = start + n_new
        q_pos = start + jnp.arange(n_new, dtype=jnp.int32)
        lo = jnp.maximum(start - mem_len + 1, 0)

        def key_mask(k_pos, slot0, block_len):
            def block(a):
                return lax.dynamic_slice_in_dim(a, slot0, block_len, axis=a.ndim - 1)

            allowed = kv_cache.window_mask(q_pos, k_pos, mem_len)[None, None]
            same = ((block(state["k_cluster"])[:, :, None, :] == clusters[..., None])
                    & (block(state["k_window"])[:, :, None, :] == window[..., None]))
            return allowed & same & block(state["k_valid"])[:, None, None, :]

        out, state["k"], state["v"] = kv_cache.cached_attention(
            q, q_pos, k, v, state["k"], state["v"], key_mask, lo,
            kv_cache.ring_layout(mem_len)[1])
        return out, state


__all__ = ["RoutingAttention", "assign_clusters", "cluster_slots", "routing_attention",
           "updated_centroids"]
