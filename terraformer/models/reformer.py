"""Reformer: reversible blocks with LSH or chunked attention and chunked feed-forward.

`ReformerLM` is decoder-only; `Reformer` is the encoder-decoder. Both keep two copies of the
activations (x1, x2) through a reversible stack, so the backward pass rebuilds activations
instead of storing them, and memory does not grow with depth.
"""

from __future__ import annotations

import functools
import inspect

from terraformer import layers as tl
from terraformer.layers.attention import SelfAttention
from terraformer.layers.feedforward import FeedForward
from terraformer.layers.lsh import LSHSelfAttention
from terraformer.layers.positional import AxialPositionalEncoding
from terraformer.layers.reversible import (
    ReversibleHalfResidual,
    ReversibleRepeat,
    ReversibleSerial,
    ReversibleSwap,
)


def attention_per_layer(attention_type, n_layers: int) -> list:
    """One attention constructor per layer from a constructor or a list cycled over layers."""
    if isinstance(attention_type, (list, tuple)):
        if not attention_type:
            raise ValueError("attention_type: an empty list; give at least one layer type")
        return [attention_type[i % len(attention_type)] for i in range(n_layers)]
    return [attention_type] * n_layers


def positional_encoding(pos_type, d_model, max_len, pos_axial_shape, pos_d_axial_embs, dropout,
                        mode) -> list:
    """The positional layer named by `pos_type`: 'axial', 'fixed-base' (sinusoids) or None."""
    if pos_type is None or pos_type == "none":
        return []
    if pos_type == "axial":
        shape = tuple(pos_axial_shape) if pos_axial_shape else None
        embs = tuple(pos_d_axial_embs) if pos_d_axial_embs else None
        if not shape or not embs:
            raise ValueError(
                "pos_type='axial' needs pos_axial_shape and pos_d_axial_embs, got "
                f"{pos_axial_shape!r} and {pos_d_axial_embs!r}"
            )
        return [AxialPositionalEncoding(shape=shape, d_embs=embs, dropout=dropout, mode=mode)]
    if pos_type in ("fixed-base", "sin-cos"):
        return [tl.PositionalEncoding(max_len=max_len, dropout=dropout, mode=mode)]
    raise ValueError(f"pos_type must be 'axial', 'fixed-base' or None, got {pos_type!r}")


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


def build_attention(attention_type, *, d_model, n_heads, d_qk, d_v, causal, dropout, max_len,
                    mode) -> tl.Layer:
    """Calls an attention constructor with the arguments its convention takes.

    Two conventions exist, as in Trax: Reformer-style layers take
    `(n_heads=, d_qk=, d_v=, causal=, output_dropout=, mode=)`; Transformer-style layers take
    `(d_feature=, n_heads=, dropout=, max_inference_length=, mode=)` and are always causal.
    """
    params = inspect.signature(attention_type).parameters
    if "d_feature" in params:
        if not causal:
            raise ValueError(f"{attention_type!r} is causal only; use it in a decoder")
        return attention_type(d_feature=d_model, n_heads=n_heads, dropout=dropout,
                              max_inference_length=max_len, mode=mode)
    return attention_type(n_heads=n_heads, d_qk=d_qk, d_v=d_v, causal=causal,
                          output_dropout=dropout, mode=mode)


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
    attention_type=LSHSelfAttention,
    pos_type: str | None = "fixed-base",
    pos_axial_shape=(),
    pos_d_axial_embs=None,
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
        n_chunks_before=1)`; or a list of them, cycled over the layers.
      pos_type: 'axial' (with `pos_axial_shape`, `pos_d_axial_embs` summing to d_model),
        'fixed-base' (sinusoids up to max_len) or None.
      ff_chunk_size: run the feed-forward over chunks of this many positions (0: whole).
      feed_forward_type: optional constructor `f(d_ff, dropout=, mode=)` replacing the dense
        feed-forward (e.g. a sparse one).
      output_merge: how the two reversible streams meet the output layer: 'concatenate'
        (Trax's ReformerLM: LayerNorm and Dense over 2 * d_model) or 'average' (Trax's
        Terraformer: (x1 + x2) / 2, half the output layer's weights to read when decoding).
    When every layer has the same attention type, the blocks share one compiled body through
    `ReversibleRepeat` (weights stacked on a leading layer axis), keeping compile time flat in
    depth.
    """
    ff_dropout = dropout if ff_dropout is None else ff_dropout

    def block(attn_type):
        attention = build_attention(attn_type, d_model=d_model, n_heads=n_heads,
                                    d_qk=d_attention_key, d_v=d_attention_value, causal=True,
                                    dropout=dropout, max_len=max_len, mode=mode)
        if feed_forward_type is not None:
            ff = feed_forward_type(d_ff, dropout=ff_dropout, mode=mode)
        else:
            ff = FeedForward(d_ff, dropout=ff_dropout, activation=ff_activation, mode=mode)
        ff = tl.Chunk(ff, ff_chunk_size) if ff_chunk_size else ff
        return ReversibleDecoderBlock(attention, ff, dropout, mode)

    if isinstance(attention_type, (list, tuple)) and len(set(attention_type)) > 1:
        blocks = ReversibleSerial(
            [block(a) for a in attention_per_layer(attention_type, n_layers)])
    else:
        single = attention_type[0] if isinstance(attention_type, (list, tuple)) else attention_type
        blocks = ReversibleRepeat(block(single), n_layers, mode=mode)

    return tl.Serial(
        tl.ShiftRight(mode=mode),
        tl.Embedding(vocab_size, d_model),
        tl.Dropout(dropout, mode=mode),
        positional_encoding(pos_type, d_model, max_len, pos_axial_shape, pos_d_axial_embs,
                            dropout, mode),
        tl.Dup(),
        blocks,
        _merge_streams(output_merge),
        tl.LayerNorm(),
        tl.Dense(vocab_size),
        tl.LogSoftmax(),
        name="ReformerLM",
    )


def _merge_streams(output_merge: str) -> tl.Layer:
    if output_merge == "concatenate":
        return tl.Concatenate()
    if output_merge == "average":
        return tl.Fn("XYAvg", lambda x1, x2: (x1 + x2) / 2)
    raise ValueError(f"output_merge must be 'concatenate' or 'average', got {output_merge!r}")


def LocalAttention(chunk_len: int = 128, n_chunks_before: int = 1):  # noqa: N802
    """A constructor for chunked local self-attention, usable as `attention_type`."""
    return functools.partial(SelfAttention, chunk_len=chunk_len, n_chunks_before=n_chunks_before)
