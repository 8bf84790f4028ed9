"""Losses and metrics on (model_output, targets, weights) stacks.

`model_output` holds log-probabilities [batch, length, vocab]; `targets` int ids
[batch, length]; `weights` [batch, length] (0 masks a position out). Each returns the
weighted mean over positions, a scalar. A classifier's are [batch, n_classes], [batch] and
[batch]: one position per sequence.
"""

from __future__ import annotations

import jax.numpy as jnp

from terraformer.layers.base import Layer, PureLayer


def _check(log_probs, targets, weights, who):
    if log_probs.shape[:-1] != targets.shape or targets.shape != weights.shape:
        raise ValueError(
            f"{who}: expected log_probs [..., vocab] with targets and weights of shape "
            f"log_probs.shape[:-1]; got {tuple(log_probs.shape)}, {tuple(targets.shape)}, "
            f"{tuple(weights.shape)}"
        )


def weighted_mean(values, weights):
    """sum(values * weights) / sum(weights), 0 when all weights are 0."""
    weights = weights.astype(jnp.float32)
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1e-9)


def cross_entropy(log_probs, targets, weights):
    """Weighted mean of -log p(target)."""
    _check(log_probs, targets, weights, "cross_entropy")
    picked = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return weighted_mean(-picked.astype(jnp.float32), weights)


def accuracy(log_probs, targets, weights):
    """Weighted fraction of positions where argmax equals the target."""
    _check(log_probs, targets, weights, "accuracy")
    correct = (jnp.argmax(log_probs, axis=-1) == targets).astype(jnp.float32)
    return weighted_mean(correct, weights)


def sequence_accuracy(log_probs, targets, weights):
    """Fraction of sequences whose every weighted position is right (targets [batch] are one
    position per sequence: then the accuracy over the batch, unweighted)."""
    _check(log_probs, targets, weights, "sequence_accuracy")
    wrong = (jnp.argmax(log_probs, axis=-1) != targets) & (weights > 0)
    wrong = wrong.reshape(wrong.shape[0], -1)
    return jnp.mean(1.0 - jnp.any(wrong, axis=-1).astype(jnp.float32))


def CrossEntropyLoss() -> Layer:  # noqa: N802
    """(log_probs, targets, weights) -> (mean cross-entropy)."""
    return PureLayer(cross_entropy, n_in=3, name="CrossEntropyLoss")


def Accuracy() -> Layer:  # noqa: N802
    """(log_probs, targets, weights) -> (weighted accuracy)."""
    return PureLayer(accuracy, n_in=3, name="Accuracy")


def SequenceAccuracy() -> Layer:  # noqa: N802
    """(log_probs, targets, weights) -> (fraction of fully correct sequences)."""
    return PureLayer(sequence_accuracy, n_in=3, name="SequenceAccuracy")
