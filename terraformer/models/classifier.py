"""A sequence classifier with any attention mechanism: the shared model of the Long Range Arena
(its efficiency table and ListOps).

    tokens ──► Branch(Embedding, Dropout, positions | padding mask)        # x, mask
           ──► n_layers x [x + Attention(LayerNorm(x)), x + FeedForward(x)] # x, mask
           ──► LayerNorm, mean over the real (non-padding) positions        # [batch, d_model]
           ──► Dense(n_classes), LogSoftmax                                 # [batch, n_classes]

The attention is bidirectional (``causal=False``). A mechanism that takes a padding mask
(``masked=`` as `SelfAttention`, or ``use_mask=`` as `LSHSelfAttention`) gets one, so that no
real position attends to padding; one that takes none sees the padding as tokens, and only the
pooling leaves it out.
"""

from __future__ import annotations

import inspect

import jax.numpy as jnp

from terraformer import layers as tl
from terraformer.checks import check_choice, check_int
from terraformer.layers.attention_types import attention_constructor
from terraformer.layers.feedforward import FeedForward
from terraformer.models.stack import attention_per_layer

__all__ = ["Classifier", "masked_mean"]


def masked_mean(x, mask):
    """Mean of ``x [batch, length, d]`` over the positions where ``mask [batch, length]`` is
    true: ``[batch, d]`` (zeros for a row with no real position)."""
    weights = mask.astype(x.dtype)[..., None]
    total = jnp.sum(x * weights, axis=1)
    return total / jnp.maximum(jnp.sum(weights, axis=1), jnp.asarray(1.0, x.dtype))


def _parameters(constructor) -> dict:
    try:
        return dict(inspect.signature(constructor).parameters)
    except (TypeError, ValueError):  # a builtin or C callable: nothing to read
        return {}


def _attention_block(attention_type, d_model: int, n_heads: int, dropout: float,
                     mode: str, max_len: int) -> tl.Layer:
    """(x, mask) -> (x + attention(LayerNorm(x)), mask), the mask passed to the mechanism when
    it takes one, and the classifier's `max_len` to a mechanism whose weights are sized by the
    longest input (Linformer's projections, Synthesizer's scores, Sinkhorn's sorting net)."""
    constructor = attention_constructor(attention_type)
    params = _parameters(constructor)
    if "d_feature" in params:
        raise ValueError(f"Classifier: attention_type {attention_type!r} is causal only (the "
                         "Transformer convention); give a Reformer-convention layer or a name")
    kwargs = dict(n_heads=n_heads, d_qk=d_model // n_heads, d_v=d_model // n_heads,
                  causal=False, output_dropout=dropout, mode=mode)
    # 'masked': (x, mask) -> (y, mask), as SelfAttention; 'use_mask': (x, mask) -> y, as LSH.
    mask_arg = next((name for name in ("masked", "use_mask") if name in params), None)
    if mask_arg is not None:
        kwargs[mask_arg] = True
    kwargs.update({name: max_len for name in ("max_len", "max_length") if name in params})
    attention = constructor(**kwargs)
    if mask_arg is None:                          # x mask -> x x mask
        before, after = tl.Select([0, 0, 1], n_in=2), []
    else:                                         # x mask -> x mask x mask
        before = tl.Select([0, 1, 0, 1], n_in=2)
        # (x, mask) -> (y, mask) leaves y mask x mask: drop the second mask.
        after = [tl.Select([0, 2, 3], n_in=4)] if attention.n_out == 2 else []
    return tl.Serial(before, tl.LayerNorm(), attention, after, tl.Add(), name="AttentionBlock")


def Classifier(  # noqa: N802
    vocab_size: int,
    n_classes: int = 10,
    d_model: int = 256,
    d_ff: int = 1024,
    n_layers: int = 4,
    n_heads: int = 4,
    attention_type="full",
    max_len: int = 2048,
    dropout: float = 0.1,
    pad_id: int = 0,
    ff_activation=tl.Relu,
    mode: str = "train",
) -> tl.Layer:
    """Encoder classifier: (tokens [batch, length] int32) -> (log-probs [batch, n_classes]).

    Position ``pad_id`` tokens are padding: left out of the mean pooling and masked in the
    attention of mechanisms that take a mask (see the module docstring). The training step
    takes labels ``[batch]`` as targets (a rank-1 target is one prediction per sequence).

    Args:
      vocab_size: input token ids in [0, vocab_size).
      attention_type: a name of `attention_types.ATTENTION_TYPES` ('full', 'lsh', 'performer',
        ...), a Reformer-convention constructor called as `f(n_heads=, d_qk=, d_v=,
        causal=False, output_dropout=, mode=)` with d_qk = d_v = d_model / n_heads, or a list
        of either, cycled over the layers.
      max_len: the longest input (sinusoidal positions, and the size of the weights of
        mechanisms that have one per position: Linformer, Synthesizer, Sinkhorn).
      mode: 'train' or 'eval'.
    """
    who = "Classifier"
    check_int("vocab_size", vocab_size, 1, who)
    check_int("n_classes", n_classes, 2, who)
    check_int("n_layers", n_layers, 0, who)
    check_int("n_heads", n_heads, 1, who)
    check_choice("mode", mode, ("train", "eval"), who)
    if d_model % n_heads:
        raise ValueError(f"{who}: d_model must be a multiple of n_heads, got d_model={d_model} "
                         f"and n_heads={n_heads}")
    blocks = [
        tl.Serial(
            _attention_block(attn, d_model, n_heads, dropout, mode, max_len),
            tl.Residual(FeedForward(d_ff, dropout=dropout, activation=ff_activation, mode=mode)),
            name="EncoderBlock",
        )
        for attn in attention_per_layer(attention_type, n_layers)
    ]
    return tl.Serial(
        tl.Branch(
            tl.Serial(tl.Embedding(vocab_size, d_model), tl.Dropout(dropout, mode=mode),
                      tl.PositionalEncoding(max_len=max_len, mode=mode)),
            tl.PureLayer(lambda tokens: tokens != pad_id, name="PaddingMask"),
        ),                                                             # x mask
        blocks,
        tl.LayerNorm(),
        tl.PureLayer(masked_mean, n_in=2, name="MaskedMean"),          # [batch, d_model]
        tl.Dense(n_classes),
        tl.LogSoftmax(),
        name="Classifier",
    )
