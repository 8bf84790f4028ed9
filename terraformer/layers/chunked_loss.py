"""Cross-entropy of the output layer over chunks of the length axis: no [length, vocab] logits.

A language model ends in `Dense(vocab) -> LogSoftmax -> cross-entropy`. At a million tokens and
a vocabulary of 32,000 the logits alone are 128 GB in float32; their gradient as much again.
`chunked_cross_entropy` computes the same weighted mean loss (and accuracy) from the hidden
states before the output layer, `chunk_len` positions at a time:

    logits_c = h_c @ w + b                       # [batch, chunk_len, vocab]
    loss_c   = sum(weights_c * (logsumexp(logits_c) - logits_c[target_c]))

under `lax.scan` with a `jax.checkpoint`-ed body, so the backward pass recomputes each chunk's
logits instead of keeping them: memory O(batch * chunk_len * vocab) whatever the length. A
length that is not a multiple of `chunk_len` ends in a chunk overlapping the one before, the
overlap weighted 0.

    loss, acc = chunked_cross_entropy(h, w, b, targets, weights, chunk_len=2048)
    # == cross_entropy(log_softmax(h @ w + b), targets, weights), accuracy(...)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from terraformer.checks import check_int

DEFAULT_CHUNK_LEN = 2048


def _check(hidden, w, b, targets, weights, chunk_len):
    if hidden.ndim != 3:
        raise ValueError(
            f"chunked_cross_entropy: hidden must be [batch, length, d], got shape "
            f"{tuple(hidden.shape)}"
        )
    if w.ndim != 2 or w.shape[0] != hidden.shape[-1]:
        raise ValueError(
            f"chunked_cross_entropy: w must be [d={hidden.shape[-1]}, vocab], got shape "
            f"{tuple(w.shape)}"
        )
    if b is not None and tuple(b.shape) != (w.shape[1],):
        raise ValueError(
            f"chunked_cross_entropy: b must be [vocab={w.shape[1]}], got shape {tuple(b.shape)}"
        )
    if tuple(targets.shape) != hidden.shape[:2] or tuple(weights.shape) != hidden.shape[:2]:
        raise ValueError(
            f"chunked_cross_entropy: targets and weights must be [batch, length]="
            f"{tuple(hidden.shape[:2])}, got {tuple(targets.shape)} and {tuple(weights.shape)}"
        )
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise TypeError(f"chunked_cross_entropy: targets must be integer ids, got {targets.dtype}")
    check_int("chunk_len", chunk_len, 1, "chunked_cross_entropy")


def _chunk_sums(h, w, b, targets, weights):
    """(sum of weighted -log p(target), sum of weighted correct) over one chunk."""
    logits = jnp.dot(h, w.astype(h.dtype))
    if b is not None:
        logits = logits + lax.broadcast_to_rank(b.astype(h.dtype), logits.ndim)
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - picked
    weights = weights.astype(jnp.float32)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return jnp.sum(nll * weights), jnp.sum(correct * weights)


def chunked_cross_entropy(hidden, w, b, targets, weights, chunk_len: int = DEFAULT_CHUNK_LEN,
                          hidden_fn=None):
    """Weighted mean cross-entropy and accuracy of `log_softmax(hidden @ w + b)`, by chunks.

    Args:
      hidden: [batch, length, d] float, the output layer's input (after the final LayerNorm);
        with `hidden_fn`, the arrays (one, or a tuple) `hidden_fn` maps to it.
      w: [d, vocab] and b: [vocab] or None, the output layer's weights (Dense's 'w', 'b').
      targets: int [batch, length]; weights: [batch, length] (0 masks a position out).
      chunk_len: positions per chunk; peak memory of the logits is batch * chunk_len * vocab.
      hidden_fn: optional position-wise function (e.g. the model's final merge and LayerNorm,
        closing over their weights) of chunks of `hidden`'s arrays ([batch, chunk, ...] each)
        giving the output layer's input [batch, chunk, d]. It runs inside each chunk (and is
        recomputed there in the backward pass), so its [length, d] output never exists
        whole either. It must act on each position alone: chunks are cut along axis 1 (the
        last one is the last chunk_len positions, its overlap with the one before weighted 0).

    Returns:
      (loss, accuracy): float32 scalars, `sum(weights * nll) / sum(weights)` and the weighted
      fraction of positions whose argmax is the target (0 when every weight is 0). Equal to
      `losses.cross_entropy` / `losses.accuracy` of the unchunked log-probabilities.
      Differentiable in `hidden`, `w`, `b` (and what `hidden_fn` closes over); the backward
      pass recomputes chunk logits.
    """
    inputs = tuple(hidden) if isinstance(hidden, (tuple, list)) else (hidden,)
    if hidden_fn is None:
        if len(inputs) != 1:
            raise ValueError(
                f"chunked_cross_entropy: hidden must be one array without hidden_fn, got "
                f"{len(inputs)}")
        fn = _identity
        full = inputs[0]
    else:
        fn = hidden_fn
        full = jax.eval_shape(hidden_fn, *inputs)
        if any(a.ndim < 2 or a.shape[:2] != tuple(targets.shape) for a in inputs):
            raise ValueError(
                "chunked_cross_entropy: every input of hidden_fn must be [batch, length, ...]="
                f"{tuple(targets.shape)}, got {[tuple(a.shape) for a in inputs]}"
            )
    _check(full, w, b, targets, weights, chunk_len)
    batch, length = full.shape[:2]
    total = jnp.sum(weights.astype(jnp.float32))
    if length <= chunk_len:
        nll, correct = jax.checkpoint(
            lambda xs, t, m: _chunk_sums(fn(*xs), w, b, t, m))(inputs, targets, weights)
    else:
        # A scan over chunk indices; each step slices its chunk out of the whole arrays
        # inside the checkpoint, so no per-chunk copy of the inputs is saved or stacked (the
        # backward pass accumulates the inputs' gradient in one [length, ...] buffer). The last
        # chunk is the last chunk_len positions, with those an earlier chunk had weighted 0.
        n_chunks = -(-length // chunk_len)

        @jax.checkpoint
        def chunk_sums(i, inputs, targets, weights):
            start = jnp.minimum(i * chunk_len, length - chunk_len)

            def cut(a):
                return lax.dynamic_slice_in_dim(a, start, chunk_len, axis=1)

            fresh = (start + jnp.arange(chunk_len)) >= i * chunk_len
            mask = cut(weights).astype(jnp.float32) * fresh[None].astype(jnp.float32)
            return _chunk_sums(fn(*(cut(a) for a in inputs)), w, b, cut(targets), mask)

        def step(carry, i):
            nll, correct = chunk_sums(i, inputs, targets, weights)
            return (carry[0] + nll, carry[1] + correct), None

        zero = jnp.zeros((), jnp.float32)
        (nll, correct), _ = lax.scan(step, (zero, zero), jnp.arange(n_chunks))
    denominator = jnp.maximum(total, 1e-9)
    return nll / denominator, correct / denominator


def _identity(x):
    return x


__all__ = ["DEFAULT_CHUNK_LEN", "chunked_cross_entropy"]
