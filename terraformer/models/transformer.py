"""The dense baseline: a decoder-only Transformer language model (pre-norm, as in Trax)."""

from __future__ import annotations

from terraformer import layers as tl
from terraformer.checks import check_int
from terraformer.layers.attention import CausalAttention
from terraformer.layers.feedforward import FeedForward
from terraformer.models.stack import attention_per_layer, build_attention, positional_encoding


def DecoderBlock(  # noqa: N802
    d_model: int, d_ff: int, n_heads: int, dropout: float, max_len: int, mode: str,
    ff_activation=tl.Relu, dropout_shared_axes=None, attention_type=CausalAttention,
) -> tl.Layer:
    """Pre-norm residual attention then residual feed-forward: (x) -> (x').

    `attention_type`: as `TransformerLM`'s (one constructor or name), built causal.
    """
    return tl.Serial(
        tl.Residual(
            tl.LayerNorm(),
            build_attention(attention_type, d_model=d_model, n_heads=n_heads,
                            d_qk=d_model // n_heads, d_v=d_model // n_heads, causal=True,
                            dropout=dropout, max_len=max_len, mode=mode),
            tl.Dropout(dropout, shared_axes=dropout_shared_axes, mode=mode),
        ),
        tl.Residual(
            FeedForward(d_ff, dropout=dropout, activation=ff_activation,
                        dropout_shared_axes=dropout_shared_axes, mode=mode),
        ),
        name="DecoderBlock",
    )


def TransformerLM(  # noqa: N802
    vocab_size: int,
    d_model: int = 512,
    d_ff: int = 2048,
    n_layers: int = 6,
    n_heads: int = 8,
    max_len: int = 2048,
    dropout: float = 0.1,
    dropout_shared_axes=None,
    mode: str = "train",
    ff_activation=tl.Relu,
    attention_type=CausalAttention,
    pos_type: str | None = None,
) -> tl.Layer:
    """Decoder-only Transformer: (tokens [batch, length]) -> (log-probs [batch, length, vocab]).

    The model shifts its input right, so targets equal inputs (Trax convention). In `predict`
    mode it takes the previous token(s) and keeps key/value caches of `max_len` positions.
    Positions: trax's trainable [max_len, d_model] table initialised with interleaved
    sinusoids (`pos_type=None`); `pos_type` (ours; trax's TransformerLM has none) takes any
    name of `stack.positional_encoding`, e.g. 'sinusoidal' for fixed sinusoids.

    `attention_type`: `CausalAttention` (the default: full causal attention, as Trax's), a
    name of `attention_types.ATTENTION_TYPES` ('lsh', 'performer', ...), a Reformer-convention
    constructor (called with `causal=True`, d_qk = d_v = d_model / n_heads), or a list of
    them cycled over the layers.
    """
    check_int("n_layers", n_layers, 0, "TransformerLM")
    return tl.Serial(
        tl.ShiftRight(mode=mode),
        tl.Embedding(vocab_size, d_model),
        tl.Dropout(dropout, shared_axes=dropout_shared_axes, mode=mode),
        positional_encoding(pos_type, d_model, max_len, None, None, 0.0, mode),
        [
            DecoderBlock(d_model, d_ff, n_heads, dropout, max_len, mode, ff_activation,
                         dropout_shared_axes, attention)
            for attention in attention_per_layer(attention_type, n_layers)
        ],
        tl.LayerNorm(),
        tl.Dense(vocab_size),
        tl.LogSoftmax(),
        name="TransformerLM",
    )
