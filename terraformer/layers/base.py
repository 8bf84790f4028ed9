"""The layer contract: stack arity, `init` from a signature, and a pure `apply`.

A layer pops `n_in` items off a data stack and pushes `n_out` results. One item is passed as
a bare array, several as a tuple (stack order: index 0 is the top). Weights and state are
pytrees returned by `init`; `apply` reads them only from its arguments, so it can be wrapped
in `jax.jit`, `jax.grad` and `jax.vmap`.

A Trax-like convenience sits on top: `layer.init(signature)` also keeps the weights and state
on the layer, and `layer(x)` runs `apply` with them.

For decoding, `pack_for_decoding(weights, dtype)` stores the weights in the layout a
predict-mode `apply` reads fastest: combinators recurse into their sublayers, and the layers
that multiply by large kernels (Dense, the attention projections, the sparse layers) override
it; every other layer keeps its weights as they are.
"""

from __future__ import annotations

from typing import Any

import jax

from terraformer import shapes
from terraformer.checks import check_choice

MODES = ("train", "eval", "predict")
EMPTY = ()


def check_mode(mode: str) -> str:
    """Returns `mode` if it is one of MODES, else raises a ValueError naming it."""
    return check_choice("mode", mode, MODES)


def split_rng(rng, n: int) -> list:
    """`n` independent keys from `rng`, or `n` Nones when `rng` is None."""
    if rng is None:
        return [None] * n
    return list(jax.random.split(rng, n))


def as_items(x, n: int, who: str) -> tuple:
    """The stack items of `x` for a layer with `n` inputs (a bare value when n == 1)."""
    if n == 1:
        return (x,)
    if not isinstance(x, (tuple, list)) or len(x) != n:
        got = f"{len(x)} items" if isinstance(x, (tuple, list)) else type(x).__name__
        raise ValueError(f"{who} takes {n} inputs as a tuple, got {got}")
    return tuple(x)


def from_items(items: tuple, n: int) -> Any:
    """Stack items as a layer returns them: a bare value when n == 1, else a tuple."""
    return items[0] if n == 1 else tuple(items)


class Layer:
    """Base class of all layers.

    Subclasses override `init_weights_and_state(input_signature, rng)` (when they have
    weights or state) and `apply(x, weights, state, rng)`.

    Args:
      n_in: how many stack items the layer pops.
      n_out: how many it pushes.
      name: a display name; defaults to the class name.
      sublayers: layers this one is built from (their weights and state are tuples in order).
    """

    def __init__(self, n_in: int = 1, n_out: int = 1, name: str | None = None, sublayers=()):
        if n_in < 0 or n_out < 0:
            raise ValueError(f"n_in and n_out must be >= 0, got n_in={n_in}, n_out={n_out}")
        self._n_in = n_in
        self._n_out = n_out
        self._name = name or type(self).__name__
        self._sublayers = tuple(sublayers)
        self._weights = None
        self._state = None

    # -- arity and description ---------------------------------------------------------------
    @property
    def n_in(self) -> int:
        return self._n_in

    @property
    def n_out(self) -> int:
        return self._n_out

    @property
    def name(self) -> str:
        return self._name

    @property
    def sublayers(self) -> tuple[Layer, ...]:
        return self._sublayers

    def __repr__(self) -> str:
        if not self._sublayers:
            return f"{self._name}_in{self.n_in}_out{self.n_out}"
        inner = "\n".join("  " + line for s in self._sublayers for line in repr(s).splitlines())
        return f"{self._name}_in{self.n_in}_out{self.n_out}[\n{inner}\n]"

    # -- the pure contract --------------------------------------------------------------------
    def init_weights_and_state(self, input_signature, rng):
        """Returns `(weights, state)` for inputs of `input_signature`. Default: none."""
        del input_signature, rng
        return EMPTY, EMPTY

    def apply(self, x, weights, state, rng):
        """Returns `(y, new_state)`: the pure forward pass."""
        raise TypeError(f"{self._name}: a Layer subclass must override apply")

    def apply_and_save(self, x, weights, state, rng):
        """`apply`, and what a recomputation of this very call may reuse: `(y, new_state,
        saved)`.

        `saved` is a pytree of integer arrays (no gradient flows through it), a function of
        the call's inputs, weights, state and rng, that `apply_with_saved` takes instead of
        computing it again: the reversible backward pass recomputes each layer's forward
        from rebuilt inputs and hands it what the forward pass saved (LSH attention keeps its
        sort order, so that the recomputation neither hashes nor sorts). The default saves
        nothing, `()`.
        """
        y, new_state = self.apply(x, weights, state, rng)
        return y, new_state, ()

    def apply_with_saved(self, x, weights, state, rng, saved):
        """`apply(x, weights, state, rng)`, reusing `saved` from `apply_and_save` on the same
        call; `()` (nothing saved) is always accepted."""
        del saved
        return self.apply(x, weights, state, rng)

    def pack_for_decoding(self, weights, dtype: str):
        """`weights` stored for decoding: a pytree that this layer's predict-mode `apply`
        takes in place of `weights`, computing the same outputs.

        `dtype` ('float32', 'bf16' or 'int8', see `core.DECODE_DTYPES`) is how the kernels a
        layer multiplies by are stored. A layer that packs overrides this. The default keeps a
        layer without sublayers' weights as they are, and packs a layer with sublayers
        entry by entry, `weights` being a tuple with one entry per sublayer (the layout
        `sublayers` documents); a layer whose weights are laid out otherwise (one sublayer's
        weights, stacked weights) overrides this too.
        """
        subs = self._sublayers
        if not subs:
            return weights
        if not isinstance(weights, (tuple, list)) or len(weights) != len(subs):
            got = (f"{len(weights)} entries" if isinstance(weights, (tuple, list))
                   else type(weights).__name__)
            raise TypeError(
                f"{self._name}.pack_for_decoding: expected weights as a tuple of "
                f"{len(subs)} entries, one per sublayer, got {got}; a layer with another "
                "weight layout overrides pack_for_decoding")
        return tuple(sub.pack_for_decoding(w, dtype) for sub, w in zip(subs, weights))

    def predict_context(self) -> int | None:
        """The most positions (the newest included) whose keys a predict-mode layer holds in
        its caches, or None when its outputs do not depend on a bounded cache.

        Fed more positions than this, attention sees at most the last ones (a sliding
        window), not the whole past; `decoding.Decoder` warns. The default is the least over
        the sublayers; a layer with a cache of its own overrides this.
        """
        limits = [c for c in (sub.predict_context() for sub in self._sublayers) if c is not None]
        return min(limits) if limits else None

    def prefill_in_one_call(self) -> bool:
        """Whether a predict-mode model reads a prompt on empty caches best in one call rather
        than in pieces (`decoding.Decoder` then feeds it whole): True when a layer's one-call
        prefill is cheaper than pieces that each read the whole cache, as LSH attention's eval
        forward pass is. The default is any sublayer's; such a layer overrides this.
        """
        return any(sub.prefill_in_one_call() for sub in self._sublayers)

    def init(self, input_signature, rng=None):
        """Infers weight shapes from `input_signature`; returns `(weights, state)`.

        Also keeps them on the layer for the convenience `layer(x)`.
        """
        sig = shapes.signature(input_signature)
        n_items = len(sig) if isinstance(sig, tuple) else 1
        if n_items != self.n_in and not (self.n_in == 1 and isinstance(sig, tuple)):
            raise ValueError(
                f"{self._name}.init: takes {self.n_in} inputs, the signature has {n_items}"
            )
        if rng is None:
            rng = jax.random.PRNGKey(0)
        weights, state = self.init_weights_and_state(sig, rng)
        self._weights, self._state = weights, state
        return weights, state

    def output_signature(self, input_signature, weights, state):
        """The signature of `apply`'s output, computed abstractly with `jax.eval_shape`."""
        out, _ = jax.eval_shape(
            lambda x, w, s: self.apply(x, w, s, jax.random.PRNGKey(0)),
            shapes.as_structs(shapes.signature(input_signature)),
            weights,
            state,
        )
        return shapes.from_structs(out)

    def init_with_output(self, input_signature, rng):
        """`(weights, state, output_signature)` without storing anything on the layer."""
        weights, state = self.init_weights_and_state(input_signature, rng)
        return weights, state, self.output_signature(input_signature, weights, state)

    # -- the Trax-like convenience ------------------------------------------------------------
    @property
    def weights(self):
        return self._weights

    @weights.setter
    def weights(self, value):
        self._weights = value

    @property
    def state(self):
        return self._state

    @state.setter
    def state(self, value):
        self._state = value

    def __call__(self, x, rng=None):
        """Runs `apply` with the weights and state kept by `init`; keeps the new state."""
        if self._weights is None:
            raise ValueError(f"{self._name}: call init(input_signature) before calling the layer")
        y, self._state = self.apply(x, self._weights, self._state, rng)
        return y


class PureLayer(Layer):
    """A layer without weights or state, given by a function of its stack items."""

    def __init__(self, fn, n_in: int = 1, n_out: int = 1, name: str | None = None):
        super().__init__(n_in=n_in, n_out=n_out, name=name)
        self._fn = fn

    def apply(self, x, weights, state, rng):
        del weights, rng
        return self._fn(*as_items(x, self.n_in, self.name)), state
