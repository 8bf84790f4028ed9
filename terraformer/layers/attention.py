"""Dense attention layers: full causal attention and chunked local attention.

On a mesh with a ``sequence`` axis of several devices both run sequence-parallel
(`ring.ring_attention`, `ring.halo_attention`); see `SelfAttention`.

Functional pieces (`local_attention`, `split_heads`, `merge_heads`) work on per-head arrays
`[batch, n_heads, length, d]`; the layers (`SelfAttention`, `CausalAttention`) add the
projections, masks, dropout and the decoding cache. The softmax and its masks are those of
`attention_core` (full attention: `dot_product_attention`; local attention:
`blocked_attention`); the predict-mode cache is `kv_cache`'s ring.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from terraformer.layers import initializers as init_lib
from terraformer.layers import kv_cache
from terraformer.layers.attention_core import (
    BLOCKWISE_BLOCK_LEN,
    blocked_attention,
    blockwise_attention,
    dot_product_attention,
    position_mask,
)
from terraformer.layers.base import EMPTY, Layer, as_items, check_mode
from terraformer.layers.core import check_feature_dim, dropout, matmul, pack_kernel
from terraformer.layers.ring import (
    RING_CHUNK_LEN,
    halo_attention,
    ring_attention,
    sequence_shards,
)

# Full attention over at least this many positions runs `blockwise_attention`: the same result
# without the length x length scores (4 GiB a layer at 16K positions and 4 heads).
BLOCKWISE_MIN_LEN = 4096


def local_attention(
    q, k, v, chunk_len, n_chunks_before, n_chunks_after, causal, key_mask=None,
    dropout_rate=0.0, rng=None, mode="eval", wrap=True,
):
    """Chunked local attention: each chunk of queries sees its own and neighbouring chunks.

    Args:
      q: [batch, n_heads, length, d_qk]; k the same; v: [batch, n_heads, length, d_v].
        `length` must be a multiple of `chunk_len`.
      key_mask: bool [batch, length] (True = real token) or None.
      dropout_rate, rng, mode: dropout on the attention weights (`train` mode only).
      wrap: as trax, chunk c's neighbours are chunks (c + o) mod n_chunks: the first chunk
        looks back at the last one and the last looks ahead at the first (only a non-causal
        layer sees them; causally they are all in the future of chunk 0). False masks chunks
        outside the sequence instead. Padding (`key_mask`) stays masked either way.
    Returns:
      [batch, n_heads, length, d_v].
    Computed a block of chunks at a time (`attention_core.blocked_attention`), forward and
    backward: memory grows with the length times the window, not with the scores of all
    chunks at once.
    """
    b, h, length, d_qk = q.shape
    n_chunks = length // chunk_len
    shape = (b * h, n_chunks, chunk_len)
    positions = jnp.arange(length, dtype=jnp.int32)
    q_pos = jnp.broadcast_to(positions.reshape(1, n_chunks, chunk_len), shape)
    if key_mask is None:
        k_pos = q_pos
    else:
        k_pos = jnp.where(key_mask.astype(bool), positions, -1)  # [batch, length]
        k_pos = jnp.broadcast_to(k_pos[:, None], (b, h, length)).reshape(shape)
    rate = dropout_rate if mode == "train" else 0.0
    if rate > 0.0 and rng is None:
        raise ValueError("Dropout in train mode needs an rng; pass rng= to apply")
    out, _ = blocked_attention(
        q.reshape(*shape, d_qk), k.reshape(*shape, d_qk), v.reshape(*shape, v.shape[-1]),
        q_pos, k_pos, offsets=range(-n_chunks_before, n_chunks_after + 1),
        scale=1.0 / math.sqrt(d_qk), causal=causal, wrap=wrap, dropout_rate=rate,
        dropout_rng=rng)
    return out.reshape(b, h, length, v.shape[-1]).astype(v.dtype)


def split_heads(x, n_heads):
    """[batch, length, n_heads * d] -> [batch, n_heads, length, d]."""
    b, length, hd = x.shape
    return x.reshape(b, length, n_heads, hd // n_heads).transpose(0, 2, 1, 3)


def merge_heads(x):
    """[batch, n_heads, length, d] -> [batch, length, n_heads * d]."""
    b, h, length, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, length, h * d)


class SelfAttention(Layer):
    """Multi-head self-attention, full or chunked-local: (batch, length, d_model) -> same.

    Args:
      n_heads, d_qk, d_v: heads and per-head widths of queries/keys and values.
      causal: mask future positions.
      masked: if True the layer takes (x, mask) with mask [batch, length] (True = real token)
        and returns (y, mask).
      chunk_len: None for full attention (from BLOCKWISE_MIN_LEN positions on computed by
        `blockwise_attention`: the same result in memory linear in the length); else queries
        in chunk c see chunks c - n_chunks_before ... c + n_chunks_after. Lengths that are
        not a multiple of `chunk_len` are padded internally (padding never attended to) and
        cut off again.
      attention_dropout, output_dropout: dropout rates on attention weights / the output.
      use_bias: biases in the Q/K/V/output projections.
      predict_mem_len: size of the predict-mode key/value ring buffer.
      blockwise_min_len: full attention over at least this many positions runs
        `blockwise_attention`; None always materialises the length x length scores (the plain
        attention the blockwise one is measured against).
    Weights: {'wq','wk','wv': [d_model, n_heads*d], 'wo': [n_heads*d_v, d_model]} (+ biases).

    On a mesh whose ``sequence`` axis has several devices (the mesh in effect while train and
    eval steps trace), train and eval modes keep each device's shard of the positions and
    attend across shards with `ring.ring_attention` (full attention) or `ring.halo_attention`
    (chunked: only neighbouring chunks travel): the one-device result, in memory per device
    that shrinks with the axis. Decoding (predict mode) is unchanged.
    """

    def __init__(
        self,
        n_heads: int = 2,
        d_qk: int = 64,
        d_v: int = 64,
        causal: bool = False,
        masked: bool = False,
        chunk_len: int | None = None,
        n_chunks_before: int = 0,
        n_chunks_after: int = 0,
        attention_dropout: float = 0.0,
        output_dropout: float = 0.0,
        use_bias: bool = False,
        mode: str = "train",
        predict_mem_len: int = 2048,
        blockwise_min_len: int | None = BLOCKWISE_MIN_LEN,
    ):
        n = 2 if masked else 1
        super().__init__(n_in=n, n_out=n)
        if n_heads < 1 or d_qk < 1 or d_v < 1:
            raise ValueError(
                f"SelfAttention: n_heads, d_qk, d_v must be >= 1, got {n_heads}, {d_qk}, {d_v}"
            )
        if chunk_len is not None and chunk_len < 1:
            raise ValueError(f"SelfAttention: chunk_len must be None or >= 1, got {chunk_len}")
        if blockwise_min_len is not None and blockwise_min_len < 1:
            raise ValueError("SelfAttention: blockwise_min_len must be None (never blockwise) or"
                             f" >= 1, got {blockwise_min_len}")
        if causal and n_chunks_after:
            raise ValueError("SelfAttention: a causal layer cannot look at n_chunks_after > 0")
        self._n_heads, self._d_qk, self._d_v = n_heads, d_qk, d_v
        self._causal, self._masked = causal, masked
        self._chunk_len = chunk_len
        self._n_before, self._n_after = n_chunks_before, n_chunks_after
        self._attention_dropout, self._output_dropout = attention_dropout, output_dropout
        self._use_bias = use_bias
        self._mode = check_mode(mode)
        self._mem_len = predict_mem_len
        self._blockwise_min_len = float("inf") if blockwise_min_len is None else blockwise_min_len
        self._block_len = BLOCKWISE_BLOCK_LEN
        self._ring_chunk_len = RING_CHUNK_LEN  # queries per chunk of a ring round
        if mode == "predict":
            if not causal:
                raise ValueError("SelfAttention: predict mode needs causal=True")
            if chunk_len is not None and predict_mem_len < (n_chunks_before + 1) * chunk_len:
                raise ValueError(
                    f"SelfAttention: predict_mem_len={predict_mem_len} must be at least "
                    f"(n_chunks_before + 1) * chunk_len = {(n_chunks_before + 1) * chunk_len}"
                )

    # -- weights --------------------------------------------------------------------------
    def init_weights_and_state(self, input_signature, rng):
        x_sig = input_signature[0] if self._masked else input_signature
        d_model = x_sig.shape[-1]
        h = self._n_heads
        keys = jax.random.split(rng, 4)
        dims = {"wq": h * self._d_qk, "wk": h * self._d_qk, "wv": h * self._d_v}
        weights = {
            name: init_lib.glorot_uniform(key, (d_model, d))
            for (name, d), key in zip(dims.items(), keys)
        }
        weights["wo"] = init_lib.glorot_uniform(keys[3], (h * self._d_v, d_model))
        if self._use_bias:
            for name, d in dims.items():
                weights["b" + name[1]] = jnp.zeros((d,))
            weights["bo"] = jnp.zeros((d_model,))
        state = EMPTY
        if self._mode == "predict":
            batch = x_sig.shape[0]
            k = kv_cache.new_ring(batch, h, self._mem_len, self._d_qk, x_sig.dtype)
            state = {
                "k": k,
                "v": kv_cache.new_ring(batch, h, self._mem_len, self._d_v, x_sig.dtype),
                "k_valid": jnp.zeros((batch, k.shape[2]), bool),
                "position": jnp.zeros((), jnp.int32),
            }
        return weights, state

    def pack_for_decoding(self, weights, dtype: str):
        """These weights with the four kernels as PackedKernels (see `core.pack_kernel`)."""
        kernels = {name: pack_kernel(weights[name], dtype) for name in ("wq", "wk", "wv", "wo")}
        return {**weights, **kernels}

    def predict_context(self) -> int | None:
        """Full attention in predict mode: `predict_mem_len` (beyond it the ring slides); local
        attention sees its chunks exactly at any length."""
        return self._mem_len if self._mode == "predict" and self._chunk_len is None else None

    def _project(self, x, weights, name):
        y = matmul(x, weights["w" + name])
        if self._use_bias:
            y = y + lax.broadcast_to_rank(weights["b" + name], y.ndim)
        return y

    # -- forward --------------------------------------------------------------------------
    def apply(self, x, weights, state, rng):
        x, mask = as_items(x, self.n_in, self.name) if self._masked else (x, None)
        if x.ndim != 3:
            raise ValueError(f"{self.name}: expected x of shape (batch, length, d_model), "
                             f"got {tuple(x.shape)}")
        check_feature_dim(x, weights["wq"].shape[-2], self.name)
        rng_attn, rng_out = (None, None) if rng is None else jax.random.split(rng)
        q = split_heads(self._project(x, weights, "q"), self._n_heads)
        k = split_heads(self._project(x, weights, "k"), self._n_heads)
        v = split_heads(self._project(x, weights, "v"), self._n_heads)
        if self._mode == "predict":
            out, state = self._attend_cached(q, k, v, mask, state)
        else:
            out = self._attend(q, k, v, mask, rng_attn)
        y = matmul(merge_heads(out), weights["wo"])
        if self._use_bias:
            y = y + lax.broadcast_to_rank(weights["bo"], y.ndim)
        y = dropout(y, self._output_dropout, rng_out, self._mode)
        return ((y, mask) if self._masked else y), state

    def _attend(self, q, k, v, mask, rng):
        if sequence_shards() > 1:
            return self._attend_over_sequence(q, k, v, mask, rng)
        length = q.shape[2]
        common = dict(dropout_rate=self._attention_dropout, rng=rng, mode=self._mode)
        if self._chunk_len is None or self._chunk_len >= length:
            if length >= self._blockwise_min_len:
                return blockwise_attention(
                    q, k, v, None if mask is None else mask.astype(bool)[:, None, :],
                    causal=self._causal, block_len=self._block_len,
                    dropout_rate=self._attention_dropout if self._mode == "train" else 0.0,
                    dropout_rng=rng)
            pos = jnp.arange(length)
            allowed = position_mask(pos, pos, self._causal)
            if mask is not None:
                allowed = allowed[None, None] & mask[:, None, None, :].astype(bool)
            return dot_product_attention(q, k, v, allowed, **common)
        pad = -length % self._chunk_len
        key_mask = jnp.ones((q.shape[0], length), bool) if mask is None else mask.astype(bool)
        if pad:
            padding = [(0, 0), (0, 0), (0, pad), (0, 0)]
            q, k, v = (jnp.pad(a, padding) for a in (q, k, v))
            key_mask = jnp.pad(key_mask, [(0, 0), (0, pad)])
        out = local_attention(
            q, k, v, self._chunk_len, self._n_before, self._n_after, self._causal,
            key_mask=key_mask if (pad or mask is not None) else None, **common,
        )
        return out[:, :, :length]

    def _attend_over_sequence(self, q, k, v, mask, rng):
        """`_attend` with the length split over the mesh's ``sequence`` axis."""
        mesh = jax.sharding.get_abstract_mesh()
        rate = self._attention_dropout if self._mode == "train" else 0.0
        if rate > 0.0 and rng is None:
            raise ValueError("Dropout in train mode needs an rng; pass rng= to apply")
        common = dict(causal=self._causal, key_mask=None if mask is None else mask.astype(bool),
                      dropout_rate=rate, dropout_rng=rng)
        if self._chunk_len is None or self._chunk_len >= q.shape[2]:
            return ring_attention(q, k, v, mesh, chunk_len=self._ring_chunk_len, **common)
        return halo_attention(q, k, v, mesh, chunk_len=self._chunk_len,
                              n_chunks_before=self._n_before, n_chunks_after=self._n_after,
                              **common)

    def _attend_cached(self, q, k, v, mask, state):
        n_new = q.shape[2]
        if n_new > self._mem_len:
            raise ValueError(
                f"{self.name}: {n_new} tokens in one predict call exceed "
                f"predict_mem_len={self._mem_len}; feed the prompt in smaller chunks"
            )
        start = state["position"]
        new_valid = jnp.ones((q.shape[0], n_new), bool) if mask is None else mask.astype(bool)
        state = dict(state)
        state["k_valid"] = kv_cache.ring_write(state["k_valid"], new_valid, start, axis=1)
        state["position"] = start + n_new
        q_pos = start + jnp.arange(n_new)
        lo = jnp.maximum(start - self._mem_len + 1, 0)
        if self._chunk_len is not None:
            lo = jnp.maximum(lo, (start // self._chunk_len - self._n_before) * self._chunk_len)

        def key_mask(k_pos, slot0, block_len):
            allowed = kv_cache.window_mask(q_pos, k_pos, self._mem_len, self._chunk_len,
                                           self._n_before)
            valid = lax.dynamic_slice_in_dim(state["k_valid"], slot0, block_len, axis=1)
            return allowed[None, None] & valid[:, None, None, :]

        out, state["k"], state["v"] = kv_cache.cached_attention(
            q, q_pos, k, v, state["k"], state["v"], key_mask, lo,
            kv_cache.ring_layout(self._mem_len)[1])
        return out, state


class RingSelfAttention(SelfAttention):
    """Full multi-head self-attention by ring attention over the mesh's ``sequence`` axis:
    (batch, length, d_model) -> same (``attention_type='ring'``).

    `SelfAttention`'s full attention, which on a mesh with a ``sequence`` axis of several
    devices already runs `ring.ring_attention` (each device keeps its shard of the positions,
    only keys and values travel); without one (one device, decoding) it is the one-device
    full attention, with the same weights and result. This name sets the queries per chunk
    within a ring round.

    Args: as `SelfAttention` (no chunking), plus ``chunk_len`` (queries per chunk within a
    ring round).
    """

    def __init__(self, n_heads: int = 2, d_qk: int = 64, d_v: int = 64, causal: bool = False,
                 masked: bool = False, attention_dropout: float = 0.0,
                 output_dropout: float = 0.0, use_bias: bool = False, mode: str = "train",
                 predict_mem_len: int = 2048, chunk_len: int = RING_CHUNK_LEN):
        super().__init__(n_heads=n_heads, d_qk=d_qk, d_v=d_v, causal=causal, masked=masked,
                         attention_dropout=attention_dropout, output_dropout=output_dropout,
                         use_bias=use_bias, mode=mode, predict_mem_len=predict_mem_len)
        if chunk_len < 1:
            raise ValueError(f"RingSelfAttention: chunk_len must be >= 1, got {chunk_len}")
        self._ring_chunk_len = chunk_len


def CausalAttention(  # noqa: N802
    d_feature: int,
    n_heads: int = 1,
    dropout: float = 0.0,
    max_inference_length: int = 2048,
    mode: str = "train",
    blockwise_min_len: int | None = BLOCKWISE_MIN_LEN,
) -> SelfAttention:
    """Trax's CausalAttention: full causal multi-head attention with biases.

    (batch, length, d_feature) -> same; heads of width d_feature // n_heads.
    `blockwise_min_len`: as `SelfAttention`'s.
    """
    if d_feature % n_heads:
        raise ValueError(
            f"CausalAttention: d_feature={d_feature} must be divisible by n_heads={n_heads}"
        )
    d_head = d_feature // n_heads
    return SelfAttention(
        n_heads=n_heads, d_qk=d_head, d_v=d_head, causal=True, attention_dropout=dropout,
        output_dropout=0.0, use_bias=True, mode=mode, predict_mem_len=max_inference_length,
        blockwise_min_len=blockwise_min_len,
    )
