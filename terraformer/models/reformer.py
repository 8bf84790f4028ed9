"""Reformer: reversible blocks with LSH or chunked attention and chunked feed-forward.

`ReformerLM` is decoder-only (the encoder-decoder `Reformer` is in `encoder_decoder`). It keeps
two copies of the activations (x1, x2) through a reversible stack, so the backward pass
rebuilds activations instead of storing them, and memory does not grow with depth::

    ShiftRight, Embedding, Dropout, positions, Dup                     # x1 x2
    n_layers x ReversibleSerial(
        ReversibleHalfResidual(LayerNorm, attention, Dropout), ReversibleSwap,
        ReversibleHalfResidual(feed-forward), ReversibleSwap)
    merge (concatenate or average), LayerNorm, Dense(vocab_size), LogSoftmax
"""

from __future__ import annotations

import functools

from terraformer import layers as tl
from terraformer.layers.attention import SelfAttention
from terraformer.layers.reversible import (
    ReversibleHalfResidual,
    ReversibleSerial,
    ReversibleSwap,
)
from terraformer.models.stack import (
    build_attention,
    feed_forward_builder,
    merge_streams,
    positional_encoding,
    reversible_stack,
)


def ReversibleDecoderBlock(  # noqa: N802
    attention: tl.Layer, feed_forward: tl.Layer, dropout: float, mode: str,
) -> tl.Layer:
    """(x1, x2) -> (x1 + A(x2), x2 + FF(x1 + A(x2))) as a reversible layer."""
    return ReversibleSerial(
        ReversibleHalfResidual(tl.LayerNorm(), attention, tl.Dropout(dropout, mode=mode)),
        ReversibleSwap(),
        ReversibleHalfResidual(feed_forward),
        ReversibleSwap(),
        name="ReversibleDecoderBlock",
    )


def ReformerLM(  # noqa: N802
    vocab_size: int,
    d_model: int = 512,
    d_ff: int = 2048,
    d_attention_key: int = 64,
    d_attention_value: int = 64,
    n_layers: int = 6,
    n_heads: int = 8,
    dropout: float = 0.1,
    max_len: int = 2048,
    attention_type=SelfAttention,
    pos_type: str | None = None,
    pos_axial_shape=(),
    pos_d_axial_embs=None,
    pos_start_from_zero_prob: float = 1.0,
    pos_max_offset_to_add: int = 0,
    ff_activation=tl.FastGelu,
    ff_chunk_size: int = 0,
    ff_dropout: float | None = None,
    feed_forward_type=None,
    output_merge: str = "concatenate",
    mode: str = "train",
) -> tl.Layer:
    """Reversible decoder-only language model (Trax's ReformerLM, same argument names).

    (tokens [batch, length] int32) -> (log-probs [batch, length, vocab_size]). Targets equal
    inputs: the model shifts right internally.

    Args:
      attention_type: a layer constructor called as
        `attention_type(n_heads=, d_qk=, d_v=, causal=True, output_dropout=, mode=)`, e.g.
        `LSHSelfAttention` or `functools.partial(SelfAttention, chunk_len=128,
        n_chunks_before=1)`; or a list of them, cycled over the layers. Default: trax's,
        `SelfAttention` (full attention unless a gin file binds `SelfAttention.chunk_len`).
      pos_type: trax's names (`stack.positional_encoding`): None (default: a trainable table
        initialised with interleaved sinusoids), 'sin-cos', 'fixed-base', 'no', 'axial' (with
        `pos_axial_shape`, `pos_d_axial_embs` summing to d_model); or ours, 'sinusoidal'
        (fixed concatenated sinusoids).
      pos_start_from_zero_prob, pos_max_offset_to_add: random starts of the pos_type=None
        table in training (trax's; the defaults always start at 0).
      ff_chunk_size: run the feed-forward over chunks of this many positions (0: whole).
      feed_forward_type: optional constructor `f(d_ff, dropout=, mode=)` replacing the dense
        feed-forward (e.g. a sparse one).
      output_merge: how the two reversible streams meet the output layer: 'concatenate'
        (Trax's ReformerLM: LayerNorm and Dense over 2 * d_model) or 'average' (Trax's
        Terraformer: (x1 + x2) / 2, half the output layer's weights to read when decoding).
    When every layer has the same attention type, the blocks share one compiled body through
    `ReversibleRepeat` (weights stacked on a leading layer axis), keeping compile time flat in
    depth (`stack.reversible_stack`).
    """
    feed_forward = feed_forward_builder(
        d_ff, dropout=dropout if ff_dropout is None else ff_dropout, activation=ff_activation,
        ff_chunk_size=ff_chunk_size, feed_forward_type=feed_forward_type)

    def block(attn_type):
        attention = build_attention(attn_type, d_model=d_model, n_heads=n_heads,
                                    d_qk=d_attention_key, d_v=d_attention_value, causal=True,
                                    dropout=dropout, max_len=max_len, mode=mode)
        return ReversibleDecoderBlock(attention, feed_forward(mode), dropout, mode)

    return tl.Serial(                                                  # tokens
        tl.ShiftRight(mode=mode),
        tl.Embedding(vocab_size, d_model),
        tl.Dropout(dropout, shared_axes=(-2,), mode=mode),  # trax's: one mask for all positions
        positional_encoding(pos_type, d_model, max_len, pos_axial_shape, pos_d_axial_embs,
                            dropout, mode, pos_start_from_zero_prob, pos_max_offset_to_add),
        tl.Dup(),                                                      # x1 x2
        reversible_stack(block, attention_type, n_layers, mode),
        merge_streams(output_merge),                                   # x
        tl.LayerNorm(),
        tl.Dense(vocab_size),
        tl.LogSoftmax(),
        name="ReformerLM",
    )


def LocalAttention(chunk_len: int = 128, n_chunks_before: int = 1):  # noqa: N802
    """A constructor for chunked local self-attention, usable as `attention_type`."""
    return functools.partial(SelfAttention, chunk_len=chunk_len, n_chunks_before=n_chunks_before)
