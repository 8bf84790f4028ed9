"""Data: tokenizers, numpy streams, and the input pipelines gin configs name.

- ``tokenizers``: byte-level, SentencePiece and integer-id tokenizers;
- ``streams``: sources and transforms (text files, copy task, packing, shuffling, batches);
- ``inputs``: the pipelines a run trains on (``text_lm_inputs``, ``summarization_inputs``).

Nothing here imports JAX; every stream yields numpy arrays (see ``streams`` for the shapes).
"""

from terraformer.data.inputs import LMStream, summarization_inputs, text_lm_inputs
from terraformer.data.streams import (
    batch,
    copy_task,
    jsonl_pairs,
    lm_batches,
    pack_documents,
    shuffle,
    split_text,
    summarization_pairs,
    text_files,
    tfds_text,
    tokenize,
    whole_document,
)
from terraformer.data.tokenizers import (
    ByteTokenizer,
    IdsTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    check_vocab,
    get_tokenizer,
    tokenizer,
)

__all__ = [
    "ByteTokenizer",
    "IdsTokenizer",
    "LMStream",
    "SentencePieceTokenizer",
    "Tokenizer",
    "batch",
    "check_vocab",
    "copy_task",
    "get_tokenizer",
    "jsonl_pairs",
    "lm_batches",
    "pack_documents",
    "shuffle",
    "split_text",
    "summarization_inputs",
    "summarization_pairs",
    "text_files",
    "text_lm_inputs",
    "tfds_text",
    "tokenize",
    "tokenizer",
    "whole_document",
]
