"""Combinators: layers built from layers, passing data on a stack.

Stack effects are written top of stack first, e.g. `Swap: (a, b) -> (b, a)`.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
from jax import lax

from terraformer.checks import check_int
from terraformer.layers.base import (
    EMPTY,
    Layer,
    PureLayer,
    as_items,
    from_items,
    split_rng,
)
from terraformer.shapes import ShapeDtype


def _as_out_items(y, n: int, who: str) -> tuple:
    return as_items(y, n, who + " (output)")


def _sig_items(sig, n: int) -> tuple:
    if n == 1 and not isinstance(sig, tuple):
        return (sig,)
    if not isinstance(sig, tuple):
        return (sig,)
    return sig


def serial_arity(layers) -> tuple[int, int]:
    """(n_in, n_out) of running `layers` one after another on a stack."""
    n_in, depth = 0, 0
    for layer in layers:
        if layer.n_in > depth:
            n_in += layer.n_in - depth
            depth = layer.n_in
        depth += layer.n_out - layer.n_in
    return n_in, depth


def ensure_layers(layers, who: str) -> list[Layer]:
    """`layers` as a flat list (nested lists and tuples flattened, Nones dropped); a TypeError
    naming `who` for anything that is not a Layer."""
    flat = []
    for layer in layers:
        if layer is None:
            continue
        if isinstance(layer, (list, tuple)):
            flat.extend(ensure_layers(layer, who))
        elif isinstance(layer, Layer):
            flat.append(layer)
        else:
            raise TypeError(f"{who}: expected Layer instances, got {type(layer).__name__}")
    return flat


# How `Serial._run` runs its sublayers (a `saved` tuple being the third way).
_APPLY, _SAVE = "apply", "save"


class Serial(Layer):
    """Runs layers one after another on the stack.

    `Serial(Dense(4), Relu())`: (x) -> (relu(dense(x))).
    `Serial(Dup(), Parallel(f, g))`: (x) -> (f(x), g(x)).
    Each sublayer pops its `n_in` items and pushes its `n_out`; items it does not pop stay.
    """

    def __init__(self, *layers, name: str | None = None):
        layers = ensure_layers(layers, "Serial")
        n_in, n_out = serial_arity(layers)
        super().__init__(n_in=n_in, n_out=n_out, name=name or "Serial", sublayers=layers)

    def init_weights_and_state(self, input_signature, rng):
        stack = _sig_items(input_signature, self.n_in)
        weights, states = [], []
        for layer, r in zip(self.sublayers, split_rng(rng, len(self.sublayers))):
            inputs, stack = stack[: layer.n_in], stack[layer.n_in :]
            w, s, out = layer.init_with_output(from_items(inputs, layer.n_in), r)
            weights.append(w)
            states.append(s)
            stack = _sig_items(out, layer.n_out) + stack if layer.n_out else stack
        return tuple(weights), tuple(states)

    def apply(self, x, weights, state, rng):
        y, new_state, _ = self._run(x, weights, state, rng, _APPLY)
        return y, new_state

    def apply_and_save(self, x, weights, state, rng):
        """`saved`: a tuple with each sublayer's, or `()` when none saves anything."""
        if type(self).apply is not Serial.apply:  # a subclass's own apply: save nothing
            return super().apply_and_save(x, weights, state, rng)
        y, new_state, saved = self._run(x, weights, state, rng, _SAVE)
        return y, new_state, saved if jax.tree.leaves(saved) else ()

    def apply_with_saved(self, x, weights, state, rng, saved):
        if not jax.tree.leaves(saved):
            return self.apply(x, weights, state, rng)
        return self._run(x, weights, state, rng, saved)[:2]

    def _run(self, x, weights, state, rng, saved):
        """The sublayers in turn: `apply` (saved `_APPLY`), `apply_and_save` (`_SAVE`), or
        `apply_with_saved` on each sublayer's entry of a `saved` tuple."""
        stack = as_items(x, self.n_in, self.name)
        new_states, new_saved = [], []
        rngs = split_rng(rng, len(self.sublayers))
        for i, (layer, w, s, r) in enumerate(zip(self.sublayers, weights, state, rngs)):
            inputs, stack = stack[: layer.n_in], stack[layer.n_in :]
            x_in = from_items(inputs, layer.n_in)
            if saved is _APPLY:
                y, s = layer.apply(x_in, w, s, r)
            elif saved is _SAVE:
                y, s, kept = layer.apply_and_save(x_in, w, s, r)
                new_saved.append(kept)
            else:
                y, s = layer.apply_with_saved(x_in, w, s, r, saved[i])
            stack = _as_out_items(y, layer.n_out, layer.name) + stack
            new_states.append(s)
        return from_items(stack, self.n_out), tuple(new_states), tuple(new_saved)


class Parallel(Layer):
    """Runs layers side by side on consecutive stack items.

    `Parallel(f, g)`: (a, b) -> (f(a), g(b)) for one-input, one-output f and g.
    """

    def __init__(self, *layers, name: str | None = None):
        layers = ensure_layers(layers, "Parallel")
        super().__init__(
            n_in=sum(l.n_in for l in layers),
            n_out=sum(l.n_out for l in layers),
            name=name or "Parallel",
            sublayers=layers,
        )

    def _split_inputs(self, items):
        out, i = [], 0
        for layer in self.sublayers:
            out.append(items[i : i + layer.n_in])
            i += layer.n_in
        return out

    def init_weights_and_state(self, input_signature, rng):
        groups = self._split_inputs(_sig_items(input_signature, self.n_in))
        weights, states = [], []
        for layer, items, r in zip(self.sublayers, groups, split_rng(rng, len(groups))):
            w, s = layer.init_weights_and_state(from_items(items, layer.n_in), r)
            weights.append(w)
            states.append(s)
        return tuple(weights), tuple(states)

    def apply(self, x, weights, state, rng):
        groups = self._split_inputs(as_items(x, self.n_in, self.name))
        outputs, new_states = [], []
        rngs = split_rng(rng, len(groups))
        for layer, items, w, s, r in zip(self.sublayers, groups, weights, state, rngs):
            y, s = layer.apply(from_items(items, layer.n_in), w, s, r)
            outputs.extend(_as_out_items(y, layer.n_out, layer.name))
            new_states.append(s)
        return from_items(tuple(outputs), self.n_out), tuple(new_states)


class Branch(Layer):
    """Runs each layer on a copy of the top of the stack; pushes all their outputs.

    `Branch(f, g)`: (x) -> (f(x), g(x)). A layer with `n_in = k` sees the top k items;
    the branch pops max(n_in) items. `None` stands for the identity on the top item.
    """

    def __init__(self, *layers, name: str | None = None):
        layers = [Select([0]) if l is None else l for l in layers]
        layers = ensure_layers(layers, "Branch")
        super().__init__(
            n_in=max([l.n_in for l in layers] + [1]),
            n_out=sum(l.n_out for l in layers),
            name=name or "Branch",
            sublayers=layers,
        )

    def init_weights_and_state(self, input_signature, rng):
        items = _sig_items(input_signature, self.n_in)
        weights, states = [], []
        for layer, r in zip(self.sublayers, split_rng(rng, len(self.sublayers))):
            w, s = layer.init_weights_and_state(from_items(items[: layer.n_in], layer.n_in), r)
            weights.append(w)
            states.append(s)
        return tuple(weights), tuple(states)

    def apply(self, x, weights, state, rng):
        items = as_items(x, self.n_in, self.name)
        outputs, new_states = [], []
        rngs = split_rng(rng, len(self.sublayers))
        for layer, w, s, r in zip(self.sublayers, weights, state, rngs):
            y, s = layer.apply(from_items(items[: layer.n_in], layer.n_in), w, s, r)
            outputs.extend(_as_out_items(y, layer.n_out, layer.name))
            new_states.append(s)
        return from_items(tuple(outputs), self.n_out), tuple(new_states)


def Select(indices, n_in: int | None = None, name: str | None = None) -> Layer:  # noqa: N802
    """Copies, drops and reorders stack items.

    `Select([0, 0])`: (a) -> (a, a). `Select([1, 0], n_in=3)`: (a, b, c) -> (b, a).
    """
    indices = tuple(int(i) for i in indices)
    if n_in is None:
        n_in = max(indices) + 1 if indices else 0
    if indices and max(indices) >= n_in:
        raise ValueError(f"Select: index {max(indices)} out of range for n_in={n_in}")
    n_out = len(indices)

    def select(*items):
        out = tuple(items[i] for i in indices)
        return out[0] if n_out == 1 else out

    return PureLayer(select, n_in=n_in, n_out=n_out, name=name or f"Select{list(indices)}")


def Dup() -> Layer:  # noqa: N802
    """(x) -> (x, x)."""
    return Select([0, 0], name="Dup")


def Swap() -> Layer:  # noqa: N802
    """(a, b) -> (b, a)."""
    return Select([1, 0], name="Swap")


def Drop() -> Layer:  # noqa: N802
    """(x) -> (): removes the top item."""
    return PureLayer(lambda x: (), n_in=1, n_out=0, name="Drop")


def Fn(name: str, f, n_out: int = 1) -> Layer:  # noqa: N802
    """A layer from a function of its inputs; `n_in` is the number of positional arguments.

    `Fn('Sum', lambda a, b: a + b)`: (a, b) -> (a + b).
    """
    params = inspect.signature(f).parameters.values()
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in params):
        raise ValueError(f"Fn {name!r}: f must take a fixed number of positional arguments")
    n_in = sum(1 for p in params if p.kind in kinds and p.default is inspect.Parameter.empty)
    return PureLayer(f, n_in=n_in, n_out=n_out, name=name)


def Add() -> Layer:  # noqa: N802
    """(a, b) -> (a + b)."""
    return Fn("Add", lambda a, b: a + b)


def Multiply() -> Layer:  # noqa: N802
    """(a, b) -> (a * b)."""
    return Fn("Multiply", lambda a, b: a * b)


def Concatenate(n_items: int = 2, axis: int = -1) -> Layer:  # noqa: N802
    """(x_1, ..., x_n) -> (concatenate([x_1, ..., x_n], axis))."""
    check_int("n_items", n_items, 2, "Concatenate")
    return PureLayer(
        lambda *xs: jnp.concatenate(xs, axis=axis), n_in=n_items, name="Concatenate"
    )


def Residual(*layers, shortcut: Layer | None = None) -> Layer:  # noqa: N802
    """(x, ...) -> (layers(x, ...) + shortcut(x), ...): adds a shortcut around `layers`."""
    return Serial(Branch(shortcut, Serial(*layers)), Add(), name="Residual")


class Chunk(Layer):
    """Applies a position-wise layer to chunks of the length axis (axis 1), one at a time.

    Memory of the layer's intermediate values grows with `chunk_size`, not the length: the
    chunks run in a `lax.map` whose body is rematerialised in the backward pass. A length that
    is not a multiple of `chunk_size` is zero-padded to one and the padding cut off again
    (correct because the layer is position-wise). Inputs shorter than a chunk run whole.
    `chunk_size=0` or None runs the layer unchunked.
    """

    def __init__(self, layer: Layer, chunk_size: int | None):
        if chunk_size is not None:
            check_int("chunk_size", chunk_size, 0, "Chunk")
        super().__init__(n_in=layer.n_in, n_out=layer.n_out, name="Chunk", sublayers=[layer])
        self._chunk_size = chunk_size

    def init_weights_and_state(self, input_signature, rng):
        return self.sublayers[0].init_weights_and_state(input_signature, rng)

    def pack_for_decoding(self, weights, dtype: str):
        """The chunked layer's weights (the Chunk's own) packed by that layer."""
        return self.sublayers[0].pack_for_decoding(weights, dtype)

    def apply(self, x, weights, state, rng):
        layer = self.sublayers[0]
        items = as_items(x, self.n_in, self.name)
        length = items[0].shape[1] if items[0].ndim > 1 else 0
        size = self._chunk_size
        if not size or length <= size:
            return layer.apply(x, weights, state, rng)
        n_chunks = -(-length // size)
        pad = n_chunks * size - length

        def to_chunks(a):
            a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
            a = a.reshape(a.shape[0], n_chunks, size, *a.shape[2:])
            return jnp.moveaxis(a, 1, 0)

        def from_chunks(a):
            a = jnp.moveaxis(a, 0, 1)
            return a.reshape(a.shape[0], n_chunks * size, *a.shape[3:])[:, :length]

        @jax.checkpoint
        def run(chunk_items, r):
            y, _ = layer.apply(from_items(chunk_items, self.n_in), weights, state, r)
            return _as_out_items(y, self.n_out, layer.name)

        chunks = tuple(to_chunks(a) for a in items)
        rngs = None if rng is None else jax.random.split(rng, n_chunks)
        if rngs is None:
            ys = lax.map(lambda c: run(c, None), chunks)
        else:
            ys = lax.map(lambda cr: run(cr[0], cr[1]), (chunks, rngs))
        return from_items(tuple(from_chunks(y) for y in ys), self.n_out), state


class Scan(Layer):
    """Scans a layer along `axis` of its inputs, carrying `n_carry` values between steps.

    The layer maps (x_t..., carry...) -> (y_t..., new_carry...). The scan maps
    (xs..., initial_carry...) -> (ys..., final_carry...), where xs and ys are stacked on `axis`.
    """

    def __init__(self, layer: Layer, axis: int = 0, n_carry: int = 1, remat: bool = False):
        if n_carry > min(layer.n_in, layer.n_out):
            raise ValueError(
                f"Scan: n_carry={n_carry} exceeds the layer's n_in={layer.n_in} or "
                f"n_out={layer.n_out}"
            )
        super().__init__(n_in=layer.n_in, n_out=layer.n_out, name="Scan", sublayers=[layer])
        self._axis = axis
        self._n_carry = n_carry
        self._remat = remat

    def _slice_signature(self, input_signature):
        items = _sig_items(input_signature, self.n_in)
        n_xs = self.n_in - self._n_carry
        sliced = []
        for i, s in enumerate(items):
            if i < n_xs:
                shape = list(s.shape)
                del shape[self._axis]
                sliced.append(ShapeDtype(tuple(shape), s.dtype))
            else:
                sliced.append(s)
        return from_items(tuple(sliced), self.n_in)

    def init_weights_and_state(self, input_signature, rng):
        return self.sublayers[0].init_weights_and_state(
            self._slice_signature(input_signature), rng
        )

    def pack_for_decoding(self, weights, dtype: str):
        """The scanned layer's weights (the Scan's own) packed by that layer."""
        return self.sublayers[0].pack_for_decoding(weights, dtype)

    def apply(self, x, weights, state, rng):
        layer = self.sublayers[0]
        items = as_items(x, self.n_in, self.name)
        n_xs = self.n_in - self._n_carry
        xs = tuple(jnp.moveaxis(a, self._axis, 0) for a in items[:n_xs])
        carry = tuple(items[n_xs:])
        length = xs[0].shape[0] if xs else None

        def step(c, inputs):
            carry_items, layer_state = c
            x_t, r = inputs
            y, layer_state = layer.apply(
                from_items(x_t + carry_items, self.n_in), weights, layer_state, r
            )
            out = _as_out_items(y, self.n_out, layer.name)
            n_ys = self.n_out - self._n_carry
            return (out[n_ys:], layer_state), out[:n_ys]

        if self._remat:
            step = jax.checkpoint(step)
        rngs = None if rng is None else jax.random.split(rng, length)
        (carry, state), ys = lax.scan(step, (carry, state), (xs, rngs), length=length)
        ys = tuple(jnp.moveaxis(a, 0, self._axis) for a in ys)
        return from_items(ys + tuple(carry), self.n_out), state


def Identity() -> Layer:  # noqa: N802
    """(x) -> (x)."""
    return PureLayer(lambda x: x, name="Identity")


__all__ = [
    "Add",
    "Branch",
    "Chunk",
    "Concatenate",
    "Drop",
    "Dup",
    "EMPTY",
    "Fn",
    "Identity",
    "Multiply",
    "Parallel",
    "Residual",
    "Scan",
    "Select",
    "Serial",
    "Swap",
]
