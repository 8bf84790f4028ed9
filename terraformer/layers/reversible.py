"""Reversible layers (RevNet / Reformer): the backward pass rebuilds inputs from outputs.

A reversible layer maps its inputs to outputs of the same number and shapes, and can compute
its input back from its output (`reverse`). `ReversibleSerial` runs a stack of them under a
`jax.custom_vjp` that keeps only the final output: the backward pass walks the layers from
last to first, rebuilding each layer's input from its output and taking that layer's
gradients on the way (`reverse_and_grad`). Activation memory is then that of one layer,
whatever the depth.

The Reformer block, on a stack `(x1, x2)` made by `Dup()`::

    ReversibleSerial(
        ReversibleHalfResidual(LayerNorm(), attention),  # (x1, x2) -> (x1 + A(x2), x2)
        ReversibleSwap(),                                # -> (x2, y1)
        ReversibleHalfResidual(FeedForward(...)),        # -> (x2 + FF(y1), y1)
        ReversibleSwap(),                                # -> (y1, y2)
    )

which is `y1 = x1 + A(x2)`, `y2 = x2 + FF(y1)`. Stack effects are written top of stack first.
For a deep stack of identical blocks, `ReversibleRepeat(block, n_layers)` runs them under
`lax.scan`: compile time and activation memory flat in depth on every backend. In predict
mode it runs its blocks one after the other instead, each on its own weights and caches
(see `ReversibleRepeat`).

Randomness (dropout inside a residual function) is drawn from keys split deterministically
from the `rng` argument, so the recomputation in the backward pass sees the same masks as the
forward pass. State is passed through (a layer's new state is what its forward pass returned);
state is not differentiated. Reversal in floating point is exact only up to round-off
(`(x1 + F(x2)) - F(x2)` in float32 differs from `x1` by about `eps * |F(x2)|`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from terraformer.checks import check_int
from terraformer.layers.base import EMPTY, Layer, as_items, from_items, split_rng
from terraformer.layers.combinators import Serial, ensure_layers, serial_arity
from terraformer.layers.lean_reverse import lean_apply, lean_reverse_and_grad

# -- cotangent helpers ----------------------------------------------------------------------


def _is_float0(a) -> bool:
    return getattr(a, "dtype", None) == jax.dtypes.float0


def _zero_cotangent(tree):
    """Zero cotangents for `tree`: zeros for inexact leaves, float0 for ints and PRNG keys."""

    def zero(a):
        if jnp.issubdtype(a.dtype, jnp.inexact):
            return jnp.zeros_like(a)
        return np.zeros(a.shape, dtype=jax.dtypes.float0)

    return jax.tree.map(zero, tree)


def _add_cotangents(a, b):
    """a + b for cotangents, where either may be float0 (an integer input's cotangent)."""
    if _is_float0(a):
        return a
    if _is_float0(b):
        return b
    return a + b.astype(a.dtype)


def _barrier(tree):
    """`lax.optimization_barrier` on the array leaves of `tree` (float0 leaves pass by).

    The layer loops tie each layer's inputs (the rebuilt stack, the gradients so far, and the
    layer's weights) together before running it. Rebuilding inputs does not depend on the
    gradients, and broadcasts of weights look the same in the forward pass and in the
    recomputation; without the barrier the compiler may rebuild every layer's input first,
    or hoist and share per-layer work between the passes, and keep it all alive at once: the
    memory, growing with depth, that reversibility exists to avoid. XLA's GPU and TPU
    pipelines keep barriers until scheduling; its CPU pipeline drops them before, so there the
    unrolled stack's memory still grows with depth, if far slower than an ordinary stack's
    (`ReversibleRepeat`, a `lax.scan`, stays flat everywhere).
    """
    leaves, treedef = jax.tree.flatten(tree)
    arrays = [a for a in leaves if not _is_float0(a)]
    tied = iter(lax.optimization_barrier(arrays))
    return jax.tree.unflatten(treedef, [a if _is_float0(a) else next(tied) for a in leaves])


def _top(y, n_out: int):
    return y[0] if n_out > 1 else y


# -- the contract ---------------------------------------------------------------------------


class ReversibleLayer(Layer):
    """A layer whose input can be computed from its output; `n_in == n_out`.

    Subclasses define `apply` and `reverse`; they may override `reverse_and_grad` with
    something cheaper than the default (reverse, then a `jax.vjp` of `apply`).
    """

    def __init__(self, n_in: int = 1, n_out: int | None = None, name=None, sublayers=()):
        n_out = n_in if n_out is None else n_out
        if n_in != n_out:
            raise ValueError(
                f"{name or type(self).__name__}: a reversible layer needs n_in == n_out, "
                f"got n_in={n_in}, n_out={n_out}"
            )
        super().__init__(n_in=n_in, n_out=n_out, name=name, sublayers=sublayers)

    def reverse(self, output, weights=EMPTY, state=EMPTY, rng=None):
        """The input that `apply(input, weights, state, rng)` maps to `output`."""
        raise TypeError(f"{self.name}: a ReversibleLayer subclass must override reverse")

    def reverse_and_grad(self, output, grad_output, weights=EMPTY, state=EMPTY, rng=None,
                         saved=()):
        """Rebuilds the input from `output` and pulls `grad_output` back through the layer.

        Returns `(input, (grad_input, grad_weights))`; `input`, `grad_input` and `output` are
        bare arrays when `n_in == 1`, tuples otherwise. `state` and `rng` must be those the
        forward pass got; `saved`, what its `apply_and_save` saved (or `()`: recompute all).
        """
        x = self.reverse(output, weights, state, rng)
        _, vjp = jax.vjp(lambda x_, w_: self.apply_with_saved(x_, w_, state, rng, saved)[0],
                         x, weights)
        grad_x, grad_w = vjp(grad_output)
        return x, (grad_x, grad_w)


# -- simple reversible layers -----------------------------------------------------------------


class ReversibleSelect(ReversibleLayer):
    """Permutes the top `len(indices)` stack items: output item i is input item indices[i].

    `ReversibleSelect([1, 0])`: (a, b) -> (b, a). `indices` must be a permutation of
    0..n-1 (a copy or a drop could not be reversed).
    """

    def __init__(self, indices, name: str | None = None):
        indices = tuple(int(i) for i in indices)
        if sorted(indices) != list(range(len(indices))) or not indices:
            raise ValueError(
                f"ReversibleSelect: indices must be a permutation of 0..n-1, got {list(indices)}"
            )
        super().__init__(n_in=len(indices), name=name or f"ReversibleSelect{list(indices)}")
        self._indices = indices
        self._inverse = tuple(int(i) for i in np.argsort(indices))

    def _permute(self, x, order):
        items = as_items(x, self.n_in, self.name)
        return from_items(tuple(items[i] for i in order), self.n_in)

    def apply(self, x, weights, state, rng):
        return self._permute(x, self._indices), state

    def reverse(self, output, weights=EMPTY, state=EMPTY, rng=None):
        return self._permute(output, self._inverse)

    def reverse_and_grad(self, output, grad_output, weights=EMPTY, state=EMPTY, rng=None,
                         saved=()):
        grad_input = self._permute(grad_output, self._inverse)
        return self.reverse(output), (grad_input, _zero_cotangent(weights))


def ReversibleSwap() -> ReversibleLayer:  # noqa: N802
    """(a, b) -> (b, a), reversible."""
    return ReversibleSelect([1, 0], name="ReversibleSwap")


class ReversibleHalfResidual(ReversibleLayer):
    """Half of a RevNet residual: (x1, x2, *extras) -> (x1 + F(x2, *extras), x2, *extras).

    `F = Serial(*residual_layers)` reads `x2` and, when it takes more than one input, the
    items below it on the stack (an encoder output, a mask), which pass on unchanged. The
    residual is F's top output (F's other outputs, if any, are dropped) and must have the
    shape of `x1`. This is Trax's convention: the top item is the accumulator, F reads the
    items under it. `reverse`: x1 = y1 - F(x2, *extras).

    Weights and state: `(F_weights,)`, `(F_state,)`.
    """

    def __init__(self, *residual_layers, name: str | None = None):
        layers = ensure_layers(residual_layers, "ReversibleHalfResidual")
        if not layers:
            raise ValueError("ReversibleHalfResidual: needs at least one residual layer")
        residual = Serial(*layers)
        if residual.n_in < 1 or residual.n_out < 1:
            raise ValueError(
                "ReversibleHalfResidual: the residual layers must take and give at least one "
                f"item, got n_in={residual.n_in}, n_out={residual.n_out}"
            )
        n = 1 + residual.n_in
        super().__init__(n_in=n, name=name or "ReversibleHalfResidual", sublayers=[residual])

    def init_weights_and_state(self, input_signature, rng):
        context = input_signature[1:]
        residual = self.sublayers[0]
        weights, state = residual.init_weights_and_state(from_items(context, residual.n_in), rng)
        return (weights,), (state,)

    def _residual(self, context, weights, state, rng, saved=()):
        residual = self.sublayers[0]
        y, new_state = residual.apply_with_saved(from_items(context, residual.n_in), weights[0],
                                                 state[0], rng, saved)
        return _top(y, residual.n_out), (new_state,)

    def _check(self, acc, res):
        if acc.shape != res.shape:
            raise ValueError(
                f"{self.name}: the residual must have the accumulator's shape {tuple(acc.shape)}, "
                f"got {tuple(res.shape)}"
            )

    def apply(self, x, weights, state, rng):
        x1, *context = as_items(x, self.n_in, self.name)
        if len(context) == 1:
            # Long inputs: F(x2) added into x1 head by head or chunk by chunk (lean_reverse).
            y1 = lean_apply(self.sublayers[0], weights[0], state[0], rng, x1, context[0])
            if y1 is not None:
                return (y1, *context), state
        res, new_state = self._residual(tuple(context), weights, state, rng)
        self._check(x1, res)
        return (x1 + res.astype(x1.dtype), *context), new_state

    def apply_and_save(self, x, weights, state, rng):
        """`saved`: what the residual layers' `apply_and_save` saved."""
        x1, *context = as_items(x, self.n_in, self.name)
        residual = self.sublayers[0]
        y, new_state, saved = residual.apply_and_save(from_items(tuple(context), residual.n_in),
                                                      weights[0], state[0], rng)
        res = _top(y, residual.n_out)
        self._check(x1, res)
        return (x1 + res.astype(x1.dtype), *context), (new_state,), saved

    def apply_with_saved(self, x, weights, state, rng, saved):
        x1, *context = as_items(x, self.n_in, self.name)
        res, new_state = self._residual(tuple(context), weights, state, rng, saved)
        self._check(x1, res)
        return (x1 + res.astype(x1.dtype), *context), new_state

    def reverse(self, output, weights=EMPTY, state=EMPTY, rng=None):
        y1, *context = as_items(output, self.n_in, self.name)
        res, _ = self._residual(tuple(context), weights, state, rng)
        self._check(y1, res)
        return (y1 - res.astype(y1.dtype), *context)

    def reverse_and_grad(self, output, grad_output, weights=EMPTY, state=EMPTY, rng=None,
                         saved=()):
        y1, *context = as_items(output, self.n_in, self.name)
        g1, *g_context = as_items(grad_output, self.n_in, self.name)
        context = tuple(context)
        if len(context) == 1 and not _is_float0(g_context[0]):
            # Long inputs: x1 and the gradient of x2 built in place (layers.lean_reverse).
            lean = lean_reverse_and_grad(self.sublayers[0], weights[0], state[0], rng, y1,
                                         context[0], g1, g_context[0])
            if lean is not None:
                x1, g2, grad_w = lean
                return (x1, *context), ((g1, g2), (grad_w,))

        def residual_fn(w, ctx):
            return self._residual(ctx, w, state, rng, saved)[0]

        res, vjp = jax.vjp(residual_fn, weights, context)
        self._check(y1, res)
        x1 = y1 - res.astype(y1.dtype)
        grad_w, grad_context = vjp(g1.astype(res.dtype))
        grad_in = (g1,) + tuple(
            _add_cotangents(g, gc) for g, gc in zip(g_context, grad_context, strict=True)
        )
        return (x1, *context), (grad_in, grad_w)


# -- running a stack of reversible layers ----------------------------------------------------


def _check_reversible(layers, who: str) -> list[ReversibleLayer]:
    layers = ensure_layers(layers, who)
    for layer in layers:
        if not isinstance(layer, ReversibleLayer):
            raise TypeError(
                f"{who}: every layer must be a ReversibleLayer, got {layer.name} "
                f"({type(layer).__name__})"
            )
    return layers


def _forward(layers, items, weights, state, rngs):
    """Runs reversible `layers` on the stack `items`; returns (items, new_states, saved), saved
    a tuple of each layer's `apply_and_save` output (or `()` when none saved anything)."""
    new_states, saved = [], []
    for layer, w, s, r in zip(layers, weights, state, rngs, strict=True):
        k = layer.n_in
        items, w = _barrier((items, w))
        y, s, kept = layer.apply_and_save(from_items(items[:k], k), w, s, r)
        items = as_items(y, k, layer.name) + items[k:]
        new_states.append(s)
        saved.append(kept)
    return items, tuple(new_states), _none_if_empty(tuple(saved))


def _none_if_empty(saved):
    """`saved`, or `()` when it holds no array."""
    return saved if jax.tree.leaves(saved) else ()


def _reverse(layers, items, weights, state, rngs):
    """The stack before `layers` ran, rebuilt from the stack `items` after."""
    for layer, w, s, r in reversed(list(zip(layers, weights, state, rngs, strict=True))):
        k = layer.n_in
        x = layer.reverse(from_items(items[:k], k), w, s, r)
        items = as_items(x, k, layer.name) + items[k:]
    return items


def _reverse_and_grad(layers, items, grads, weights, state, rngs, saved=()):
    """Walks `layers` backwards: returns (input items, (input grads, weight grads)). `saved`:
    `_forward`'s, or `()`."""
    grad_weights = [None] * len(layers)
    for i in reversed(range(len(layers))):
        layer, k = layers[i], layers[i].n_in
        items, grads, w = _barrier((items, grads, weights[i]))
        x, (gx, gw) = layer.reverse_and_grad(
            from_items(items[:k], k), from_items(grads[:k], k), w, state[i], rngs[i],
            saved[i] if saved else ()
        )
        items = as_items(x, k, layer.name) + items[k:]
        grads = as_items(gx, k, layer.name) + grads[k:]
        grad_weights[i] = gw
    return items, (grads, tuple(grad_weights))


def _memory_efficient(forward, reverse_and_grad):
    """A custom_vjp function `(items, weights, state, rng) -> (items, new_state, saved)`.

    `forward(items, weights, state, rng)` returns `(items, new_state, saved)`, `saved` the
    integers its layers keep for their recomputation (`Layer.apply_and_save`). The forward
    pass keeps only the outputs and `saved` (and the weights, state and rng it was given);
    its backward pass gets inputs and gradients back with `reverse_and_grad(items, grads,
    weights, state, rng, saved)`. State and rng get zero cotangents.
    """

    @jax.custom_vjp
    def run(items, weights, state, rng):
        return forward(items, weights, state, rng)

    def run_fwd(items, weights, state, rng):
        ys, new_state, kept = forward(items, weights, state, rng)
        return (ys, new_state, kept), (ys, weights, state, rng, kept)

    def run_bwd(residuals, cotangents):
        ys, weights, state, rng, kept = residuals
        grad_ys = cotangents[0]
        _, (grad_xs, grad_w) = reverse_and_grad(ys, grad_ys, weights, state, rng, kept)
        return grad_xs, grad_w, _zero_cotangent(state), _zero_cotangent(rng)

    run.defvjp(run_fwd, run_bwd)
    return run


class ReversibleSerial(ReversibleLayer):
    """Runs reversible layers in sequence, storing no activations for the backward pass.

    Stack effect: like `Serial(*layers)`; n_in = n_out = the largest n_in of its layers.
    Nested lists are flattened. Gradients (`jax.grad`, `jax.vjp`) go through a custom VJP that
    rebuilds each layer's input from its output, so activation memory stays flat in depth
    (where XLA honours scheduling barriers: GPU, TPU; on CPU it grows slowly, see `_barrier`,
    and `ReversibleRepeat` is flat everywhere); the cost is one extra forward computation of
    each residual function. The layer itself is reversible,
    so ReversibleSerials nest.

    Weights and state: tuples with one entry per layer. Each layer gets the key
    `split(rng, n_layers)[i]`, in the forward pass and in the recomputation alike.
    """

    def __init__(self, *layers, name: str | None = None):
        layers = _check_reversible(layers, "ReversibleSerial")
        n_in, _ = serial_arity(layers)
        super().__init__(n_in=n_in, name=name or "ReversibleSerial", sublayers=layers)

    def init_weights_and_state(self, input_signature, rng):
        stack = as_items(input_signature, self.n_in, self.name)
        weights, states = [], []
        for layer, r in zip(self.sublayers, split_rng(rng, len(self.sublayers))):
            k = layer.n_in
            w, s, out = layer.init_with_output(from_items(stack[:k], k), r)
            weights.append(w)
            states.append(s)
            stack = as_items(out, k, layer.name) + stack[k:]
        return tuple(weights), tuple(states)

    def _forward(self, items, weights, state, rng):
        rngs = split_rng(rng, len(self.sublayers))
        return _forward(self.sublayers, items, weights, state, rngs)

    def _reverse_and_grad_items(self, items, grads, weights, state, rng, saved=()):
        rngs = split_rng(rng, len(self.sublayers))
        return _reverse_and_grad(self.sublayers, items, grads, weights, state, rngs, saved)

    def apply(self, x, weights, state, rng):
        y, new_state, _ = self.apply_and_save(x, weights, state, rng)
        return y, new_state

    def apply_and_save(self, x, weights, state, rng):
        """`saved`: a tuple of each layer's (`()` when none saved anything), for
        `reverse_and_grad` (a stack of these inside a `ReversibleRepeat` or another
        `ReversibleSerial` keeps it for its own backward pass)."""
        items = as_items(x, self.n_in, self.name)
        run = _memory_efficient(self._forward, self._reverse_and_grad_items)
        ys, new_state, saved = run(items, weights, state, rng)
        return from_items(ys, self.n_out), new_state, saved

    def reverse(self, output, weights=EMPTY, state=EMPTY, rng=None):
        items = as_items(output, self.n_in, self.name)
        rngs = split_rng(rng, len(self.sublayers))
        return from_items(_reverse(self.sublayers, items, weights, state, rngs), self.n_in)

    def reverse_and_grad(self, output, grad_output, weights=EMPTY, state=EMPTY, rng=None,
                         saved=()):
        items = as_items(output, self.n_in, self.name)
        grads = as_items(grad_output, self.n_in, self.name)
        xs, (gxs, gw) = self._reverse_and_grad_items(items, grads, weights, state, rng, saved)
        return from_items(xs, self.n_in), (from_items(gxs, self.n_in), gw)


class ReversibleRepeat(ReversibleLayer):
    """`n_layers` copies of one reversible `block`, each with its own weights, under `lax.scan`.

    Computes what `ReversibleSerial(block_1, ..., block_n)` computes, but the block is traced
    and compiled once, so compile time stays flat in depth. Weights and state are the block's,
    stacked along a new leading axis of size `n_layers`; layer i gets `split(rng, n)[i]`.
    The backward pass is a reverse `lax.scan` that rebuilds each block's input from its output,
    so activation memory stays flat in depth too.
    """

    def __init__(self, block: ReversibleLayer, n_layers: int, name: str | None = None,
                 mode: str = "train"):
        if not isinstance(block, ReversibleLayer):
            raise TypeError(
                f"ReversibleRepeat: block must be a ReversibleLayer, got {type(block).__name__}"
            )
        check_int("n_layers", n_layers, 1, "ReversibleRepeat")
        super().__init__(n_in=block.n_in, name=name or "ReversibleRepeat", sublayers=[block])
        self._n_layers = n_layers
        self._unrolled = mode == "predict"

    @property
    def n_layers(self) -> int:
        return self._n_layers

    @property
    def unrolled(self) -> bool:
        """Whether the blocks run unrolled on per-layer state (predict mode)."""
        return self._unrolled

    def init_weights_and_state(self, input_signature, rng):
        block = self.sublayers[0]
        rngs = jax.random.split(rng, self._n_layers)
        per_layer = [block.init_weights_and_state(input_signature, r) for r in rngs]
        weights = jax.tree.map(lambda *a: jnp.stack(a), *[w for w, _ in per_layer])
        if self._unrolled:
            return weights, tuple(s for _, s in per_layer)
        state = jax.tree.map(lambda *a: jnp.stack(a), *[s for _, s in per_layer])
        return weights, state

    def pack_for_decoding(self, weights, dtype: str):
        """The stacked weights packed by the block; in predict mode, where the blocks run one
        after another, an `UnstackedLayers` of each layer's weights packed by the block, so
        that a decoding step reads every layer's buffers where they lie (a slice of a stacked
        array would be copied out first)."""
        block = self.sublayers[0]
        if not self._unrolled:
            return block.pack_for_decoding(weights, dtype)
        return UnstackedLayers(tuple(block.pack_for_decoding(self.layer_weights(weights, i), dtype)
                                     for i in range(self._n_layers)))

    def layer_weights(self, weights, i: int):
        """Layer i's weights from stacked weights or an `UnstackedLayers`."""
        if isinstance(weights, UnstackedLayers):
            return weights.layers[i]
        return jax.tree.map(lambda a: a[i], weights)

    def _apply_unrolled(self, x, weights, state, rng):
        block = self.sublayers[0]
        if not isinstance(state, tuple) or len(state) != self._n_layers:
            raise ValueError(
                f"{self.name}: in predict mode the state is a tuple of {self._n_layers} "
                "per-layer states (from init in predict mode)")
        rngs = self._rngs(rng)
        new_state = []
        for i in range(self._n_layers):
            x, s = block.apply(x, self.layer_weights(weights, i), state[i],
                               None if rngs is None else rngs[i])
            new_state.append(s)
        return x, tuple(new_state)

    def _rngs(self, rng):
        return None if rng is None else jax.random.split(rng, self._n_layers)

    def _forward(self, items, weights, state, rng):
        block = self.sublayers[0]
        k = self.n_in

        def step(carry, layer):
            w, s, r = layer
            y, s, kept = block.apply_and_save(from_items(carry, k), w, s, r)
            return as_items(y, k, block.name), (s, kept)

        # Each layer's saved integers are stacked on the layer axis, like its state.
        ys, (new_state, saved) = lax.scan(step, items, (weights, state, self._rngs(rng)),
                                          length=self._n_layers)
        return ys, new_state, saved

    def _reverse_and_grad_items(self, items, grads, weights, state, rng, saved=()):
        block = self.sublayers[0]
        k = self.n_in

        def step(carry, layer):
            ys, gys = carry
            w, s, r, kept = layer
            x, (gx, gw) = block.reverse_and_grad(from_items(ys, k), from_items(gys, k), w, s, r,
                                                 kept)
            return (as_items(x, k, block.name), as_items(gx, k, block.name)), gw

        (xs, gxs), gw = lax.scan(
            step,
            (items, grads),
            (weights, state, self._rngs(rng), saved),
            length=self._n_layers,
            reverse=True,
        )
        return xs, (gxs, gw)

    def apply(self, x, weights, state, rng):
        if self._unrolled:
            return self._apply_unrolled(x, weights, state, rng)
        items = as_items(x, self.n_in, self.name)
        run = _memory_efficient(self._forward, self._reverse_and_grad_items)
        ys, new_state, _ = run(items, weights, state, rng)
        return from_items(ys, self.n_out), new_state

    def reverse(self, output, weights=EMPTY, state=EMPTY, rng=None):
        block = self.sublayers[0]
        k = self.n_in

        def step(ys, layer):
            w, s, r = layer
            return as_items(block.reverse(from_items(ys, k), w, s, r), k, block.name), None

        items = as_items(output, k, self.name)
        xs, _ = lax.scan(
            step, items, (weights, state, self._rngs(rng)), length=self._n_layers, reverse=True
        )
        return from_items(xs, k)

    def reverse_and_grad(self, output, grad_output, weights=EMPTY, state=EMPTY, rng=None,
                         saved=()):
        items = as_items(output, self.n_in, self.name)
        grads = as_items(grad_output, self.n_in, self.name)
        xs, (gxs, gw) = self._reverse_and_grad_items(items, grads, weights, state, rng, saved)
        return from_items(xs, self.n_in), (from_items(gxs, self.n_in), gw)


class UnstackedLayers(NamedTuple):
    """A `ReversibleRepeat`'s weights as one pytree per layer (`layers`, a tuple), for decoding.

    Separate buffers per layer: a decoding step then reads each layer's weights where they
    lie. `ReversibleRepeat.pack_for_decoding` makes one from stacked weights.
    """

    layers: tuple


__all__ = [
    "ReversibleHalfResidual",
    "ReversibleLayer",
    "ReversibleRepeat",
    "ReversibleSelect",
    "ReversibleSerial",
    "ReversibleSwap",
    "UnstackedLayers",
]
