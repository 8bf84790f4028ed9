"""Model FLOPs, counted from a function's jaxpr: the numerator of a floor fraction.

    forward_flops(fn, *args)            # FLOPs of one call of fn (its matmuls and convolutions)
    train_flops(model, signature)       # 3 x the forward pass of a layer: a training step

What is counted: every `dot_general` (2 * batch * M * N * K: a multiply and an add per term)
and every `conv_general_dilated` (2 * output elements * kernel terms per output) in the traced
computation, at the shapes traced. Elementwise work (softmax, LayerNorm, activations, the loss,
optimizer updates) is not: on the models here it is a few percent of the matmuls, and it is
memory-bound, so a FLOP floor leaves it out as MaxText and nanoGPT do.

- Loops: a `scan` (also `lax.map` and a `fori_loop` of static trip count, which JAX writes as
  scans) counts its body `length` times; a `cond` counts its most expensive branch; a
  `while_loop` of unknown trip count is a ValueError (nothing honest to count).
- Calls (`pjit`, `custom_vjp_call`, `custom_jvp_call`, `checkpoint`/remat, ...) count the
  function they call once. A `custom_vjp` contributes its *forward* function only: its
  backward rule is not part of the traced forward.
- Attention is counted as the model computes it. Full attention (`dot_product_attention`)
  computes the whole L x L square of scores and is counted whole: 4 * L^2 * d per head
  (scores and values), not the causal half, as nanoGPT's `estimate_mfu` and MaxText's
  training-FLOPs count do. Chunked LSH and local attention compute each chunk of queries
  against its window of key chunks (`attention_core.blocked_attention`), and that is what is
  counted: 4 * L * window * d per head and hash round, plus the hashing's random rotations
  (a matmul of the queries/keys by the rotation matrix).

`train_flops` is the model FLOPs of a training step: 3 x the forward pass (the backward pass
costs two matmuls for each forward one: the gradient of the input and of the weight), the
definition of model FLOPs utilisation (MFU). Recomputation is not counted: the reversible
stack's backward pass recomputes each block's forward, and rematerialised regions (blocked
attention, chunked feed-forward, chunked loss) recompute theirs, but model FLOPs exclude it
(what the hardware spends on it is a cost of the implementation, which the floor fraction is
meant to show). The LSH hashing has no gradient yet is counted 3x as well, for one simple
rule; it is about two percent of the count at the T workloads' shapes.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.extend.core import ClosedJaxpr, Jaxpr


def dot_general_flops(lhs_shape, rhs_shape, dimension_numbers) -> int:
    """2 * (batch) * (lhs free) * (rhs free) * (contracted) of one dot_general."""
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    batch = math.prod(lhs_shape[d] for d in lhs_batch)
    contract = math.prod(lhs_shape[d] for d in lhs_contract)
    lhs_free = math.prod(s for d, s in enumerate(lhs_shape)
                         if d not in lhs_contract and d not in lhs_batch)
    rhs_free = math.prod(s for d, s in enumerate(rhs_shape)
                         if d not in rhs_contract and d not in rhs_batch)
    return 2 * batch * lhs_free * rhs_free * contract


def conv_flops(out_shape, rhs_shape, dimension_numbers) -> int:
    """2 * output elements * (kernel spatial size * input features per group: the kernel's
    input-feature dimension, which is already per group)."""
    rhs_spec = dimension_numbers.rhs_spec  # (out feature dim, in feature dim, spatial...)
    in_features = rhs_shape[rhs_spec[1]]
    spatial = math.prod(rhs_shape[d] for d in rhs_spec[2:])
    return 2 * math.prod(out_shape) * in_features * spatial


def jaxpr_flops(jaxpr) -> int:
    """FLOPs of a (Closed)Jaxpr's matmuls and convolutions (rules: the module docstring)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0
    for eqn in jaxpr.eqns:
        name, params = eqn.primitive.name, eqn.params
        if name == "dot_general":
            total += dot_general_flops(eqn.invars[0].aval.shape, eqn.invars[1].aval.shape,
                                       params["dimension_numbers"])
        elif name == "conv_general_dilated":
            total += conv_flops(eqn.outvars[0].aval.shape, eqn.invars[1].aval.shape,
                                params["dimension_numbers"])
        elif name == "scan":
            total += params["length"] * jaxpr_flops(params["jaxpr"])
        elif name == "cond":
            total += max(jaxpr_flops(branch) for branch in params["branches"])
        elif name == "while":
            if jaxpr_flops(params["body_jaxpr"]) or jaxpr_flops(params["cond_jaxpr"]):
                raise ValueError(
                    "jaxpr_flops: a while_loop with matmuls in its body has no static trip "
                    "count to count them by; write it as a scan or a fori_loop of static bounds")
        else:  # a call: pjit, custom_vjp_call (its forward), custom_jvp_call, remat, ...
            total += sum(jaxpr_flops(value) for value in params.values()
                         if isinstance(value, (Jaxpr, ClosedJaxpr)))
    return total


def forward_flops(fn, *args) -> int:
    """FLOPs of `fn(*args)`; args may be arrays or `jax.ShapeDtypeStruct`s (nothing runs)."""
    return jaxpr_flops(jax.make_jaxpr(fn)(*args))


def abstract(tree):
    """The `jax.ShapeDtypeStruct`s of a pytree of arrays (or of ShapeDtypes)."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(tuple(a.shape), np.dtype(a.dtype)), tree)


def model_forward_flops(model, inputs, weights, state, rng=None) -> int:
    """FLOPs of `model.apply(inputs, weights, state, rng)`; any argument may be abstract."""
    def apply(x, w, s, r):
        return model.apply(x, w, s, r)[0]

    return forward_flops(apply, abstract(inputs), abstract(weights), abstract(state),
                         None if rng is None else abstract(rng))


def train_flops(model, inputs, weights, state, rng=None) -> int:
    """Model FLOPs of a training step on `inputs`: 3 x the forward pass (module docstring)."""
    return 3 * model_forward_flops(model, inputs, weights, state, rng)
