"""Terraformer (Jaszczur et al. 2021, "Sparse is Enough in Scaling Transformers").

The Reformer's reversible backbone with sparse dense layers: sparse QKV projections
(multiplicative modular dense + causal local convolution) in attention, and a
controller-gated feed-forward with one active unit per block, so that decoding a token reads
about `1 / ff_sparsity` of the feed-forward weights. `TerraformerLM` is `ReformerLM` with
those layers (`sparse_layers`) and its two streams averaged before the output layer; the
encoder-decoder `Terraformer` (in `encoder_decoder`) takes the same `sparse_layers`.
"""

from __future__ import annotations

import functools

from terraformer import layers as tl
from terraformer.layers.sparsity import MultiplicativeConvCausalAttention, SparseFF
from terraformer.models.reformer import ReformerLM


def sparse_feed_forward(ff_sparsity: int, d_lowrank: int = 64, temperature: float = 0.1,
                        quant_prob: float = 0.3, ff_chunk_size: int = 0):
    """A `feed_forward_type` for ReformerLM: pre-norm SparseFF, blocks of `ff_sparsity` units."""

    def make(d_ff, dropout=0.0, mode="train"):
        sparse = SparseFF(d_ff, n_elements_in_block=ff_sparsity, d_lowrank=d_lowrank,
                          temperature=temperature, quant_prob=quant_prob, dropout_rate=dropout,
                          ff_chunk_size=ff_chunk_size, mode=mode)
        return tl.Serial(tl.LayerNorm(), sparse, name="SparseFeedForward")

    return make


def sparse_qkv_attention(attention_sparsity: int = 16, length_kernel_size: int = 3,
                         kernel_size: int = 3, output_layer_type: str = "none"):
    """An `attention_type`: causal attention whose Q/K/V use the sparse QKV layers.

    `output_layer_type`: what follows the heads ('none', Trax's default; 'mult', 'conv',
    'multconv' or 'dense'; see `MultiplicativeConvCausalAttention`).
    """
    return functools.partial(MultiplicativeConvCausalAttention, sparsity=attention_sparsity,
                             length_kernel_size=length_kernel_size, kernel_size=kernel_size,
                             output_layer_type=output_layer_type)


def sparse_layers(attention_type, *, attention_sparsity: int, length_kernel_size: int,
                  ff_sparsity: int, d_lowrank: int, temperature: float, quant_prob: float,
                  ff_chunk_size: int) -> dict:
    """The Terraformer's choices as Reformer arguments: `attention_type`, `feed_forward_type`
    and `ff_chunk_size`.

    `attention_type=None` becomes sparse-QKV attention; `ff_sparsity > 0` the sparse
    feed-forward, which chunks itself over `ff_chunk_size` positions (so the Reformer's own
    chunking is 0); `ff_sparsity=0` keeps the dense feed-forward chunked by `ff_chunk_size`.
    """
    if attention_type is None:
        attention_type = sparse_qkv_attention(attention_sparsity, length_kernel_size)
    if not ff_sparsity:
        return dict(attention_type=attention_type, feed_forward_type=None,
                    ff_chunk_size=ff_chunk_size)
    feed_forward_type = sparse_feed_forward(ff_sparsity, d_lowrank, temperature, quant_prob,
                                            ff_chunk_size)
    return dict(attention_type=attention_type, feed_forward_type=feed_forward_type,
                ff_chunk_size=0)


def TerraformerLM(  # noqa: N802
    vocab_size: int,
    d_model: int = 512,
    d_ff: int = 2048,
    d_attention_key: int = 64,
    d_attention_value: int = 64,
    n_layers: int = 6,
    n_heads: int = 8,
    dropout: float = 0.1,
    max_len: int = 2048,
    attention_type=None,
    attention_sparsity: int = 16,
    length_kernel_size: int = 3,
    ff_sparsity: int = 64,
    d_lowrank: int = 64,
    temperature: float = 0.1,
    quant_prob: float = 0.3,
    ff_chunk_size: int = 0,
    pos_type: str | None = "fixed-base",
    pos_axial_shape=(),
    pos_d_axial_embs=None,
    output_merge: str = "average",
    mode: str = "train",
) -> tl.Layer:
    """Decoder-only Terraformer: (tokens [batch, length]) -> (log-probs [..., vocab_size]).

    Args (beyond ReformerLM's):
      attention_type: defaults to sparse-QKV causal attention with `attention_sparsity`
        modules and a causal convolution of `length_kernel_size` positions; an LSH or local
        attention constructor may be given instead (or a list, cycled over layers).
      ff_sparsity: units per block of the sparse feed-forward (one active per block);
        0 gives the dense feed-forward.
      d_lowrank, temperature, quant_prob: the controller's rank and its Gumbel-softmax
        training (see `SparseFF`).
      output_merge: 'average' (default, as trax's Terraformer ends its decoder) or
        'concatenate' (trax's ReformerLM built with `ff_sparsity` and sparse-QKV attention,
        trax's decoder-only Terraformer: import its checkpoints with this and
        `d_lowrank = d_ff / ff_sparsity`, the value trax derives).
    """
    sparse = sparse_layers(attention_type, attention_sparsity=attention_sparsity,
                           length_kernel_size=length_kernel_size, ff_sparsity=ff_sparsity,
                           d_lowrank=d_lowrank, temperature=temperature, quant_prob=quant_prob,
                           ff_chunk_size=ff_chunk_size)
    return ReformerLM(
        vocab_size, d_model=d_model, d_ff=d_ff, d_attention_key=d_attention_key,
        d_attention_value=d_attention_value, n_layers=n_layers, n_heads=n_heads,
        dropout=dropout, max_len=max_len, pos_type=pos_type, pos_axial_shape=pos_axial_shape,
        pos_d_axial_embs=pos_d_axial_embs, output_merge=output_merge, mode=mode, **sparse,
    )
