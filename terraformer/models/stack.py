"""The pieces every model stacks: attention and feed-forward per layer, positions, the
reversible stack of blocks and the merge of its two streams.

A reversible model (ReformerLM, TerraformerLM and both halves of the encoder-decoder) reads::

    Embedding, Dropout, positional_encoding(...), Dup      # x1 x2
    reversible_stack(block, attention_type, n_layers)      # n_layers blocks on (x1, x2)
    merge_streams(output_merge)                            # x
    LayerNorm, Dense(vocab), LogSoftmax

and each model file writes only its blocks; this module builds the rest the same way for all.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from terraformer import layers as tl
from terraformer.checks import check_choice, check_int
from terraformer.layers.attention_types import attention_constructor
from terraformer.layers.feedforward import FeedForward
from terraformer.layers.positional import (
    AxialPositionalEncoding,
    FixedBasePositionalEncoding,
    PositionalEncoding,
    SinCosPositionalEncoding,
)
from terraformer.layers.reversible import ReversibleRepeat, ReversibleSerial

MERGES = ("concatenate", "average")


def attention_per_layer(attention_type, n_layers: int) -> list:
    """One attention constructor per layer from a constructor or a list cycled over layers.

    A name (`'lsh'`, `'performer'`, ...) stands for its constructor in `ATTENTION_TYPES`.
    """
    if isinstance(attention_type, (list, tuple)):
        if not attention_type:
            raise ValueError("attention_type: an empty list; give at least one layer type")
        constructors = [attention_constructor(t) for t in attention_type]
        return [constructors[i % len(constructors)] for i in range(n_layers)]
    return [attention_constructor(attention_type)] * n_layers


def build_attention(attention_type, *, d_model, n_heads, d_qk, d_v, causal, dropout, max_len,
                    mode) -> tl.Layer:
    """Calls an attention constructor with the arguments its convention takes.

    Two conventions exist, as in Trax: Reformer-style layers take
    `(n_heads=, d_qk=, d_v=, causal=, output_dropout=, mode=)`; Transformer-style layers take
    `(d_feature=, n_heads=, dropout=, max_inference_length=, mode=)` and are always causal.
    """
    attention_type = attention_constructor(attention_type)
    params = inspect.signature(attention_type).parameters
    if "d_feature" in params:
        if not causal:
            raise ValueError(f"{attention_type!r} is causal only; use it in a decoder")
        return attention_type(d_feature=d_model, n_heads=n_heads, dropout=dropout,
                              max_inference_length=max_len, mode=mode)
    return attention_type(n_heads=n_heads, d_qk=d_qk, d_v=d_v, causal=causal,
                          output_dropout=dropout, mode=mode)


POS_TYPES = (None, "sin-cos", "fixed-base", "no", "axial", "sinusoidal")


def positional_encoding(pos_type, d_model, max_len, pos_axial_shape, pos_d_axial_embs, dropout,
                        mode, start_from_zero_prob=1.0, max_offset_to_add=0) -> list:
    """The positional layer named by `pos_type`, under trax 1.4.1's names:

    - None: `PositionalEncoding`, a trainable [max_len, d_model] table initialised with
      interleaved sinusoids (with `dropout`, `start_from_zero_prob`, `max_offset_to_add`);
    - 'sin-cos': `SinCosPositionalEncoding` (fixed sinusoids from a random start in training);
    - 'fixed-base': `FixedBasePositionalEncoding` (digits in fixed bases, trainable vectors);
    - 'no': no positions;
    - 'axial': `AxialPositionalEncoding` (needs `pos_axial_shape`, `pos_d_axial_embs`; its
      dropout mask shared along all position axes, as trax's ReformerLM builds it);
    - 'sinusoidal' (ours, not trax's): fixed concatenated sinusoids, the same in every mode
      (`SinusoidalPositionalEncoding`).
    Returns a list (empty for 'no') to splice into a `Serial`.
    """
    if pos_type is None or pos_type == "":
        return [PositionalEncoding(max_len=max_len, dropout=dropout,
                                   start_from_zero_prob=start_from_zero_prob,
                                   max_offset_to_add=max_offset_to_add, mode=mode)]
    if pos_type in ("no", "none"):
        return []
    if pos_type == "axial":
        shape = tuple(pos_axial_shape) if pos_axial_shape else None
        embs = tuple(pos_d_axial_embs) if pos_d_axial_embs else None
        if not shape or not embs:
            raise ValueError(
                "pos_type='axial' needs pos_axial_shape and pos_d_axial_embs, got "
                f"{pos_axial_shape!r} and {pos_d_axial_embs!r}"
            )
        return [AxialPositionalEncoding(shape=shape, d_embs=embs, dropout=dropout,
                                        dropout_broadcast_dims=tuple(range(1, len(shape) + 1)),
                                        mode=mode)]
    if pos_type == "sin-cos":
        return [SinCosPositionalEncoding(mode=mode)]
    if pos_type == "fixed-base":
        return [FixedBasePositionalEncoding(mode=mode)]
    if pos_type == "sinusoidal":
        return [tl.SinusoidalPositionalEncoding(max_len=max_len, dropout=dropout, mode=mode)]
    raise ValueError(f"pos_type must be one of {POS_TYPES}, got {pos_type!r}")


def feed_forward_builder(d_ff: int, *, dropout: float, activation=tl.FastGelu,
                         ff_chunk_size: int = 0,
                         feed_forward_type=None) -> Callable[[str], tl.Layer]:
    """A function `mode -> layer` making one feed-forward block (x [b, l, d]) -> (y [b, l, d]).

    The block is `feed_forward_type(d_ff, dropout=, mode=)` when given, else the pre-norm dense
    `FeedForward(d_ff, dropout=, activation=, mode=)`; either runs over `ff_chunk_size`
    positions at a time when that is > 0 (`Chunk`, whose weights are the block's), so the
    `[batch, length, d_ff]` hidden activation is only ever `[batch, ff_chunk_size, d_ff]`.
    A function of the mode, because an encoder inside a predict-mode model runs in eval.
    """
    check_int("ff_chunk_size", ff_chunk_size, 0)

    def make(mode: str) -> tl.Layer:
        if feed_forward_type is not None:
            ff = feed_forward_type(d_ff, dropout=dropout, mode=mode)
        else:
            ff = FeedForward(d_ff, dropout=dropout, activation=activation, mode=mode)
        return tl.Chunk(ff, ff_chunk_size) if ff_chunk_size else ff

    return make


def reversible_stack(make_block: Callable, attention_type, n_layers: int, mode: str,
                     name: str = "n_layers"):
    """`n_layers` reversible blocks, `make_block(attention constructor)` each.

    When every layer gets the same constructor object (`attention_type` one constructor, or a
    list whose cycled entries are all the same object) the blocks share one compiled body:
    `ReversibleRepeat` with weights stacked on a leading layer axis, compile time flat in
    depth. Otherwise a `ReversibleSerial` of the blocks, weights a tuple with one entry per
    layer. No layers gives an empty list (nothing to splice into a `Serial`).
    """
    check_int(name, n_layers, 0)
    if n_layers == 0:
        return []
    per_layer = attention_per_layer(attention_type, n_layers)
    if all(t is per_layer[0] for t in per_layer):
        return ReversibleRepeat(make_block(per_layer[0]), n_layers, mode=mode)
    return ReversibleSerial([make_block(t) for t in per_layer])


def merge_streams(output_merge: str, name: str = "output_merge") -> tl.Layer:
    """How the two reversible streams become one: (x1, x2) -> (x).

    'concatenate': [..., 2 * d_model] (Trax's ReformerLM); 'average': (x1 + x2) / 2, half the
    output layer's weights to read when decoding (Trax's Terraformer).
    """
    check_choice(name, output_merge, MERGES)
    if output_merge == "concatenate":
        return tl.Concatenate()
    return tl.Fn("XYAvg", lambda x1, x2: (x1 + x2) / 2)


__all__ = ["attention_per_layer", "build_attention", "feed_forward_builder", "merge_streams",
           "positional_encoding", "reversible_stack"]
