"""Batches as the training loop sees them, and the model's view of them.

A stream is a function of no arguments returning an iterator of batches
``(inputs, targets[, weights])``; calling it again restarts the stream from its beginning. A
model with one input gets ``inputs``; one with two (encoder-decoder) gets ``(inputs,
targets)``. Its first output is taken as log-probabilities ``[batch, length, vocab]``.
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import numpy as np

from terraformer.data.tokenizers import check_vocab
from terraformer.layers.base import Layer
from terraformer.shapes import ShapeDtype

__all__ = [
    "as_batch",
    "batch_signature",
    "check_ids",
    "check_model_fn",
    "check_stream_vocab",
    "init_signature",
    "log_probs_of",
    "model_input",
    "open_stream",
    "output_vocab",
]


def open_stream(inputs, who: str) -> Iterator:
    """A fresh iterator from ``inputs``, a function of no arguments."""
    if not callable(inputs):
        raise TypeError(
            f"{who} must be a function returning an iterator of batches (gin: "
            f"train.{who} = @copy_task, not @copy_task()), got {type(inputs).__name__}"
        )
    stream = inputs()
    try:
        return iter(stream)
    except TypeError as e:
        raise TypeError(
            f"{who}() must return an iterator of batches, got {type(stream).__name__}"
        ) from e


def as_batch(batch, who: str) -> tuple:
    """(inputs, targets, weights) with weights of ones when the stream gives none."""
    if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
        raise ValueError(
            f"{who}: a batch must be a tuple (inputs, targets[, weights]), got "
            f"{type(batch).__name__}{'' if not hasattr(batch, '__len__') else len(batch)}"
        )
    inputs, targets = np.asarray(batch[0]), np.asarray(batch[1])
    if len(batch) == 3:
        weights = np.asarray(batch[2], np.float32)
    else:
        weights = np.ones(targets.shape, np.float32)
    return inputs, targets, weights


def check_model_fn(model, who: str) -> None:
    """Raises TypeError unless ``model`` is a function of ``mode`` (not a built Layer)."""
    if isinstance(model, Layer) or not callable(model):
        raise TypeError(
            f"{who}: model must be a function of mode returning a Layer (gin: "
            f"train.model = @TransformerLM), got {type(model).__name__}"
        )


def model_input(model, batch):
    """What ``model`` takes from ``batch``: the inputs, or (inputs, targets) for two inputs."""
    if model.n_in == 1:
        return batch[0]
    if model.n_in == 2:
        return (batch[0], batch[1])
    raise ValueError(
        f"train: the model must take 1 input (tokens) or 2 (inputs, targets), takes {model.n_in}"
    )


def log_probs_of(out):
    """The log-probabilities among a model's outputs: its first one."""
    return out[0] if isinstance(out, (tuple, list)) else out


def batch_signature(batch) -> tuple:
    """ShapeDtype of each array of ``batch``."""
    return tuple(ShapeDtype(np.shape(x), np.asarray(x).dtype) for x in batch)


def init_signature(model, batch_sig):
    """The input signature ``model.init`` needs, from a batch signature."""
    return batch_sig[0] if model.n_in == 1 else (batch_sig[0], batch_sig[1])


def check_ids(batch, vocab_size: int, who: str) -> None:
    """Raises ValueError when ``batch`` holds token ids outside [0, vocab_size).

    Targets with fewer axes than the inputs are one label per sequence (a classifier): then
    ``vocab_size`` counts the classes, and only the targets are checked against it."""
    pairs = (("inputs", batch[0]), ("targets", batch[1]))
    for name, arr in pairs[1:] if np.ndim(batch[1]) < np.ndim(batch[0]) else pairs:
        if np.issubdtype(arr.dtype, np.integer) and arr.size:
            hi, lo = int(arr.max()), int(arr.min())
            if hi >= vocab_size or lo < 0:
                raise ValueError(
                    f"{who}: {name} hold token ids in [{lo}, {hi}] but the model's vocab_size "
                    f"is {vocab_size}; match the tokenizer (or task vocab) to the model"
                )


def output_vocab(model, weights, state, batch_sig) -> int:
    """The last axis of the model's log-probabilities, found abstractly."""
    x_sig = init_signature(model, batch_sig)
    structs = jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), x_sig,
        is_leaf=lambda s: isinstance(s, ShapeDtype),
    )
    out, _ = jax.eval_shape(
        lambda x, w, s: model.apply(x, w, s, jax.random.PRNGKey(0)), structs, weights, state)
    return int(log_probs_of(out).shape[-1])


def check_stream_vocab(stream, model, weights, state, batch_sig) -> int:
    """The model's output vocabulary, checked against the stream's tokenizer (when it has
    one); returns the vocabulary size."""
    vocab_size = output_vocab(model, weights, state, batch_sig)
    tokenizer = getattr(stream, "tokenizer", None)
    if tokenizer is not None:
        check_vocab(tokenizer, vocab_size)
    return vocab_size
