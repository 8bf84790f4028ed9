"""Data streams: plain Python generators of numpy arrays.

Sources make examples, transforms reshape streams, and the training loop pulls batches::

    docs = text_files("corpus/")                      # str, one per file
    toks = tokenize(docs, get_tokenizer("byte"))      # int32 (n,), one per document
    rows = pack_documents(toks, seq_len=1024, eos_id=1)   # (tokens, weights), (1024,) each
    batches = lm_batches(shuffle(rows, 1000, seed=0), batch_size=8)
    inputs, targets, weights = next(batches)          # (8, 1024) int32, int32, float32

Language-model batches follow Trax: ``targets`` equals ``inputs`` and the model shifts right
internally; ``weights`` (float32) is 0 wherever the loss must not look (padding, prompts).
Everything random takes a ``seed`` and draws from ``np.random.default_rng(seed)``, so the same
seed gives the same stream.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import gin
import numpy as np

from terraformer.checks import ArgumentError, check_int, check_rate, check_token_ids

__all__ = [
    "batch",
    "copy_task",
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

PathLike = str | os.PathLike


# ---------------------------------------------------------------------------------------------
# Synthetic task.


@gin.configurable(module="terraformer.data")
def copy_task(
    batch_size: int, seq_len: int, vocab_size: int = 128, seed: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The Reformer duplication task as an infinite stream of decoder-only LM batches.

    Each row is ``0 w 0 w``: a random word ``w`` of ``seq_len // 2 - 1`` symbols drawn
    uniformly from ``1 .. vocab_size - 1``, written twice, each copy after a 0 separator. A model
    can only predict the second copy, so the loss looks only there.

    Yields:
        ``(inputs, targets, weights)``: ``inputs`` int32 ``(batch_size, seq_len)``;
        ``targets`` equal to ``inputs`` (the model shifts right internally); ``weights`` float32
        ``(batch_size, seq_len)``, 1 on the last ``seq_len // 2 - 1`` positions (the second copy
        of ``w``) and 0 elsewhere.

    Raises:
        ValueError: ``seq_len`` is odd or below 4, ``vocab_size`` below 2, ``batch_size`` below 1.
    """
    who = "copy_task"
    batch_size = check_int("batch_size", batch_size, 1, who)
    seq_len = check_int("seq_len", seq_len, None, who)
    vocab_size = check_int("vocab_size", vocab_size, 2, who)
    if seq_len < 4:  # the word w must hold a symbol
        raise ArgumentError(f"{who}: seq_len must be >= 4 (0 w 0 w), got {seq_len}")
    if seq_len % 2:
        raise ArgumentError(f"{who}: seq_len must be even (0 w 0 w), got {seq_len}")
    half = seq_len // 2
    weights = np.zeros((batch_size, seq_len), np.float32)
    weights[:, half + 1 :] = 1.0
    return _copy_task_stream(batch_size, half, vocab_size, seed, weights)


def _copy_task_stream(batch_size, half, vocab_size, seed, weights):
    rng = np.random.default_rng(seed)
    zeros = np.zeros((batch_size, 1), np.int32)
    while True:
        word = rng.integers(1, vocab_size, size=(batch_size, half - 1), dtype=np.int32)
        inputs = np.concatenate([zeros, word, zeros, word], axis=1)
        yield inputs, inputs.copy(), weights.copy()


# ---------------------------------------------------------------------------------------------
# Sources.


def _list_files(path: Path) -> list[Path]:
    """Files under ``path`` (itself if a file), sorted, skipping names that start with '.'."""
    if path.is_file():
        return [path]
    return sorted(
        p
        for p in path.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )


def _resolve_text_paths(paths) -> list[Path]:
    """Expands a path or list of paths (files or directories) into a list of non-empty files."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    elif not isinstance(paths, Sequence):
        raise TypeError(
            f"text_files: paths must be a path or a list of paths, got {type(paths).__name__}"
        )
    if not paths:
        raise ValueError("text_files: paths must name at least one file or directory, got []")
    files = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"text_files: path '{p}' does not exist")
        found = _list_files(p)
        if not found:
            raise ValueError(f"text_files: directory '{p}' holds no files")
        for f in found:
            if f.stat().st_size == 0:
                raise ValueError(f"text_files: file '{f}' is empty")
        files.extend(found)
    return files


@gin.configurable(module="terraformer.data")
def text_files(paths: PathLike | Sequence[PathLike]) -> Iterator[str]:
    """Reads documents from text files: one UTF-8 document per file.

    Args:
        paths: a file, a directory (every file below it, recursively, in sorted order, hidden
            names skipped), or a list of files and directories.

    Yields:
        Each file's text, ``str``, in order.

    Raises:
        FileNotFoundError: a path does not exist (raised at the call, not at first ``next``).
        ValueError: a file is empty or holds only whitespace, or a directory holds no files.
    """
    files = _resolve_text_paths(paths)
    return _read_texts(files)


def _read_texts(files: list[Path]) -> Iterator[str]:
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"text_files: file '{f}' is not valid UTF-8 ({e})") from e
        if not text.strip():
            raise ValueError(f"text_files: file '{f}' is empty (only whitespace)")
        yield text


@gin.configurable(module="terraformer.data")
def jsonl_pairs(
    path: PathLike, input_key: str = "article", target_key: str = "abstract"
) -> Iterator[tuple[str, str]]:
    """Reads ``(input, target)`` string pairs from a JSON-lines file (blank lines skipped).

    Each line must be a JSON object whose ``input_key`` and ``target_key`` hold strings.

    Raises:
        FileNotFoundError: ``path`` does not exist (raised at the call).
        ValueError: the file is empty, or a line is malformed; the message names ``file:line``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"jsonl_pairs: path '{path}' does not exist or is not a file")
    if path.stat().st_size == 0:
        raise ValueError(f"jsonl_pairs: file '{path}' is empty")
    return _read_jsonl_pairs(path, input_key, target_key)


def _record_problem(record, keys: tuple[str, str]) -> str | None:
    """What is wrong with a decoded JSON line, or None when it holds string ``keys``."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    for key in keys:
        if key not in record:
            return f"missing key {key!r} (keys: {sorted(record)})"
        if not isinstance(record[key], str):
            return f"{key!r} must be a string, got {type(record[key]).__name__}"
    return None


def _parse_pair(line: str, where: str, input_key: str, target_key: str) -> tuple[str, str]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"jsonl_pairs: {where}: malformed JSON ({e.msg})") from e
    problem = _record_problem(record, (input_key, target_key))
    if problem is not None:
        raise ValueError(f"jsonl_pairs: {where}: {problem}")
    return record[input_key], record[target_key]


def _read_jsonl_pairs(path: Path, input_key: str, target_key: str) -> Iterator[tuple[str, str]]:
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                yield _parse_pair(line, f"{path}:{line_no}", input_key, target_key)


@gin.configurable(module="terraformer.data")
def tfds_text(name: str, split: str = "train", key: str = "text") -> Iterator[str]:
    """Reads the ``key`` feature of a TensorFlow Datasets dataset as strings.

    Needs the optional package ``tensorflow_datasets`` (imported at the call).

    Raises:
        ImportError: ``tensorflow_datasets`` is not installed; the message says how to get it.
        ValueError: the dataset has no feature ``key``.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(
            "tfds_text needs the optional package tensorflow_datasets: "
            "`pip install tensorflow-datasets`, or read local files with text_files(paths)"
        ) from e
    dataset = tfds.load(name, split=split)
    features = dataset.element_spec
    if isinstance(features, dict) and key not in features:
        raise ValueError(
            f"tfds_text: key must be a feature of {name!r}, got {key!r} "
            f"(features: {sorted(features)})"
        )
    return (_to_str(example[key]) for example in tfds.as_numpy(dataset))


def _to_str(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def split_text(text: str, held_out_fraction: float = 0.05) -> tuple[str, str]:
    """Splits ``text`` into ``(train_text, eval_text)``: the last ``held_out_fraction`` of its
    characters is held out for evaluation (deterministic, no shuffling)."""
    if not isinstance(text, str):
        raise TypeError(f"split_text: text must be str, got {type(text).__name__}")
    check_rate("held_out_fraction", held_out_fraction, "split_text")
    cut = len(text) - round(len(text) * held_out_fraction)
    return text[:cut], text[cut:]


# ---------------------------------------------------------------------------------------------
# Tokens into fixed-length rows.


def tokenize(texts: Iterable[str], tokenizer) -> Iterator[np.ndarray]:
    """Encodes each text with ``tokenizer``; yields int32 arrays ``(n_tokens,)`` (no EOS)."""
    for text in texts:
        yield np.asarray(tokenizer.encode(text), dtype=np.int32)


def _padded_row(tokens: np.ndarray, seq_len: int, pad_id: int, left: int = 0):
    """``tokens`` placed at offset ``left`` in a (seq_len,) row of ``pad_id``; weights 1 there."""
    row = np.full((seq_len,), pad_id, np.int32)
    weights = np.zeros((seq_len,), np.float32)
    row[left : left + tokens.size] = tokens
    weights[left : left + tokens.size] = 1.0
    return row, weights


@gin.configurable(module="terraformer.data")
def pack_documents(
    token_arrays: Iterable, seq_len: int, eos_id: int, pad_id: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Concatenates documents, each followed by ``eos_id``, and cuts the stream into rows.

    Rows may start or end in the middle of a document; no token is dropped or repeated. The last
    partial row is right-padded with ``pad_id``.

    Args:
        token_arrays: iterable of 1-D integer arrays, one per document.
        seq_len: length of each row.
        eos_id: id appended after every document (weighted: predicting it is part of the task).
        pad_id: id filling the end of the last row.

    Yields:
        ``(tokens, weights)``: int32 ``(seq_len,)`` and float32 ``(seq_len,)``, weights 0 exactly
        on the padding.
    """
    seq_len = check_int("seq_len", seq_len, 1, "pack_documents")
    eos = np.array([check_int("eos_id", eos_id, 0, "pack_documents")], np.int32)
    pad_id = check_int("pad_id", pad_id, 0, "pack_documents")
    return _pack(token_arrays, seq_len, eos, pad_id)


def _pack(token_arrays, seq_len, eos, pad_id):
    pending: list[np.ndarray] = []
    n_pending = 0
    ones = np.ones((seq_len,), np.float32)
    for i, tokens in enumerate(token_arrays):
        tokens = check_token_ids(f"token_arrays[{i}]", tokens, "pack_documents")
        pending += [tokens, eos]
        n_pending += tokens.size + 1
        if n_pending < seq_len:
            continue
        stream = np.concatenate(pending)
        n_full = stream.size // seq_len
        for row in stream[: n_full * seq_len].reshape(n_full, seq_len):
            yield row, ones.copy()
        rest = stream[n_full * seq_len :]
        pending, n_pending = [rest], rest.size
    if n_pending:
        yield _padded_row(np.concatenate(pending), seq_len, pad_id)


@gin.configurable(module="terraformer.data")
def whole_document(
    tokens, seq_len: int, pad_id: int = 0, seed: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One document as one training sequence, shifted at random (the Reformer novel demo).

    Each ``next`` draws afresh: when the document fits, a left-padding amount uniform in
    ``[0, seq_len - len(tokens)]`` (the rest of the row is padded on the right); when it is
    longer than ``seq_len``, a random window of ``seq_len`` consecutive tokens.

    Args:
        tokens: 1-D integer array, the whole document (append EOS yourself if you want one).
        seq_len: row length.
        pad_id: padding id.
        seed: seed of the draws.

    Yields:
        ``(tokens, weights)``: int32 ``(seq_len,)`` and float32 ``(seq_len,)``, weights 0 exactly
        on the padding. Infinite.
    """
    tokens = check_token_ids("tokens", tokens, "whole_document")
    if tokens.size == 0:
        raise ValueError("whole_document: tokens must hold at least one token, got 0")
    seq_len = check_int("seq_len", seq_len, 1, "whole_document")
    pad_id = check_int("pad_id", pad_id, 0, "whole_document")
    return _whole_document_stream(tokens, seq_len, pad_id, seed)


def _whole_document_stream(tokens, seq_len, pad_id, seed):
    rng = np.random.default_rng(seed)
    n = tokens.size
    while True:
        if n <= seq_len:
            yield _padded_row(tokens, seq_len, pad_id, left=int(rng.integers(0, seq_len - n + 1)))
        else:
            start = int(rng.integers(0, n - seq_len + 1))
            yield tokens[start : start + seq_len].copy(), np.ones((seq_len,), np.float32)


@gin.configurable(module="terraformer.data")
def summarization_pairs(
    path: PathLike,
    tokenizer,
    input_len: int,
    target_len: int,
    input_key: str = "article",
    target_key: str = "abstract",
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Encoder-decoder examples from a JSON-lines file of (article, abstract) pairs.

    Both texts are encoded with ``tokenizer``, truncated to leave room for a final EOS, ended
    with ``tokenizer.eos_id`` and right-padded with ``tokenizer.pad_id``.

    Yields:
        ``(inputs, targets, weights)``: int32 ``(input_len,)``, int32 ``(target_len,)`` and
        float32 ``(target_len,)``, weights 1 on the target tokens (EOS included), 0 on padding.
    """
    who = "summarization_pairs"
    input_len = check_int("input_len", input_len, 1, who)
    target_len = check_int("target_len", target_len, 1, who)
    pairs = jsonl_pairs(path, input_key, target_key)
    return _summarization_stream(pairs, tokenizer, input_len, target_len)


def _encode_fixed(tokenizer, text: str, length: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(tokenizer.encode(text), np.int32)[: length - 1]
    ids = np.append(ids, np.int32(tokenizer.eos_id))
    return _padded_row(ids, length, tokenizer.pad_id)


def _summarization_stream(pairs, tokenizer, input_len, target_len):
    for source, target in pairs:
        inputs, _ = _encode_fixed(tokenizer, source, input_len)
        targets, weights = _encode_fixed(tokenizer, target, target_len)
        yield inputs, targets, weights


# ---------------------------------------------------------------------------------------------
# Stream transforms.


def shuffle(stream: Iterable, buffer_size: int, seed: int = 0) -> Iterator:
    """Shuffles ``stream`` through a buffer of ``buffer_size`` items (deterministic by seed).

    The buffer fills first; then each incoming item replaces a uniformly chosen buffered item,
    which is yielded. At the end the remaining buffer is yielded in random order. Every item is
    yielded exactly once; ``buffer_size=1`` keeps the order.
    """
    buffer_size = check_int("buffer_size", buffer_size, 1, "shuffle")
    return _shuffle(stream, buffer_size, seed)


def _shuffle(stream, buffer_size, seed):
    rng = np.random.default_rng(seed)
    buffer = []
    for item in stream:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        i = int(rng.integers(buffer_size))
        yield buffer[i]
        buffer[i] = item
    for i in rng.permutation(len(buffer)):
        yield buffer[i]


def _stack(items: list, who: str):
    """Stacks a list of arrays, or of equal-length tuples of arrays, along a new axis 0."""
    first = items[0]
    try:
        if isinstance(first, (tuple, list)):
            return tuple(np.stack(parts) for parts in zip(*items, strict=True))
        return np.stack(items)
    except ValueError as e:
        raise ValueError(f"{who}: items of one batch must have equal shapes and arity ({e})") from e


def batch(stream: Iterable, batch_size: int) -> Iterator:
    """Groups consecutive items of ``stream`` into batches; a last incomplete batch is dropped.

    Items are arrays or tuples of arrays; a tuple ``(a, b)`` of shapes ``(s_a,), (s_b,)``
    becomes ``(A, B)`` of shapes ``(batch_size, s_a), (batch_size, s_b)``.
    """
    batch_size = check_int("batch_size", batch_size, 1, "batch")
    return _batch(stream, batch_size)


def _batch(stream, batch_size):
    items = []
    for item in stream:
        items.append(item)
        if len(items) == batch_size:
            yield _stack(items, "batch")
            items = []


def lm_batches(stream: Iterable, batch_size: int) -> Iterator:
    """Decoder-only LM batches from a stream of ``(tokens, weights)`` rows.

    Yields:
        ``(inputs, targets, weights)``: int32, int32, float32, each ``(batch_size, seq_len)``;
        ``targets`` equals ``inputs`` (Trax style: the model shifts right internally).
    """
    return _lm_batches(batch(stream, batch_size))


def _lm_batches(batches):
    for tokens, weights in batches:
        tokens = tokens.astype(np.int32)
        yield tokens, tokens.copy(), weights.astype(np.float32)
