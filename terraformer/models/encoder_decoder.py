"""Encoder-decoder Reformer and Terraformer: a long input in, a sequence out.

    (input tokens [batch, Le], target tokens [batch, Ld]) -> log-probs [batch, Ld, vocab]

The architecture, top of stack first::

    Cache(encoder)               # tok_e tok_d          -> vec_e mask_e tok_d
      Branch(Serial(Embedding, Dropout, positions), PaddingMask)
      Dup                        #                         x1 x2 mask_e
      n_encoder_layers x ReversibleSerial(            # bidirectional, pads masked
          ReversibleHalfResidual(LayerNorm, attention(x2, mask_e)), ReversibleSwap,
          ReversibleHalfResidual(feed-forward), ReversibleSwap)
      (x1 + x2) / 2, LayerNorm   #                         vec_e mask_e
    Select([2, 0, 1])            #                         tok_d vec_e mask_e
    ShiftRight, Embedding, Dropout, positions, Dup      #  x1 x2 vec_e mask_e
    n_decoder_layers x ReversibleSerial(
        ReversibleHalfResidual(LayerNorm, causal self-attention), ReversibleSwap,
        ReversibleHalfResidual(LayerNorm, EncDecAttention(x2, vec_e, mask_e)), ReversibleSwap,
        ReversibleHalfResidual(feed-forward), ReversibleSwap)
    merge (average or concatenate), LayerNorm, Dense(output_vocab_size), LogSoftmax
    Select([0], n_in=3)          #                         log-probs

The encoder and its mask ride on the stack below the two reversible decoder streams: the
enc-dec half-residuals read them (`ReversibleHalfResidual` passes the items below x2 to its
residual function unchanged), and the reversible backward pass accumulates their gradients.
Token `pad_id` (0) in the input is padding: the encoder's self-attention and every enc-dec
attention ignore it (when the encoder attention takes a mask: `SelfAttention(masked=)` and
`LSHSelfAttention(use_mask=)` do). Targets equal the decoder's inputs: the model shifts them
right internally, so output position t predicts target t from the input and targets < t.

**Predict mode** (decoding). The model takes `(input tokens [batch, Le], decoder tokens
[batch, n])` at every call, `n >= 1` (usually 1), and returns log-probs `[batch, n, vocab]`
for the positions after those tokens. The decoder does not shift in predict mode: feed the
start token 0 first, then each chosen token, exactly as for the decoder-only models (the
outputs then equal the `eval` forward pass position by position). On the first call (after
`init`) the encoder runs on the input tokens and its output is kept (`Cache`), and each
`EncDecAttention` projects it to keys and values once and keeps those; later calls skip all of
this (`lax.cond`, so a jitted step pays for it only on the first call) and ignore the contents
of the input tokens they are given, which must keep the shape `[batch, Le]` the state was made
for. The encoder is built in `eval` mode inside a predict model (it is not causal and sees the
whole input at once). A new input needs a fresh state: `model.init((ShapeDtype((batch, Le),
int32), ShapeDtype((batch, 1), int32)), rng)` with the training init rng (LSH layers derive
their eval/predict hash rotations from it). Weights are the same pytree in every mode.
"""

from __future__ import annotations

import inspect

from terraformer import layers as tl
from terraformer.layers.attention import SelfAttention
from terraformer.layers.attention_types import attention_constructor
from terraformer.layers.base import check_mode
from terraformer.layers.encdec import Cache, EncDecAttention, PaddingMask
from terraformer.layers.lsh import LSHSelfAttention
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
from terraformer.models.terraformer import sparse_layers


def build_encoder_attention(attention_type, *, n_heads, d_qk, d_v, dropout, mode) -> tl.Layer:
    """A bidirectional self-attention layer for the encoder, taking the padding mask if it can.

    The constructor is called as `attention_type(n_heads=, d_qk=, d_v=, causal=False,
    output_dropout=, mode=, use_mask=True | masked=True)`: `use_mask` where it has that
    argument (`LSHSelfAttention`: `(x, mask) -> y`), else `masked` (`SelfAttention`:
    `(x, mask) -> (y, mask)`), else no mask (the layer then attends to padding too).
    Transformer-style constructors (taking `d_feature`) are causal only and rejected.
    """
    attention_type = attention_constructor(attention_type)
    params = inspect.signature(attention_type).parameters
    if "d_feature" in params:
        raise ValueError(
            f"encoder_attention_type: {attention_type!r} is causal only (it takes d_feature); "
            "the encoder needs a bidirectional layer such as LSHSelfAttention or SelfAttention"
        )
    kwargs = dict(n_heads=n_heads, d_qk=d_qk, d_v=d_v, causal=False, output_dropout=dropout,
                  mode=mode)
    if "use_mask" in params:
        kwargs["use_mask"] = True
    elif "masked" in params:
        kwargs["masked"] = True
    return attention_type(**kwargs)


def encoder_decoder(
    input_vocab_size: int,
    output_vocab_size: int | None,
    *,
    d_model: int,
    d_attention_key: int,
    d_attention_value: int,
    n_encoder_layers: int,
    n_decoder_layers: int,
    n_heads: int,
    dropout: float,
    max_len: int,
    encoder_attention_type,
    attention_type,
    encoder_decoder_attention_type,
    feed_forward,
    pos_type,
    pos_axial_shape,
    pos_d_axial_embs,
    output_merge: str,
    pad_id: int,
    mode: str,
    name: str,
) -> tl.Layer:
    """The reversible encoder-decoder shared by `Reformer` and `Terraformer` (module doc).

    `feed_forward(mode)` builds the feed-forward block (with its own LayerNorm) of one encoder
    or decoder layer (`stack.feed_forward_builder`).
    """
    mode = check_mode(mode)
    output_vocab_size = output_vocab_size or input_vocab_size
    enc_mode = "eval" if mode == "predict" else mode

    def encoder_block(attn_type):
        attention = build_encoder_attention(
            attn_type, n_heads=n_heads, d_qk=d_attention_key, d_v=d_attention_value,
            dropout=dropout, mode=enc_mode)
        return ReversibleSerial(
            ReversibleHalfResidual(tl.LayerNorm(), attention),
            ReversibleSwap(),
            ReversibleHalfResidual(feed_forward(enc_mode)),
            ReversibleSwap(),
            name="ReversibleEncoderBlock",
        )

    def decoder_block(attn_type):
        self_attention = build_attention(
            attn_type, d_model=d_model, n_heads=n_heads, d_qk=d_attention_key,
            d_v=d_attention_value, causal=True, dropout=dropout, max_len=max_len, mode=mode)
        cross_attention = encoder_decoder_attention_type(
            n_heads=n_heads, d_qk=d_attention_key, d_v=d_attention_value,
            attention_dropout=dropout, output_dropout=dropout, mode=mode)
        if cross_attention.n_in != 3:
            raise ValueError(
                "encoder_decoder_attention_type must build a layer taking (decoder_x, encoder, "
                f"encoder_mask), n_in=3; got n_in={cross_attention.n_in}"
            )
        return ReversibleSerial(                                   # x1 x2 vec_e mask_e
            ReversibleHalfResidual(tl.LayerNorm(), self_attention),
            ReversibleSwap(),
            ReversibleHalfResidual(tl.LayerNorm(), cross_attention),
            ReversibleSwap(),
            ReversibleHalfResidual(feed_forward(mode)),
            ReversibleSwap(),
            name="ReversibleEncoderDecoderBlock",
        )

    encoder = tl.Serial(                                           # tok_e
        tl.Branch(
            tl.Serial(
                tl.Embedding(input_vocab_size, d_model),
                tl.Dropout(dropout, mode=enc_mode),
                positional_encoding(pos_type, d_model, max_len, pos_axial_shape,
                                    pos_d_axial_embs, dropout, enc_mode),
            ),
            PaddingMask(pad_id),
        ),                                                         # vec_e mask_e
        tl.Dup(),                                                  # x1 x2 mask_e
        reversible_stack(encoder_block, encoder_attention_type, n_encoder_layers, enc_mode,
                         name="n_encoder_layers"),
        merge_streams("average"),                                  # vec_e mask_e
        tl.LayerNorm(),
        name="Encoder",
    )

    return tl.Serial(                                              # tok_e tok_d
        Cache(encoder, mode=mode),                                 # vec_e mask_e tok_d
        tl.Select([2, 0, 1]),                                      # tok_d vec_e mask_e
        tl.ShiftRight(mode=mode),
        tl.Embedding(output_vocab_size, d_model),
        tl.Dropout(dropout, mode=mode),
        positional_encoding(pos_type, d_model, max_len, pos_axial_shape, pos_d_axial_embs,
                            dropout, mode),                        # vec_d vec_e mask_e
        tl.Dup(),                                                  # x1 x2 vec_e mask_e
        reversible_stack(decoder_block, attention_type, n_decoder_layers, mode,
                         name="n_decoder_layers"),
        merge_streams(output_merge),                               # vec_d vec_e mask_e
        tl.LayerNorm(),
        tl.Dense(output_vocab_size),
        tl.LogSoftmax(),
        tl.Select([0], n_in=3),                                    # log-probs
        name=name,
    )


def Reformer(  # noqa: N802
    input_vocab_size: int,
    output_vocab_size: int | None = None,
    d_model: int = 512,
    d_ff: int = 2048,
    d_attention_key: int = 64,
    d_attention_value: int = 64,
    n_encoder_layers: int = 6,
    n_decoder_layers: int = 6,
    n_heads: int = 8,
    dropout: float = 0.1,
    max_len: int = 2048,
    encoder_attention_type=LSHSelfAttention,
    attention_type=SelfAttention,
    encoder_decoder_attention_type=EncDecAttention,
    pos_type: str | None = None,
    pos_axial_shape=(),
    pos_d_axial_embs=None,
    ff_activation=tl.FastGelu,
    ff_chunk_size: int = 0,
    ff_dropout: float | None = None,
    feed_forward_type=None,
    output_merge: str = "average",
    pad_id: int = 0,
    mode: str = "train",
) -> tl.Layer:
    """Reversible encoder-decoder Reformer: (inputs [b, Le], targets [b, Ld]) -> log-probs.

    Output: `[batch, Ld, output_vocab_size]` log-probabilities of the targets (shifted right
    internally). See the module docstring for the stack and the predict-mode contract.

    Args (Trax's names; those shared with `ReformerLM` mean the same):
      input_vocab_size, output_vocab_size: vocabularies of the inputs and targets
        (`output_vocab_size=None`: the same).
      n_encoder_layers, n_decoder_layers: reversible blocks in each half (0 allowed).
      encoder_attention_type: bidirectional encoder self-attention constructor (or a list
        cycled over layers), called by `build_encoder_attention`; default LSH attention.
      attention_type: the decoder's causal self-attention (as `ReformerLM`'s: called by
        `build_attention`, Reformer- or Transformer-style); default full causal
        `SelfAttention`, since the decoder side is usually short. A list cycles over layers.
      encoder_decoder_attention_type: the cross attention, called as `f(n_heads=, d_qk=,
        d_v=, attention_dropout=, output_dropout=, mode=)`, a layer `(x, encoder, mask) ->
        (y, ...)`; default `EncDecAttention`. (Trax's research Terraformer used this name for
        the decoder's attention because it had no cross attention; here it is the cross
        attention and `attention_type` is the decoder's.)
      pos_type, pos_axial_shape, pos_d_axial_embs: positions for both halves, under trax's
        names (`stack.positional_encoding`; default None, trax's trainable table); 'axial'
        needs a shape covering the longer of the two.
      ff_activation, ff_chunk_size, ff_dropout, feed_forward_type: the feed-forward blocks of
        both halves (`feed_forward_type(d_ff, dropout=, mode=)` replaces the dense one).
      output_merge: how the decoder's two streams meet the output layer: 'average' (Trax's
        Reformer) or 'concatenate'. The encoder always averages its streams.
      pad_id: the input token that is padding (masked in all attention on the encoder).
      mode: 'train', 'eval' or 'predict'.
    """
    feed_forward = feed_forward_builder(
        d_ff, dropout=dropout if ff_dropout is None else ff_dropout, activation=ff_activation,
        ff_chunk_size=ff_chunk_size, feed_forward_type=feed_forward_type)
    return encoder_decoder(
        input_vocab_size, output_vocab_size, d_model=d_model, d_attention_key=d_attention_key,
        d_attention_value=d_attention_value, n_encoder_layers=n_encoder_layers,
        n_decoder_layers=n_decoder_layers, n_heads=n_heads, dropout=dropout, max_len=max_len,
        encoder_attention_type=encoder_attention_type, attention_type=attention_type,
        encoder_decoder_attention_type=encoder_decoder_attention_type,
        feed_forward=feed_forward, pos_type=pos_type, pos_axial_shape=pos_axial_shape,
        pos_d_axial_embs=pos_d_axial_embs, output_merge=output_merge, pad_id=pad_id, mode=mode,
        name="Reformer",
    )


def Terraformer(  # noqa: N802
    input_vocab_size: int,
    output_vocab_size: int | None = None,
    d_model: int = 512,
    d_ff: int = 2048,
    d_attention_key: int = 64,
    d_attention_value: int = 64,
    n_encoder_layers: int = 6,
    n_decoder_layers: int = 6,
    n_heads: int = 8,
    dropout: float = 0.1,
    max_len: int = 2048,
    encoder_attention_type=LSHSelfAttention,
    attention_type=None,
    encoder_decoder_attention_type=EncDecAttention,
    attention_sparsity: int = 16,
    length_kernel_size: int = 3,
    ff_sparsity: int = 64,
    d_lowrank: int = 64,
    temperature: float = 0.1,
    quant_prob: float = 0.3,
    ff_activation=tl.FastGelu,
    ff_chunk_size: int = 0,
    ff_dropout: float | None = None,
    pos_type: str | None = "fixed-base",
    pos_axial_shape=(),
    pos_d_axial_embs=None,
    pad_id: int = 0,
    mode: str = "train",
) -> tl.Layer:
    """Encoder-decoder Terraformer for long inputs: (inputs, targets) -> log-probs.

    The `Reformer` encoder-decoder (module docstring: stack, predict contract) with the
    Terraformer's sparse layers, as in `TerraformerLM`:

      attention_type: the decoder's causal self-attention; None (default) is sparse-QKV
        attention (`sparse_qkv_attention(attention_sparsity, length_kernel_size)`:
        multiplicative modular dense + causal local convolution for Q, K, V). An LSH or local
        attention constructor may be given instead, or a list cycled over layers.
      ff_sparsity: units per block of the controller-gated `SparseFF` in every encoder and
        decoder layer (one active per block; decoding reads 1/ff_sparsity of its weights);
        0 gives the dense feed-forward (`ff_activation`, `ff_chunk_size`).
      d_lowrank, temperature, quant_prob: the controller (see `SparseFF`).
      encoder_attention_type: bidirectional LSH attention by default, with the padding mask.
    The decoder's streams are averaged before the output layer (Trax's Terraformer).
    """
    sparse = sparse_layers(attention_type, attention_sparsity=attention_sparsity,
                           length_kernel_size=length_kernel_size, ff_sparsity=ff_sparsity,
                           d_lowrank=d_lowrank, temperature=temperature, quant_prob=quant_prob,
                           ff_chunk_size=ff_chunk_size)
    feed_forward = feed_forward_builder(
        d_ff, dropout=dropout if ff_dropout is None else ff_dropout, activation=ff_activation,
        ff_chunk_size=sparse["ff_chunk_size"], feed_forward_type=sparse["feed_forward_type"])
    return encoder_decoder(
        input_vocab_size, output_vocab_size, d_model=d_model, d_attention_key=d_attention_key,
        d_attention_value=d_attention_value, n_encoder_layers=n_encoder_layers,
        n_decoder_layers=n_decoder_layers, n_heads=n_heads, dropout=dropout, max_len=max_len,
        encoder_attention_type=encoder_attention_type, attention_type=sparse["attention_type"],
        encoder_decoder_attention_type=encoder_decoder_attention_type,
        feed_forward=feed_forward, pos_type=pos_type, pos_axial_shape=pos_axial_shape,
        pos_d_axial_embs=pos_d_axial_embs, output_merge="average", pad_id=pad_id, mode=mode,
        name="Terraformer",
    )


__all__ = ["Reformer", "Terraformer", "build_encoder_attention", "encoder_decoder"]
