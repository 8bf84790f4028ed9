"""Gin registrations: every name the files in ``gin/`` may use. Importing this module registers
them all (the CLI does it before parsing a config).

Registered names (short form; the long form is ``module.name``):

- models (``terraformer.models``): see ``MODELS`` below, e.g. ``@TransformerLM``;
- training (``terraformer``): ``train``;
- optimizers (``terraformer.optimizers``): ``Adam``, ``Adafactor``, ``SGD``, ``Momentum``;
- schedules (``terraformer.lr``): ``lr.constant`` (gin has its own ``constant``, so write the
  module), ``warmup``, ``rsqrt_decay``, ``cosine``, ``multifactor``;
- data (``terraformer.data``): ``copy_task``, ``text_lm_inputs``, ``text_files``,
  ``pack_documents``, ``whole_document``, ``jsonl_pairs``, ``tfds_text``,
  ``summarization_pairs``, ``get_tokenizer``, ``ByteTokenizer``, ``SentencePieceTokenizer``;
- tokenizer for ``decode``/``text_lm_inputs`` (``terraformer``): ``tokenizer``.

To add a model, append ``(module, attribute)`` to ``MODELS``.
"""

from __future__ import annotations

import importlib
import itertools
import os
from collections.abc import Iterator, Sequence

import gin
import gin.config
import numpy as np

from terraformer.data import streams
from terraformer.data.tokenizers import get_tokenizer
from terraformer.training import loop, optimizers  # noqa: F401 (registers train, optimizers)

__all__ = [
    "MODELS",
    "IdsTokenizer",
    "LMStream",
    "register",
    "register_models",
    "text_lm_inputs",
    "tokenizer",
]

# (module, attribute) of every model function gin files may name, registered under
# ``terraformer.models.<attribute>``.
MODELS: list[tuple[str, str]] = [
    ("terraformer.models.transformer", "TransformerLM"),
    ("terraformer.models.reformer", "ReformerLM"),
    ("terraformer.models.terraformer", "TerraformerLM"),
    ("terraformer.models.encoder_decoder", "Reformer"),
    ("terraformer.models.encoder_decoder", "Terraformer"),
]

# (module, attribute) of layers gin files may configure and pass as ``attention_type`` etc.,
# registered under ``terraformer.layers.<attribute>``: ``ReformerLM.attention_type =
# @LSHSelfAttention`` with ``LSHSelfAttention.n_hashes = 4``.
LAYERS: list[tuple[str, str]] = [
    ("terraformer.layers.attention", "SelfAttention"),
    ("terraformer.layers.attention", "CausalAttention"),
    ("terraformer.layers.lsh", "LSHSelfAttention"),
    ("terraformer.layers.sparsity", "MultiplicativeConvCausalAttention"),
    ("terraformer.layers.sparsity", "SparseFF"),
    ("terraformer.layers.encdec", "EncDecAttention"),
    ("terraformer.layers.core", "Relu"),
    ("terraformer.layers.core", "Gelu"),
    ("terraformer.layers.core", "FastGelu"),
]


def register(fn, name: str | None = None, module: str = "terraformer.models"):
    """``gin.external_configurable(fn, name, module)``, doing nothing when that name is
    already registered (importing twice, or a module that registers itself)."""
    name = name or fn.__name__
    if f"{module}.{name}" in gin.config._REGISTRY:
        return gin.config._REGISTRY.get_match(f"{module}.{name}").wrapper
    return gin.external_configurable(fn, name=name, module=module)


def register_models(models: Sequence[tuple[str, str]] = MODELS,
                    module: str = "terraformer.models") -> None:
    """Registers each ``(module, attribute)`` of ``models`` under ``module``."""
    for module_name, attr in models:
        register(getattr(importlib.import_module(module_name), attr), attr, module)


# ---------------------------------------------------------------------------------------------
# Tokenizers.


class IdsTokenizer:
    """Token ids written as whitespace-separated integers, for synthetic tasks (copy task).

    ``encode("0 5 3")`` -> ``[0, 5, 3]``; ``decode([5, 3])`` -> ``"5 3"``. There is no EOS
    (``eos_id`` is -1) and ``decode`` keeps every id, 0 included.
    """

    pad_id = 0
    eos_id = -1

    def __init__(self, vocab_size: int):
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or (
                vocab_size < 1):
            raise ValueError(
                f"IdsTokenizer: vocab_size must be an int >= 1 (gin: tokenizer.vocab_size), "
                f"got {vocab_size!r}"
            )
        self.vocab_size = int(vocab_size)
        self.name = "ids"

    def encode(self, text: str) -> np.ndarray:
        try:
            ids = np.array([int(t) for t in text.split()], dtype=np.int64)
        except ValueError as e:
            raise ValueError(
                f"IdsTokenizer.encode: text must be whitespace-separated integers, got "
                f"{text[:50]!r}"
            ) from e
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(
                f"IdsTokenizer.encode: ids must lie in [0, {self.vocab_size}), got values in "
                f"[{ids.min()}, {ids.max()}]"
            )
        return ids.astype(np.int32)

    def decode(self, ids, stop_at_eos: bool = True) -> str:
        del stop_at_eos
        return " ".join(str(int(i)) for i in np.asarray(ids).reshape(-1))

    def __repr__(self) -> str:
        return f"IdsTokenizer({self.vocab_size})"


@gin.configurable(module="terraformer")
def tokenizer(name_or_path: str | os.PathLike = "byte", vocab_size: int | None = None):
    """The run's tokenizer: ``'byte'``, a SentencePiece ``.model`` path, or ``'ids'``
    (whitespace-separated ids, needs ``vocab_size``). Used by ``text_lm_inputs`` and
    ``terraformer decode``."""
    if name_or_path == "ids":
        return IdsTokenizer(vocab_size)
    return get_tokenizer(name_or_path)


# ---------------------------------------------------------------------------------------------
# Language-model inputs from text files.


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
    if tok is None:
        return tokenizer()
    if isinstance(tok, (str, os.PathLike)):
        return get_tokenizer(tok)
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
    if split not in ("train", "eval"):
        raise ValueError(f"text_lm_inputs: split must be 'train' or 'eval', got {split!r}")
    if mode not in ("pack", "whole_document"):
        raise ValueError(
            f"text_lm_inputs: mode must be 'pack' or 'whole_document', got {mode!r}")
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
    if split not in ("train", "eval"):
        raise ValueError(f"summarization_inputs: split must be 'train' or 'eval', got {split!r}")
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


register_models()
register_models(LAYERS, "terraformer.layers")
