"""Tokenizers: raw UTF-8 bytes, SentencePiece (through tensorflow-text), and integer ids.

Every tokenizer here has the same small surface:

- ``name``: a string for messages (``'byte'`` or the model path);
- ``vocab_size``, ``pad_id``, ``eos_id``: ints;
- ``encode(text: str) -> np.ndarray``: int32, shape ``(n_tokens,)``, no EOS appended;
- ``decode(ids, stop_at_eos=True) -> str``: the inverse, ignoring padding and EOS.

``get_tokenizer('byte')`` or ``get_tokenizer('path/to/x.model')`` builds one by name,
``tokenizer(...)`` builds the run's tokenizer as the gin config names it (``'ids'`` included),
and ``check_vocab`` tells early when a tokenizer emits ids the model's embedding cannot hold.

TensorFlow is imported only by ``SentencePieceTokenizer``, quietly: unless the environment
chooses TensorFlow's logging (``TF_CPP_MIN_LOG_LEVEL`` set to another value than the ``1`` that
``import jax`` sets), the lines it writes to stderr while loading (oneDNN notices, CUDA probing,
``failed call to cuInit`` on a machine without a GPU) are dropped, so that a bad tokenizer shows
as one line of error and nothing else.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Protocol, runtime_checkable

import gin
import numpy as np

from terraformer.checks import ArgumentError, check_int, check_token_ids

__all__ = [
    "ByteTokenizer",
    "IdsTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "check_vocab",
    "get_tokenizer",
    "tokenizer",
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
        ids = check_token_ids("ids", ids, "ByteTokenizer.decode", vocab_size=self.vocab_size,
                              dtype=np.int64)
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


# TF_CPP_MIN_LOG_LEVEL values that mean nobody chose TensorFlow's logging: unset, or the "1"
# that `import jax` sets by default.
_UNCHOSEN_TF_LOG_LEVELS = (None, "1")


@contextlib.contextmanager
def _quiet_tensorflow():
    """Drops what TensorFlow's C++ side writes to stderr inside the block (it logs through absl
    before any level applies) and runs the block with ``TF_CPP_MIN_LOG_LEVEL=3``, which
    TensorFlow reads once, at its first log (``failed call to cuInit`` at the first op), and
    keeps. Does nothing when the user chose a level (see ``_UNCHOSEN_TF_LOG_LEVELS``)."""
    level = os.environ.get("TF_CPP_MIN_LOG_LEVEL")
    if level not in _UNCHOSEN_TF_LOG_LEVELS:
        yield
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
        if level is None:
            del os.environ["TF_CPP_MIN_LOG_LEVEL"]
        else:
            os.environ["TF_CPP_MIN_LOG_LEVEL"] = level


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
        path = Path(model_path)
        data = _read_model_bytes(path)
        # The first ops start TensorFlow's devices (and log about it): quiet until they ran.
        with _quiet_tensorflow():
            # Imported here: only SentencePiece needs TensorFlow, and it loads slowly.
            import tensorflow as tf
            import tensorflow_text as tf_text

            try:
                self._sp = tf_text.SentencepieceTokenizer(model=data, out_type=tf.int32,
                                                          add_eos=False)
                self.vocab_size = int(self._sp.vocab_size().numpy())
            except Exception as e:  # tf raises assorted op errors for a bad model proto
                detail = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
                raise ValueError(
                    f"SentencePieceTokenizer: '{path}' is not a valid SentencePiece model "
                    f"({type(e).__name__}: {detail})"
                ) from e
            self.pad_id = _piece_id(self._sp, "<pad>", 0)
            self.eos_id = _piece_id(self._sp, "</s>", 1)
        self._tf = tf
        self.name = str(path)

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
        ids = check_token_ids("ids", ids, "SentencePieceTokenizer.decode",
                              vocab_size=self.vocab_size, dtype=np.int64)
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
    check_int("vocab_size", vocab_size, None, "check_vocab")
    if tokenizer.vocab_size > vocab_size:
        raise ArgumentError(
            f"tokenizer '{tokenizer.name}' has vocab_size {tokenizer.vocab_size} "
            f"but the model's vocab_size is {vocab_size}"
        )


class IdsTokenizer:
    """Token ids written as whitespace-separated integers, for synthetic tasks (copy task).

    ``encode("0 5 3")`` -> ``[0, 5, 3]``; ``decode([5, 3])`` -> ``"5 3"``. There is no EOS
    (``eos_id`` is -1) and ``decode`` keeps every id, 0 included.
    """

    pad_id = 0
    eos_id = -1

    def __init__(self, vocab_size: int):
        self.vocab_size = check_int("vocab_size (gin: tokenizer.vocab_size)", vocab_size, 1,
                                    "IdsTokenizer")
        self.name = "ids"

    def encode(self, text: str) -> np.ndarray:
        """Returns the ids written in ``text``: int32, shape ``(n_tokens,)``."""
        try:
            ids = [int(t) for t in text.split()]
        except ValueError as e:
            raise ArgumentError(
                f"IdsTokenizer.encode: text must be whitespace-separated integers, got "
                f"{text[:50]!r}"
            ) from e
        return check_token_ids("ids", np.array(ids, np.int64), "IdsTokenizer.encode",
                               vocab_size=self.vocab_size)

    def decode(self, ids, stop_at_eos: bool = True) -> str:
        del stop_at_eos
        return " ".join(str(int(i)) for i in np.asarray(ids).reshape(-1))

    def __repr__(self) -> str:
        return f"IdsTokenizer({self.vocab_size})"


@gin.configurable(module="terraformer")
def tokenizer(name_or_path: str | os.PathLike = "byte", vocab_size: int | None = None):
    """The run's tokenizer: ``'byte'``, a SentencePiece ``.model`` path, or ``'ids'``
    (whitespace-separated ids, needs ``vocab_size``). Registered with gin so that a config's
    ``tokenizer.name_or_path`` reaches both the input pipeline (``data.inputs``) and
    ``terraformer decode``."""
    if name_or_path == "ids":
        return IdsTokenizer(vocab_size)
    return get_tokenizer(name_or_path)
