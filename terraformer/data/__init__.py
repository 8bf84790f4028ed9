"""Data: tokenizers and numpy streams for training and evaluation.

Nothing here imports JAX; every stream yields numpy arrays (see ``streams`` for the shapes).
"""

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
    SentencePieceTokenizer,
    Tokenizer,
    check_vocab,
    get_tokenizer,
)

__all__ = [
    "ByteTokenizer",
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
    "summarization_pairs",
    "text_files",
    "tfds_text",
    "tokenize",
    "whole_document",
]
