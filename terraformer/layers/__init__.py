"""Trax-style layers: `from terraformer import layers as tl`."""

from terraformer.layers.base import EMPTY, MODES, Layer, PureLayer
from terraformer.layers.combinators import (
    Add,
    Branch,
    Chunk,
    Concatenate,
    Drop,
    Dup,
    Fn,
    Identity,
    Multiply,
    Parallel,
    Residual,
    Scan,
    Select,
    Serial,
    Swap,
)
from terraformer.layers.core import (
    Dense,
    Dropout,
    Embedding,
    FastGelu,
    Gelu,
    LayerNorm,
    LogSoftmax,
    Mean,
    PositionalEncoding,
    Relu,
    ShiftRight,
    Sigmoid,
    Softmax,
    Tanh,
)
from terraformer.shapes import ShapeDtype, signature
