"""Input pipelines that a gin config names as ``train.inputs``: text files for a decoder-only
language model, and JSONL article/summary pairs for an encoder-decoder.

Both return an ``LMStream``: an iterator of numpy batches (shapes in each function's docstring)
that also carries its tokenizer, so that the trainer can check the tokenizer against the model's
vocabulary before the first step. The pieces they are built from (reading, splitting, packing,
batching) are in ``streams``.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import gin
import numpy as np

from terraformer.checks import check_choice
from terraformer.data import streams, tokenizers

__all__ = ["LMStream", "summarization_inputs", "text_lm_inputs"]


class LMStream:
    """An iterator of ``(inputs, targets, weights)`` batches that knows its ``tokenizer`` (so
    the trainer can check the tokenizer fits the model's vocabulary)."""

    def __init__(self, batches: Iterator, tokenizer):
        self._batches = batches
        self.tokenizer = tokenizer

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._batches)


_TOKEN_CACHE: dict = {}


def _split_tokens(paths: tuple, tok, held_out_fraction: float, split: str) -> list:
    """Token arrays of the ``split`` part of each document (cached: evals reopen the stream)."""
    key = (paths, type(tok).__name__, tok.name, held_out_fraction, split)
    if key not in _TOKEN_CACHE:
        docs = []
        for text in streams.text_files(list(paths)):
            train_text, eval_text = streams.split_text(text, held_out_fraction)
            part = train_text if split == "train" else eval_text
            if part:
                docs.append(np.asarray(tok.encode(part), np.int32))
        if len(_TOKEN_CACHE) >= 4:
            _TOKEN_CACHE.pop(next(iter(_TOKEN_CACHE)))
        _TOKEN_CACHE[key] = docs
    return _TOKEN_CACHE[key]


def _resolve_tokenizer(tok):
    """A tokenizer from ``tok``: None is the gin-configured ``tokenizer()``, a string a name
    for ``get_tokenizer``; anything else is taken as a tokenizer."""
    if tok is None:
        return tokenizers.tokenizer()
    if isinstance(tok, (str, os.PathLike)):
        return tokenizers.get_tokenizer(tok)
    return tok


def _repeat_packed(docs, seq_len, eos_id, pad_id, shuffle_buffer, seed):
    for epoch in itertools.count():
        rows = streams.pack_documents(docs, seq_len, eos_id, pad_id)
        if shuffle_buffer > 1:
            rows = streams.shuffle(rows, shuffle_buffer, seed + epoch)
        yield from rows


@gin.configurable(module="terraformer.data")
def text_lm_inputs(
    path=gin.REQUIRED,
    seq_len: int = 1024,
    batch_size: int = 8,
    split: str = "train",
    held_out_fraction: float = 0.05,
    mode: str = "pack",
    shuffle_buffer: int = 1024,
    seed: int = 0,
    tokenizer=None,
) -> LMStream:
    """Decoder-only LM batches from text files, with a held-out split.

    Each document (file) is split with ``split_text``: its first ``1 - held_out_fraction`` is
    ``split='train'``, the rest ``split='eval'``. Then, by ``mode``:

    - ``'pack'``: documents, each followed by EOS, are packed into rows of ``seq_len``
      (``pack_documents``); training repeats epochs forever, shuffling rows through a buffer of
      ``shuffle_buffer`` with seed ``seed + epoch``; evaluation is one pass in order;
    - ``'whole_document'``: all documents joined (EOS between) as one token array, each row a
      random window of it, or the whole of it randomly left-padded when it fits
      (``whole_document``, the Reformer novel demo). Infinite.

    Args:
      path: a file, a directory, or a list of them (gin: ``text_lm_inputs.path``).
      tokenizer: a tokenizer, a name for ``get_tokenizer``, or None for the gin-configured
        ``tokenizer()``.

    Yields (an ``LMStream``): ``(inputs, targets, weights)``, ``(batch_size, seq_len)`` each.
    """
    check_choice("split", split, ("train", "eval"), "text_lm_inputs")
    check_choice("mode", mode, ("pack", "whole_document"), "text_lm_inputs")
    if path is gin.REQUIRED:
        raise ValueError("text_lm_inputs: path must be given (gin: text_lm_inputs.path)")
    tok = _resolve_tokenizer(tokenizer)
    paths = tuple(str(p) for p in ([path] if isinstance(path, (str, os.PathLike)) else path))
    docs = _split_tokens(paths, tok, float(held_out_fraction), split)
    if not docs or sum(d.size for d in docs) == 0:
        raise ValueError(
            f"text_lm_inputs: the {split} split of {', '.join(paths)} is empty "
            f"(held_out_fraction={held_out_fraction})"
        )
    if mode == "whole_document":
        eos = np.array([tok.eos_id], np.int32)
        joined = np.concatenate(
            [x for d in docs for x in (d, eos)][:-1]) if tok.eos_id >= 0 else np.concatenate(docs)
        rows = streams.whole_document(joined, seq_len, tok.pad_id, seed)
    else:
        n_rows = -(-sum(d.size + 1 for d in docs) // seq_len)
        if n_rows < batch_size:
            raise ValueError(
                f"text_lm_inputs: the {split} split of {', '.join(paths)} fills {n_rows} rows "
                f"of seq_len {seq_len}, fewer than batch_size {batch_size}"
            )
        if split == "train":
            rows = _repeat_packed(docs, seq_len, tok.eos_id, tok.pad_id, shuffle_buffer, seed)
        else:
            rows = streams.pack_documents(docs, seq_len, tok.eos_id, tok.pad_id)
    return LMStream(streams.lm_batches(rows, batch_size), tok)


@gin.configurable(module="terraformer.data")
def summarization_inputs(
    path=gin.REQUIRED,
    input_len: int = 2048,
    target_len: int = 128,
    batch_size: int = 4,
    split: str = "train",
    held_out_fraction: float = 0.1,
    seed: int = 0,
    tokenizer=None,
    input_key: str = "article",
    target_key: str = "abstract",
) -> LMStream:
    """Encoder-decoder batches from a JSONL file of ``{"article", "abstract"}`` pairs.

    The last ``held_out_fraction`` of the lines is ``split='eval'`` (one pass, in order);
    training repeats the rest forever, reshuffled each epoch with seed ``seed + epoch``.

    Yields (an ``LMStream``): ``(inputs [batch, input_len], targets [batch, target_len],
    weights [batch, target_len])``; weights are 0 on target padding.
    """
    check_choice("split", split, ("train", "eval"), "summarization_inputs")
    if path is gin.REQUIRED:
        raise ValueError("summarization_inputs: path must be given (gin: "
                         "summarization_inputs.path)")
    tok = _resolve_tokenizer(tokenizer)
    examples = list(streams.summarization_pairs(path, tok, input_len, target_len, input_key,
                                                target_key))
    n_eval = max(1, int(round(len(examples) * held_out_fraction)))
    part = examples[-n_eval:] if split == "eval" else examples[:-n_eval]
    if len(part) < batch_size:
        raise ValueError(
            f"summarization_inputs: the {split} split of {path} has {len(part)} examples, "
            f"fewer than batch_size {batch_size}")

    def repeated():
        for epoch in itertools.count():
            order = np.random.default_rng(seed + epoch).permutation(len(part))
            yield from (part[i] for i in order)

    rows = repeated() if split == "train" else iter(part)
    return LMStream(streams.batch(rows, batch_size), tok)
