"""Trax-style layers: `from terraformer import layers as tl`."""

from terraformer.layers.attention import CausalAttention, SelfAttention
from terraformer.layers.base import EMPTY, MODES, Layer, PureLayer
from terraformer.layers.chunked_loss import chunked_cross_entropy
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
    Relu,
    ShiftRight,
    Sigmoid,
    SinusoidalPositionalEncoding,
    Softmax,
    Tanh,
)
from terraformer.layers.feedforward import FeedForward, FeedForwardBlock
from terraformer.layers.losses import Accuracy, CrossEntropyLoss, SequenceAccuracy
from terraformer.layers.lsh import LSHSelfAttention
from terraformer.layers.positional import (
    AxialPositionalEncoding,
    FixedBasePositionalEncoding,
    PositionalEncoding,
    SinCosPositionalEncoding,
)
from terraformer.layers.reversible import (
    ReversibleHalfResidual,
    ReversibleLayer,
    ReversibleRepeat,
    ReversibleSelect,
    ReversibleSerial,
    ReversibleSwap,
)
from terraformer.layers.sparsity import (
    FactoredDense,
    LocallyConvDense,
    MultiplicativeConvCausalAttention,
    MultiplicativeModularSparseDense,
    SparseFF,
)
from terraformer.shapes import ShapeDtype, signature
