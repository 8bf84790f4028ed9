"""Tokenizers: raw UTF-8 bytes and SentencePiece (through tensorflow-text).

Every tokenizer here has the same small surface:

- ``name``: a string for messages (``'byte'`` or the model path);
- ``vocab_size``, ``pad_id``, ``eos_id``: ints;
- ``encode(text: str) -> np.ndarray``: int32, shape ``(n_tokens,)``, no EOS appended;
- ``decode(ids, stop_at_eos=True) -> str``: the inverse, ignoring padding and EOS.

``get_tokenizer('byte')`` or ``get_tokenizer('path/to/x.model')`` builds one by name, and
``check_vocab`` tells early when a tokenizer emits ids the model's embedding cannot hold.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, runtime_checkable

import gin
import numpy as np

__all__ = [
    "ByteTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "check_vocab",
    "get_tokenizer",
]


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline and decoding need from a tokenizer."""

    name: str
    vocab_size: int
    pad_id: int
    eos_id: int

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids, stop_at_eos: bool = True) -> str: ...


def _as_id_vector(ids, vocab_size: int, who: str) -> np.ndarray:
    """Checks ``ids`` is a 1-D integer array-like with values in [0, vocab_size); returns int64."""
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(f"{who}: ids must be 1-D (n_tokens,), got shape {arr.shape}")
    if arr.size == 0:
        return arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{who}: ids must be integers, got dtype {arr.dtype}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"{who}: ids must lie in [0, {vocab_size}), got values in [{lo}, {hi}]")
    return arr.astype(np.int64)


def _strip_specials(ids: np.ndarray, pad_id: int, eos_id: int, stop_at_eos: bool) -> np.ndarray:
    """Cuts ``ids`` at the first EOS (if ``stop_at_eos``) and drops every pad and EOS id."""
    if stop_at_eos:
        eos_at = np.flatnonzero(ids == eos_id)
        if eos_at.size:
            ids = ids[: eos_at[0]]
    return ids[(ids != pad_id) & (ids != eos_id)]


@gin.configurable(module="terraformer.data")
class ByteTokenizer:
    """UTF-8 bytes as tokens, shifted past two special ids.

    The vocabulary has 258 ids:

    - ``0``: padding (``pad_id``);
    - ``1``: end of sequence (``eos_id``);
    - ``b + 2`` for each byte value ``b`` in 0..255 (ids 2..257).

    ``encode`` writes the text as UTF-8 (with ``surrogatepass``, so that any Python ``str``,
    even one holding lone surrogates, round-trips exactly) and adds 2 to every byte.
    ``decode`` undoes it; a byte sequence that is not valid UTF-8 (e.g. a sample cut in the
    middle of a character) is decoded with U+FFFD replacement characters instead of failing.

    Example::

        >>> tok = ByteTokenizer()
        >>> tok.encode("hé")
        array([106, 197, 171], dtype=int32)
        >>> tok.decode([106, 197, 171, 1, 50])
        'hé'
    """

    pad_id = 0
    eos_id = 1
    n_special = 2
    vocab_size = 256 + n_special

    def __init__(self):
        self.name = "byte"

    def encode(self, text: str) -> np.ndarray:
        """Returns the ids of ``text``: int32, shape ``(n_bytes,)``, no EOS appended."""
        if not isinstance(text, str):
            raise TypeError(f"ByteTokenizer.encode: text must be str, got {type(text).__name__}")
        data = text.encode("utf-8", errors="surrogatepass")
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32) + self.n_special

    def decode(self, ids, stop_at_eos: bool = True) -> str:
        """Returns the text of ``ids`` (1-D ints in [0, 258)), dropping padding and EOS.

        With ``stop_at_eos`` (the default) everything from the first EOS on is ignored;
        without it, EOS ids are only removed.
        """
        ids = _as_id_vector(ids, self.vocab_size, "ByteTokenizer.decode")
        ids = _strip_specials(ids, self.pad_id, self.eos_id, stop_at_eos)
        data = (ids - self.n_special).astype(np.uint8).tobytes()
        try:
            return data.decode("utf-8", errors="surrogatepass")
        except UnicodeDecodeError:
            return data.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


def _read_model_bytes(model_path: Path) -> bytes:
    """Reads a SentencePiece model file, with a FileNotFoundError that names the path."""
    if not model_path.is_file():
        raise FileNotFoundError(
            f"SentencePieceTokenizer: model_path '{model_path}' does not exist or is not a file"
        )
    data = model_path.read_bytes()
    if not data:
        raise ValueError(f"SentencePieceTokenizer: model file '{model_path}' is empty")
    return data


def _piece_id(tf_tokenizer, piece: str, default: int) -> int:
    """The id of ``piece`` in the model, or ``default`` when the model lacks that piece."""
    piece_id = int(tf_tokenizer.string_to_id(piece).numpy())
    found = tf_tokenizer.id_to_string(piece_id).numpy().decode("utf-8")
    return piece_id if found == piece else default


@gin.configurable(module="terraformer.data")
class SentencePieceTokenizer:
    """A SentencePiece model, run by ``tensorflow_text.SentencepieceTokenizer``.

    Args:
        model_path: path of a serialized SentencePiece ``.model`` file.

    ``pad_id`` and ``eos_id`` are read from the model (the pieces ``<pad>`` and ``</s>``),
    falling back to 0 and 1, the T5 convention, when the model has no such pieces.
    ``encode`` appends no EOS; ``decode`` drops padding and EOS.

    Raises:
        FileNotFoundError: ``model_path`` does not exist.
        ValueError: the file is not a SentencePiece model.
    """

    def __init__(self, model_path: str | os.PathLike):
        import tensorflow as tf
        import tensorflow_text as tf_text

        path = Path(model_path)
        data = _read_model_bytes(path)
        try:
            self._sp = tf_text.SentencepieceTokenizer(model=data, out_type=tf.int32, add_eos=False)
            self.vocab_size = int(self._sp.vocab_size().numpy())
        except Exception as e:  # tf raises assorted op errors for a bad model proto
            detail = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            raise ValueError(
                f"SentencePieceTokenizer: '{path}' is not a valid SentencePiece model "
                f"({type(e).__name__}: {detail})"
            ) from e
        self._tf = tf
        self.name = str(path)
        self.pad_id = _piece_id(self._sp, "<pad>", 0)
        self.eos_id = _piece_id(self._sp, "</s>", 1)

    def encode(self, text: str) -> np.ndarray:
        """Returns the ids of ``text``: int32, shape ``(n_tokens,)``, no EOS appended."""
        if not isinstance(text, str):
            raise TypeError(
                f"SentencePieceTokenizer.encode: text must be str, got {type(text).__name__}"
            )
        return self._sp.tokenize(text).numpy().astype(np.int32)

    def decode(self, ids, stop_at_eos: bool = True) -> str:
        """Returns the text of ``ids`` (1-D ints in [0, vocab_size)), dropping padding and EOS.

        With ``stop_at_eos`` (the default) everything from the first EOS on is ignored.
        """
        ids = _as_id_vector(ids, self.vocab_size, "SentencePieceTokenizer.decode")
        ids = _strip_specials(ids, self.pad_id, self.eos_id, stop_at_eos)
        if ids.size == 0:
            return ""
        tensor = self._tf.constant(ids, dtype=self._tf.int32)
        return self._sp.detokenize(tensor).numpy().decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.name!r})"


@gin.configurable(module="terraformer.data")
def get_tokenizer(
    name_or_path: str | os.PathLike = "byte",
) -> ByteTokenizer | SentencePieceTokenizer:
    """Builds a tokenizer by name.

    Args:
        name_or_path: ``'byte'`` for :class:`ByteTokenizer`, or the path of a SentencePiece
            model file ending in ``.model`` for :class:`SentencePieceTokenizer`.

    Raises:
        ValueError: ``name_or_path`` is neither.
        FileNotFoundError: the ``.model`` file does not exist.
    """
    if isinstance(name_or_path, str) and name_or_path == "byte":
        return ByteTokenizer()
    if isinstance(name_or_path, (str, os.PathLike)) and str(name_or_path).endswith(".model"):
        return SentencePieceTokenizer(name_or_path)
    raise ValueError(
        "get_tokenizer: name_or_path must be 'byte' or the path of a SentencePiece "
        f"'.model' file, got {name_or_path!r}"
    )


def check_vocab(tokenizer, vocab_size: int) -> None:
    """Raises ValueError when ``tokenizer`` can emit ids that a model with ``vocab_size`` lacks."""
    if not isinstance(vocab_size, (int, np.integer)) or isinstance(vocab_size, bool):
        raise TypeError(f"check_vocab: vocab_size must be an int, got {type(vocab_size).__name__}")
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"tokenizer '{tokenizer.name}' has vocab_size {tokenizer.vocab_size} "
            f"but the model's vocab_size is {vocab_size}"
        )
