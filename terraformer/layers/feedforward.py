"""The position-wise feed-forward block.

`FeedForward(d_ff)`: (x [..., d_model]) -> (y [..., d_model]), the pre-norm block

    LayerNorm -> Dense(d_ff) -> activation -> Dropout -> Dense(d_model) -> Dropout

with `d_model` read from the input at `init`. It has no residual connection of its own: wrap
it in `Residual` (dense Transformer) or `ReversibleHalfResidual` (Reformer). To run it on a
few positions at a time, wrap it in `Chunk` (the models do, given `ff_chunk_size`).
"""

from __future__ import annotations

from terraformer.checks import check_int
from terraformer.layers.base import Layer, check_mode
from terraformer.layers.combinators import Serial
from terraformer.layers.core import Dense, Dropout, FastGelu, LayerNorm


def _activation_layer(activation) -> Layer:
    if isinstance(activation, Layer):
        return activation
    if callable(activation):
        layer = activation()
        if isinstance(layer, Layer):
            return layer
        raise TypeError(
            "FeedForward: activation must be a Layer or a function returning one (e.g. "
            f"tl.Relu), got a function returning {type(layer).__name__}"
        )
    raise TypeError(
        "FeedForward: activation must be a Layer or a function returning one (e.g. tl.Relu), "
        f"got {type(activation).__name__}"
    )


class _InputWidthDense(Dense):
    """The output Dense of a FeedForward block built without `d_model`.

    Its width is the block's input width, which only the block sees at init; `apply` (Dense's)
    reads the width from the weights.
    """

    def __init__(self):
        super().__init__(1)
        self._name = "Dense_d_model"

    def init_weights_and_state(self, input_signature, rng):
        raise ValueError(
            "Dense_d_model takes its width from the FeedForward block's input: init the block, "
            "not this layer alone"
        )


class FeedForwardBlock(Layer):
    """LayerNorm, Dense(d_ff), activation, Dropout, Dense(d_model), Dropout.

    Made with `FeedForward(...)`: a `Serial` of those six layers (its `sublayers`) whose last
    Dense takes its width from the input when `d_model` is None. Weights and state are the
    Serial's, one entry per layer: `({'scale','bias'}, {'w','b'}, (), (), {'w','b'}, ())`.
    """

    def __init__(
        self,
        d_ff: int,
        dropout: float = 0.0,
        dropout_shared_axes=None,
        activation=FastGelu,
        ff_dropout: float | None = None,
        mode: str = "train",
        d_model: int | None = None,
    ):
        check_int("d_ff", d_ff, 1, "FeedForward")
        if d_model is not None:
            check_int("d_model", d_model, 1, "FeedForward")
        check_mode(mode)
        ff_dropout = dropout if ff_dropout is None else ff_dropout
        layers = [
            LayerNorm(),
            Dense(d_ff),
            _activation_layer(activation),
            Dropout(ff_dropout, shared_axes=dropout_shared_axes, mode=mode),
            Dense(d_model) if d_model is not None else _InputWidthDense(),
            Dropout(dropout, shared_axes=dropout_shared_axes, mode=mode),
        ]
        super().__init__(name="FeedForward", sublayers=layers)
        self._d_model = d_model

    def init_weights_and_state(self, input_signature, rng):
        if isinstance(input_signature, tuple) or not input_signature.shape:
            raise ValueError(
                f"FeedForward: expects one input of shape (..., d_model), got {input_signature}"
            )
        d_model = input_signature.shape[-1]
        if self._d_model is not None and d_model != self._d_model:
            raise ValueError(
                f"FeedForward: built for d_model={self._d_model}, got inputs of shape "
                f"{input_signature.shape}"
            )
        layers = list(self.sublayers)
        layers[4] = Dense(d_model)
        return Serial(*layers).init_weights_and_state(input_signature, rng)

    def apply(self, x, weights, state, rng):
        return Serial(*self.sublayers).apply(x, weights, state, rng)


def FeedForward(  # noqa: N802
    d_ff: int,
    dropout: float = 0.0,
    dropout_shared_axes=None,
    activation=FastGelu,
    ff_dropout: float | None = None,
    mode: str = "train",
    d_model: int | None = None,
) -> Layer:
    """The pre-norm feed-forward block: (x [..., d_model]) -> (y [..., d_model]).

    LayerNorm -> Dense(d_ff) -> activation -> Dropout(ff_dropout) -> Dense(d_model) ->
    Dropout(dropout); no residual. Args use Trax's names:

      d_ff: width of the hidden layer.
      dropout: rate of the final dropout (and of the middle one unless `ff_dropout` is given).
      dropout_shared_axes: axes along which dropout masks are shared (e.g. [1]: over length).
      activation: a layer or a function returning one (`tl.FastGelu`, Reformer's default;
        `tl.Relu`, Trax Transformer's).
      ff_dropout: rate of the dropout after the activation; None means `dropout`.
      mode: 'train' | 'eval' | 'predict' (dropout only in 'train').
      d_model: the output width; None (default) takes the input's width at init.
    """
    return FeedForwardBlock(
        d_ff,
        dropout=dropout,
        dropout_shared_axes=dropout_shared_axes,
        activation=activation,
        ff_dropout=ff_dropout,
        mode=mode,
        d_model=d_model,
    )


__all__ = ["FeedForward", "FeedForwardBlock"]
