"""The plain step's loss without a [length, vocab] (or [length, 2 d_model]) activation.

A language model ends in position-wise layers (a merge of the reversible streams, LayerNorm),
`Dense(vocab)` and `LogSoftmax`. Differentiated whole, its head keeps the merged [length,
2 d_model] stream, the LayerNorm's intermediates and the [length, vocab] log-probabilities and
their gradients: at a million tokens these were the largest buffers of the step. `head_split`
finds that tail, and `chunked_loss` runs the model up to it and the rest (merge, LayerNorm,
Dense, loss) inside `chunked_cross_entropy`'s chunks, recomputed in the backward pass.

The loss and accuracy equal those of `cross_entropy(model.apply(...))` up to float round-off.
Models whose tail is not of that shape (a classifier, several outputs) return None from
`head_split` and are differentiated whole.
"""

from __future__ import annotations

import jax

from terraformer.layers.base import as_items
from terraformer.layers.chunked_loss import DEFAULT_CHUNK_LEN, chunked_cross_entropy
from terraformer.layers.combinators import Serial
from terraformer.layers.core import Dense
from terraformer.training.batches import model_input
from terraformer.training.memory_efficient import LayerRange, is_positionwise

__all__ = ["chunked_loss", "head_split"]


def head_split(model) -> int | None:
    """The index of the first layer of `model`'s position-wise tail (`is_positionwise`)
    before its output `Dense` and `LogSoftmax`, for a one-output Serial; else None."""
    if not isinstance(model, Serial) or model.n_out != 1 or model.n_in not in (1, 2):
        return None
    layers = model.sublayers
    n = len(layers)
    if n < 3 or not isinstance(layers[-2], Dense) or layers[-1].name != "LogSoftmax":
        return None
    split = n - 2
    while split > 0 and is_positionwise(layers[split - 1]):
        split -= 1
    return split if split > 0 else None


def _items(model, batch):
    return as_items(model_input(model, batch), model.n_in, model.name)


def chunked_loss(model, split: int, weights, state, batch, rng,
                 chunk_len: int = DEFAULT_CHUNK_LEN):
    """`(loss, (new_state, accuracy))` of `model` on `batch`, its layers from `split` on
    (`head_split`) and the cross-entropy run `chunk_len` positions at a time; None when
    those layers do not map the stack to one `[batch, length, d]` array for these targets
    (the caller then differentiates the model whole)."""
    n = len(model.sublayers)
    weights, state = tuple(weights), tuple(state)
    items, trunk_state = LayerRange(model, 0, split).apply(
        _items(model, batch), weights[:split], state[:split], rng)
    body = LayerRange(model, split, n - 2)
    body_w, body_s = weights[split:-2], state[split:-2]

    def hidden_fn(*chunk_items):
        return body.apply(chunk_items, body_w, body_s, rng)[0][0]

    _, targets, mask = batch
    out = jax.eval_shape(lambda xs: body.apply(xs, body_w, body_s, rng)[0], tuple(items))
    if len(out) != 1 or out[0].ndim != 3 or out[0].shape[:2] != tuple(targets.shape):
        return None
    dense = weights[-2]
    loss, acc = chunked_cross_entropy(tuple(items), dense["w"], dense.get("b"), targets, mask,
                                      chunk_len, hidden_fn=hidden_fn)
    return loss, (tuple(trunk_state) + state[split:], acc)

