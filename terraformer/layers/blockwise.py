"""Exact attention over key/value blocks (the FlashAttention algorithm) as a layer.

`BlockwiseAttention` is `SelfAttention`'s full attention computed by
`attention_core.blockwise_attention` at every length: the exact softmax, each block of queries
run over the blocks of keys with a running max and normaliser, and a backward pass that
recomputes each block from the saved log-sum-exp. Nothing of size length x length is ever
stored, so the memory of a layer grows linearly with the length. Its projections, weights and
predict-mode ring cache are `SelfAttention`'s (`kv_cache`), so decoding is unchanged.

`SelfAttention` itself (and so `CausalAttention` and `TransformerLM`) switches to the same
computation from `attention.BLOCKWISE_MIN_LEN` positions on.

On a mesh with a ``sequence`` axis of several devices, train and eval run it as ring attention
(`ring.ring_attention`, `SelfAttention`'s sequence-parallel path): each device keeps its shard
of the queries and computes the blockwise algorithm on its shard against each key/value shard
passed round the ring (chunks of ``block_len`` queries), merging the rounds by log-sum-exp.
The same layer and weights, so a model runs unchanged on one device or on the sequence axis.
"""

from __future__ import annotations

from terraformer.checks import check_int, check_rate
from terraformer.layers.attention import SelfAttention
from terraformer.layers.attention_core import BLOCKWISE_BLOCK_LEN, blockwise_attention
from terraformer.layers.base import check_mode


class BlockwiseAttention(SelfAttention):
    """Exact multi-head self-attention over key/value blocks: (batch, length, d_model) -> same.

    Args:
      n_heads, d_qk, d_v: heads and per-head widths of queries/keys and values.
      causal: mask future positions (needed by predict mode).
      masked: if True the layer takes (x, mask) with mask [batch, length] (True = real token)
        and returns (y, mask).
      block_len: query and key positions per block. Lengths that are not a multiple are padded
        inside (the padding is never attended to); a shorter sequence is one block.
      attention_dropout, output_dropout: dropout rates on attention weights / the output.
      use_bias: biases in the Q/K/V/output projections.
      predict_mem_len: size of the predict-mode key/value ring buffer (as `SelfAttention`).
    Weights: as `SelfAttention` ({'wq','wk','wv','wo'} (+ biases)).

    Complexity per head: time O(length² · d) (causal: the blocks above the diagonal are
    skipped, half of it); memory O(length · d + block_len²), against length² for the dense
    form. Decodes causally: predict mode attends over `SelfAttention`'s ring cache, one token
    or a chunk of the prompt per call.
    """

    def __init__(
        self,
        n_heads: int = 1,
        d_qk: int = 64,
        d_v: int = 64,
        causal: bool = False,
        masked: bool = False,
        block_len: int = BLOCKWISE_BLOCK_LEN,
        attention_dropout: float = 0.0,
        output_dropout: float = 0.0,
        use_bias: bool = False,
        mode: str = "train",
        predict_mem_len: int = 2048,
    ):
        who = "BlockwiseAttention"
        for name, value in (("n_heads", n_heads), ("d_qk", d_qk), ("d_v", d_v),
                            ("block_len", block_len), ("predict_mem_len", predict_mem_len)):
            check_int(name, value, 1, who)
        check_rate("attention_dropout", attention_dropout, who)
        check_rate("output_dropout", output_dropout, who)
        if check_mode(mode) == "predict" and not causal:
            raise ValueError(f"{who}: predict mode needs causal=True, got causal={causal!r}")
        super().__init__(n_heads=n_heads, d_qk=d_qk, d_v=d_v, causal=causal, masked=masked,
                         attention_dropout=attention_dropout, output_dropout=output_dropout,
                         use_bias=use_bias, mode=mode, predict_mem_len=predict_mem_len)
        self._blockwise_min_len, self._block_len = 1, block_len  # blockwise at every length
        # Over a sequence axis: ring attention, each round blockwise over chunks of block_len.
        self._ring_chunk_len = block_len


__all__ = ["BlockwiseAttention", "blockwise_attention"]
