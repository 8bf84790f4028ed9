"""Attention mechanisms by name: what a string `attention_type` means.

Every entry is a constructor of the Reformer convention, called as
`constructor(n_heads=, d_qk=, d_v=, causal=, output_dropout=, mode=)` and building a layer
(batch, length, d_model) -> same. Models accept these names wherever they take a constructor
(`ReformerLM.attention_type = 'performer'` in gin), and `terraformer bench train --attention` and
`terraformer bench attention --mechanisms` take the same names.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from terraformer.layers.attention import RingSelfAttention, SelfAttention
from terraformer.layers.blockwise import BlockwiseAttention
from terraformer.layers.efficient.bigbird import BigBirdAttention
from terraformer.layers.efficient.linear import LinearAttention
from terraformer.layers.efficient.linformer import LinformerAttention
from terraformer.layers.efficient.longformer import LongformerAttention
from terraformer.layers.efficient.performer import PerformerAttention
from terraformer.layers.efficient.routing import RoutingAttention
from terraformer.layers.efficient.sinkhorn import SinkhornAttention
from terraformer.layers.efficient.sparse_transformer import SparseTransformerAttention
from terraformer.layers.efficient.synthesizer import SynthesizerAttention
from terraformer.layers.lsh import LSHSelfAttention

ATTENTION_TYPES: dict[str, Callable] = {
    "full": SelfAttention,
    "blockwise": BlockwiseAttention,
    "local": functools.partial(SelfAttention, chunk_len=128, n_chunks_before=1),
    "lsh": LSHSelfAttention,
    "ring": RingSelfAttention,
    "sparse_transformer": SparseTransformerAttention,
    "longformer": LongformerAttention,
    "bigbird": BigBirdAttention,
    "routing": RoutingAttention,
    "sinkhorn": SinkhornAttention,
    "linear": LinearAttention,
    "performer": PerformerAttention,
    "linformer": LinformerAttention,
    "synthesizer": SynthesizerAttention,
}

# Mechanisms that cannot be causal (they refuse `causal=True`): encoders and classifiers only.
NON_CAUSAL_ONLY = frozenset({"linformer"})


def attention_constructor(attention_type) -> Callable:
    """The constructor for `attention_type`: a name of `ATTENTION_TYPES` or a constructor."""
    if not isinstance(attention_type, str):
        return attention_type
    try:
        return ATTENTION_TYPES[attention_type]
    except KeyError:
        raise ValueError(f"attention_type must be one of {', '.join(ATTENTION_TYPES)} or a layer "
                         f"constructor, got {attention_type!r}") from None


__all__ = ["ATTENTION_TYPES", "NON_CAUSAL_ONLY", "attention_constructor"]
