"""The memory-efficient training step: host-resident reversible stack, per-block updates.

The plain step (`training.step`) differentiates the whole model at once: every layer's weights,
optimizer slots and gradients are in device memory together, and the output layer's
[length, vocab] logits exist whole. For a model built as (ReformerLM, TerraformerLM)::

    Serial(<pre: ShiftRight, Embedding, Dropout, positions, Dup>,
           <stack: ReversibleRepeat(block, n) or ReversibleSerial(block_1, ..., block_n)>,
           <post: merge, LayerNorm, Dense(vocab), LogSoftmax>)

`MemoryEfficientTrainer` runs a step as small compiled pieces, so that only one block's
weights, slots and gradient are on the device at a time:

1. the pre layers forward -> the two reversible streams (x1, x2);
2. each block forward in turn, its weights brought in from host memory, keeping only the
   current streams (a reversible block's input can be rebuilt from its output);
3. the head: post layers and a chunked cross-entropy (no [length, vocab] logits),
   differentiated at once -> loss, head gradients, d(x1, x2);
4. the blocks backwards, last to first: rebuild the block's input
   (`ReversibleLayer.reverse_and_grad`), take its weight gradient and apply that block's
   optimizer update there, writing weights and slots back to host memory;
5. the pre layers' gradient (recomputing their cheap forward) and one update of every weight
   outside the stack.

Why it gives the plain step's updates: the gradients are the same (up to float round-off) and
an optimizer that acts on each weight alone (Adam, SGD, Momentum, Adafactor of
`training.optimizers`) may update block by block. A global-norm clip may not (it needs every
gradient first): the trainer refuses such an optimizer and offers `clip_grad_norm=`, a first
backward walk for the norm and a second for the clipped updates.

Why the head saves nothing of size [length, d]: when the layers between the stack and the
output Dense act on each position alone (merge, LayerNorm), they run inside the chunked loss's
chunks and are recomputed in its backward pass; otherwise the output layer's input
(`HEAD_HIDDEN`) is the one saved activation, offloaded to host memory between the passes.

On CPU, host and device memory are one RAM: the arrays do live in the `pinned_host` space
between steps, but XLA:CPU compiles the transfers to nothing, so the peak falls because of
the per-block pieces and the chunked loss, not the offload. The GPU runs the same program,
and there the offload is what keeps the stack off the device: it holds one block's weights,
slots and gradient at a time (16 bytes a parameter of that block with Adam, in float32)
instead of every block's. For the D-shaped models (12 blocks of about 12.6M parameters:
d_model 1,024, d_ff 4,096) that is about 0.2 GB on the device instead of 2.4 GB; for the T
workload's 2 blocks of 0.46M parameters, 7 MB instead of 15 MB, next to activations of about
7 KB a token (the four reversible streams and one head's arrays, `layers.lean_reverse`).

    step = make_train_step(model, Adam(), memory_efficient=True)   # training.step
    opt_state = step.init_opt_state(weights)
    weights, state, opt_state, metrics = step(weights, state, opt_state, batch, rng)

(gin: ``train.memory_efficient = True``.)
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from terraformer.checks import check_number
from terraformer.layers.base import Layer, as_items, from_items, split_rng
from terraformer.layers.chunked_loss import DEFAULT_CHUNK_LEN, chunked_cross_entropy
from terraformer.layers.combinators import Select, Serial
from terraformer.layers.core import Dense, LayerNorm
from terraformer.layers.losses import accuracy, cross_entropy
from terraformer.layers.reversible import ReversibleRepeat, ReversibleSerial
from terraformer.memory.placement import (
    device_memory_kind,
    host_memory_kind,
    offload_reason,
    on_memory_kind,
    to_device,
    to_host,
)
from terraformer.parallel.distributed import put
from terraformer.parallel.sharding import batch_sharding, replicated, tree_shardings
from terraformer.training.batches import model_input
from terraformer.training.optimizers import reported_learning_rate

__all__ = [
    "HEAD_HIDDEN",
    "LayerRange",
    "MemoryEfficientOptState",
    "MemoryEfficientTrainer",
    "check_separable",
    "is_positionwise",
]

HEAD_HIDDEN = "head_hidden"
# Layers (by name) that act on each position alone: the head runs them inside the loss's chunks.
_POSITIONWISE = ("Concatenate", "XYAvg")


def is_positionwise(layer) -> bool:
    """Whether `layer` acts on each position alone (LayerNorm, the merge of the two streams),
    so that it may run inside the chunks of a chunked loss."""
    return isinstance(layer, LayerNorm) or layer.name in _POSITIONWISE


# ---------------------------------------------------------------------------------------------
# Optimizer checks.


class MemoryEfficientOptState(NamedTuple):
    """Optimizer state of the memory-efficient step.

    Attributes:
      stack: the reversible stack's slots: for `ReversibleRepeat`, `vmap(optimizer.init)` of
        the stacked block weights (every leaf has a leading block axis); for
        `ReversibleSerial`, a tuple with `optimizer.init(block_weights)` per block. In host
        memory where there is one.
      outer: `optimizer.init` of every weight outside the stack (the model's weights with
        the stack's entry replaced by `()`). Last, so `current_learning_rate` reads it.
    """

    stack: Any
    outer: Any


def _updates_of(optimizer, grads_seq, params):
    state = optimizer.init(params)
    out = []
    for grads in grads_seq:
        updates, state = optimizer.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        out.append(updates)
    return out


def check_separable(optimizer, who: str = "MemoryEfficientTrainer") -> None:
    """Raises ValueError unless `optimizer` updates each weight from its own gradient only.

    Probes it on a tiny tree: two steps on the whole tree must equal two steps on each half
    with its own state. A global-norm clip (e.g. `Adam(clip_grad_norm=1.0)`) fails this.
    """
    rng = np.random.default_rng(0)
    params = {"a": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
              "b": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}
    grads = [jax.tree.map(lambda p, s=s: jnp.asarray(
        rng.normal(size=p.shape) * s, jnp.float32), params) for s in (30.0, 3.0)]
    joint = _updates_of(optimizer, grads, params)
    for key in params:
        alone = _updates_of(optimizer, [{key: g[key]} for g in grads], {key: params[key]})
        for j, a in zip(joint, alone, strict=True):
            if not np.allclose(np.asarray(j[key]), np.asarray(a[key]), rtol=1e-5, atol=1e-7):
                raise ValueError(
                    f"{who}: the optimizer does not update each weight from its own gradient "
                    "alone (it has a global-norm clip or another cross-weight statistic), so "
                    "per-block fused updates would differ from the plain step. Build it without "
                    "clipping (gin: Adam.clip_grad_norm = None) and clip with "
                    "MemoryEfficientTrainer(clip_grad_norm=...) instead"
                )


# ---------------------------------------------------------------------------------------------
# Running some of a Serial's layers on the stack.

# A layer that takes and gives nothing: it stands in for the layers outside a `LayerRange`.
_NOTHING = Select([], n_in=0, name="Nothing")


class LayerRange:
    """Layers [start, stop) of a `Serial` model, run by `Serial.apply` itself.

    The other layers are replaced by a layer that does nothing, so the Serial still has one
    layer per model layer: it splits the rng as `model.apply` does, and each layer gets the
    key (and so the dropout mask) it gets in the plain forward pass.
    """

    def __init__(self, model: Serial, start: int, stop: int):
        layers = model.sublayers
        self.start, self.stop, self.n = start, stop, len(layers)
        self.serial = Serial(*[layer if start <= i < stop else _NOTHING
                               for i, layer in enumerate(layers)])

    def _pad(self, trees) -> tuple:
        return ((),) * self.start + tuple(trees) + ((),) * (self.n - self.stop)

    def apply(self, items: tuple, weights, states, rng):
        """Runs the layers on the stack `items` with the model's `rng`; returns (items,
        new_states) with the states of these layers only. Items below what the layers read
        stay on the stack."""
        n = self.serial.n_in
        y, new_states = self.serial.apply(from_items(tuple(items[:n]), n), self._pad(weights),
                                          self._pad(states), rng)
        out = as_items(y, self.serial.n_out, self.serial.name) + tuple(items[n:])
        return out, tuple(new_states[self.start:self.stop])


def _sq_norm(tree):
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return sum((jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves), jnp.float32(0))


def _clip_scale(sq_norm, clip_grad_norm):
    """optax.clip_by_global_norm's factor: 1 below the threshold, else threshold / norm."""
    norm = jnp.sqrt(sq_norm)
    return jnp.where(norm < clip_grad_norm, 1.0, clip_grad_norm / norm).astype(jnp.float32)


def _slice(tree, i):
    return jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, i, keepdims=False), tree)


def _unslice(tree, i, part):
    return jax.tree.map(
        lambda a, p: lax.dynamic_update_index_in_dim(a, p.astype(a.dtype), i, 0), tree, part)


# ---------------------------------------------------------------------------------------------
# The two kinds of reversible stack.


class _Blocks:
    """How one kind of reversible stack hands out its blocks (weights, state, rng)."""

    def __init__(self, stack, optimizer, offload: bool):
        self.stack = stack
        self.optimizer = optimizer
        self.offload = offload
        self.k = stack.n_in

    # to and from host memory inside a compiled block step
    def _in(self, tree):
        return to_device(tree) if self.offload else tree

    def _out(self, tree):
        return to_host(tree) if self.offload else tree

    def _block_update(self, layer, w, o, s, r, ys, gys, scale, update: bool):
        """reverse_and_grad of one block, then (when `update`) its optimizer update."""
        k = self.k
        x, (gx, gw) = layer.reverse_and_grad(from_items(ys, k), from_items(gys, k), w, s, r)
        sq = _sq_norm(gw)
        if update:
            gw = jax.tree.map(lambda g: (g * scale).astype(g.dtype), gw)
            upd, o = self.optimizer.update(gw, o, w)
            w = optax.apply_updates(w, upd)
        return as_items(x, k, layer.name), as_items(gx, k, layer.name), w, o, sq


class _RepeatBlocks(_Blocks):
    """`ReversibleRepeat`: stacked weights [n, ...]; one compiled body for every block."""

    def __init__(self, stack: ReversibleRepeat, optimizer, offload: bool):
        super().__init__(stack, optimizer, offload)
        self.n = stack.n_layers
        self.block = stack.sublayers[0]
        self._fwd = jax.jit(self._forward, donate_argnums=(2,))
        self._bwd = jax.jit(self._backward, static_argnames=("update",),
                            donate_argnums=(0, 1, 3, 4))

    def rngs(self, rng):
        return [None] * self.n if rng is None else list(jax.random.split(rng, self.n))

    def init_opt(self, weights):
        return jax.vmap(self.optimizer.init)(weights)

    def _forward(self, weights, state, items, i, r):
        w = self._in(_slice(weights, i))
        y, s = self.block.apply(from_items(items, self.k), w, _slice(state, i), r)
        return as_items(y, self.k, self.block.name), s

    def forward(self, i, weights, state, items, r):
        return self._fwd(weights, state, items, np.int32(i), r)

    def stack_states(self, states):
        return jax.tree.map(lambda *a: jnp.stack(a), *states)

    def _backward(self, weights, opt, state, ys, gys, i, r, scale, update):
        w = self._in(_slice(weights, i))
        o = self._in(_slice(opt, i)) if update else None
        xs, gxs, w, o, sq = self._block_update(self.block, w, o, _slice(state, i), r, ys, gys,
                                               scale, update)
        if update:
            weights = _unslice(weights, i, self._out(w))
            opt = _unslice(opt, i, self._out(o))
        return weights, opt, xs, gxs, sq

    def backward(self, i, weights, opt, state, ys, gys, r, scale, update):
        return self._bwd(weights, opt, state, ys, gys, np.int32(i), r, scale, update=update)


class _SerialBlocks(_Blocks):
    """`ReversibleSerial`: a tuple of per-block weights; one compiled step per block."""

    def __init__(self, stack: ReversibleSerial, optimizer, offload: bool):
        super().__init__(stack, optimizer, offload)
        self.layers = stack.sublayers
        self.n = len(self.layers)
        for i, layer in enumerate(self.layers):
            if layer.n_in != self.k:
                raise ValueError(
                    f"MemoryEfficientTrainer: block {i} ({layer.name}) of the ReversibleSerial "
                    f"takes {layer.n_in} of the stack's {self.k} items; every block must take "
                    "all of them (group smaller layers into blocks with ReversibleSerial)"
                )
        self._fwd = [jax.jit(functools.partial(self._forward, layer), donate_argnums=(2,))
                     for layer in self.layers]
        self._bwd = [jax.jit(functools.partial(self._backward, layer),
                             static_argnames=("update",), donate_argnums=(0, 1, 3, 4))
                     for layer in self.layers]

    def rngs(self, rng):
        return split_rng(rng, self.n)

    def init_opt(self, weights):
        return tuple(self.optimizer.init(w) for w in weights)

    def _forward(self, layer, w, s, items, r):
        y, s = layer.apply(from_items(items, self.k), self._in(w), s, r)
        return as_items(y, self.k, layer.name), s

    def forward(self, i, weights, state, items, r):
        return self._fwd[i](weights[i], state[i], items, r)

    def stack_states(self, states):
        return tuple(states)

    def _backward(self, layer, w, o, s, ys, gys, r, scale, update):
        w_dev = self._in(w)
        o_dev = self._in(o) if update else None
        xs, gxs, w_new, o_new, sq = self._block_update(layer, w_dev, o_dev, s, r, ys, gys,
                                                       scale, update)
        if update:
            return self._out(w_new), self._out(o_new), xs, gxs, sq
        return w, o, xs, gxs, sq

    def backward(self, i, weights, opt, state, ys, gys, r, scale, update):
        w_i, o_i, xs, gxs, sq = self._bwd[i](weights[i], opt[i], state[i], ys, gys, r, scale,
                                             update=update)
        # (without `update` these are the donated inputs passed through: the same data)
        weights = weights[:i] + (w_i,) + weights[i + 1:]
        opt = opt[:i] + (o_i,) + opt[i + 1:]
        return weights, opt, xs, gxs, sq


# ---------------------------------------------------------------------------------------------
# The trainer.


def _find_stack(model) -> int:
    if not isinstance(model, Serial):
        raise TypeError(
            "MemoryEfficientTrainer: model must be a Serial with one reversible stack "
            f"(ReformerLM, TerraformerLM), got {type(model).__name__} {model.name}"
        )
    found = [i for i, layer in enumerate(model.sublayers)
             if isinstance(layer, (ReversibleRepeat, ReversibleSerial))]
    if len(found) != 1:
        names = [layer.name for layer in model.sublayers]
        raise ValueError(
            "MemoryEfficientTrainer: model must hold exactly one ReversibleRepeat or "
            f"ReversibleSerial among its top-level layers, found {len(found)} in {names}"
        )
    return found[0]


class MemoryEfficientTrainer:
    """Training steps for a model with one reversible stack, weights of the stack in host
    memory, per-block fused optimizer updates and a chunked loss (see the module docstring).

    Args:
      model: a train-mode `Serial` with exactly one top-level `ReversibleRepeat` or
        `ReversibleSerial` (ReformerLM, TerraformerLM); taking tokens (n_in 1) or
        (inputs, targets) (n_in 2); its first output taken as log-probabilities.
      optimizer: an optax transformation acting on each weight alone (checked; see
        `check_separable`), e.g. `training.optimizers.Adam()` without `clip_grad_norm`.
      clip_grad_norm: clip the global gradient norm to this (as optax.clip_by_global_norm),
        computed by an extra backward walk; None: no clipping.
      offload: keep the stack's weights and slots in pinned_host memory (when the device
        has it) and offload the head's saved hidden states there.
      chunk_head: when the layers after the stack are position-wise (merge, LayerNorm), run
        them inside the loss's chunks (nothing of [length, d] saved); else (or False) they
        run whole and their output is offloaded to host memory between the head's passes.
      loss_chunk_len: positions per chunk of the chunked cross-entropy (when the model ends
        in Dense + LogSoftmax; other heads are scored whole).
      mesh: a `jax.sharding.Mesh` to run on (None or one device: the first device). Weights
        and slots are laid out by `parallel.sharding.WEIGHT_RULES` (the stack's in each
        device's host memory, shard by shard), batch rows over ``data`` and ``fsdp``; every
        piece is the same program, partitioned by the compiler from those layouts.
    """

    def __init__(self, model: Layer, optimizer, clip_grad_norm: float | None = None,
                 offload: bool = True, loss_chunk_len: int = DEFAULT_CHUNK_LEN,
                 chunk_head: bool = True, mesh=None):
        self.model = model
        self.optimizer = optimizer
        self.mesh = mesh if mesh is not None and mesh.size > 1 else None
        self._mesh_layout = None  # (weights, opt_state) shardings, found from the first trees
        self.k = _find_stack(model)
        layers = model.sublayers
        self.pre, self.stack, self.post = layers[: self.k], layers[self.k], layers[self.k + 1:]
        n = len(layers)
        self._pre_layers = LayerRange(model, 0, self.k)
        self._post_layers = LayerRange(model, self.k + 1, n)
        self._body_layers = LayerRange(model, self.k + 1, n - 2)  # post, less Dense + LogSoftmax
        if model.n_in not in (1, 2):
            raise ValueError(
                "MemoryEfficientTrainer: the model must take 1 input (tokens) or 2 (inputs, "
                f"targets), takes {model.n_in}"
            )
        if clip_grad_norm is not None:
            check_number("clip_grad_norm", clip_grad_norm, "MemoryEfficientTrainer",
                         minimum=0.0, allow_minimum=False)
        check_separable(optimizer)
        self.clip_grad_norm = clip_grad_norm
        self.offload = bool(offload) and host_memory_kind() is not None
        self.offload_reason = offload_reason() if offload else "offload=False"
        self.loss_chunk_len = loss_chunk_len
        self.chunk_head = bool(chunk_head)
        self.chunked_head = (
            len(self.post) >= 2 and isinstance(self.post[-2], Dense)
            and self.post[-1].name == "LogSoftmax"
        )
        kind = _RepeatBlocks if isinstance(self.stack, ReversibleRepeat) else _SerialBlocks
        self.blocks = kind(self.stack, optimizer, self.offload)
        self._pre_fwd = jax.jit(self._pre_forward)
        self._head_grad = jax.jit(self._head)
        self._outer = jax.jit(self._outer_step, static_argnames=("update",))

    # -- placement ---------------------------------------------------------------------------
    def _split_weights(self, weights):
        weights = tuple(weights)
        outer = weights[: self.k] + ((),) + weights[self.k + 1:]
        return outer, weights[self.k]

    def _join(self, outer, stack_part):
        return tuple(outer[: self.k]) + (stack_part,) + tuple(outer[self.k + 1:])

    def init_opt_state(self, weights) -> MemoryEfficientOptState:
        """The optimizer state for `weights` (the model's weight pytree), stack part on host
        (on a mesh: each slot laid out as its weight)."""
        if self.mesh is not None:
            def init(w):
                outer, stack_w = self._split_weights(w)
                return MemoryEfficientOptState(self.blocks.init_opt(stack_w),
                                               self.optimizer.init(outer))

            w_sh, o_sh = self._layout(weights, jax.eval_shape(init, weights), host=False)
            return self.place(weights, jax.jit(init, out_shardings=o_sh)(put(weights, w_sh)))[1]
        outer, stack_w = self._split_weights(weights)
        stack_opt = self.blocks.init_opt(stack_w)
        return MemoryEfficientOptState(self._host(stack_opt), jax.jit(self.optimizer.init)(outer))

    def _host(self, tree):
        if not self.offload:
            return tree
        leaves = jax.tree.leaves(tree)
        if leaves and on_memory_kind(tree, host_memory_kind()):
            return tree
        return to_host(tree)

    def _layout(self, weights, opt_state, host: bool = True):
        """On the mesh: the shardings of (weights, opt_state) by `WEIGHT_RULES`, the stack's
        part in host memory when ``host`` and offloading."""
        if self._mesh_layout is None:
            w = tree_shardings(tuple(weights), self.mesh)
            self._mesh_layout = (w, tree_shardings(opt_state, self.mesh))
        w, o = self._mesh_layout
        if host and self.offload:
            kind = host_memory_kind()
            on_host = functools.partial(jax.tree.map, lambda s: s.with_memory_kind(kind))
            w = self._join(self._split_weights(w)[0], on_host(w[self.k]))
            o = MemoryEfficientOptState(on_host(o.stack), o.outer)
        return w, o

    def place(self, weights, opt_state):
        """(weights, opt_state) with the stack's weights and slots in host memory (on a mesh,
        every array in its layout, see `_layout`).

        A no-op for arrays already there; `step` calls it first, so weights restored from a
        checkpoint (in device memory) are moved back.
        """
        if not isinstance(opt_state, MemoryEfficientOptState):
            raise TypeError(
                "MemoryEfficientTrainer: opt_state must come from init_opt_state, got "
                f"{type(opt_state).__name__}"
            )
        if self.mesh is not None:
            w, o = self._layout(weights, opt_state)
            return put(tuple(weights), w), put(opt_state, o)
        outer, stack_w = self._split_weights(weights)
        weights = self._join(outer, self._host(stack_w))
        return weights, MemoryEfficientOptState(self._host(opt_state.stack), opt_state.outer)

    # -- the compiled pieces -------------------------------------------------------------------
    def _model_items(self, batch):
        return as_items(model_input(self.model, batch), self.model.n_in, self.model.name)

    def _pre_forward(self, pre_w, pre_s, batch, rng):
        return self._pre_layers.apply(self._model_items(batch), pre_w, pre_s, rng)

    def _positionwise_body(self, items, post_w, post_s) -> bool:
        """Whether the layers between the stack and the output Dense act on each position
        alone (merge, LayerNorm) and leave one [batch, length, d] item: then they run inside
        the loss's chunks."""
        if not (self.chunk_head and self.chunked_head):
            return False
        body = self.post[:-2]
        if not all(is_positionwise(layer) for layer in body):
            return False
        out = jax.eval_shape(
            lambda xs, w, s: self._body_layers.apply(xs, w, s, None)[0],
            tuple(items), post_w[:-2], post_s[:-2])
        return len(out) == 1 and out[0].shape[:2] == items[0].shape[:2]

    def _head_loss(self, post_w, items, post_s, rng, targets, mask):
        if not self.chunked_head:
            out, new_s = self._post_layers.apply(items, post_w, post_s, rng)
            log_probs = out[0]
            return cross_entropy(log_probs, targets, mask), (
                accuracy(log_probs, targets, mask), new_s)
        dense = post_w[-2]
        if self._positionwise_body(items, post_w, post_s):
            # merge + LayerNorm + Dense + loss per chunk of positions: O(chunk) memory
            def hidden_fn(*chunk_items):
                return self._body_layers.apply(chunk_items, post_w[:-2], post_s[:-2], rng)[0][0]

            loss, acc = chunked_cross_entropy(tuple(items), dense["w"], dense.get("b"), targets,
                                              mask, self.loss_chunk_len, hidden_fn=hidden_fn)
            return loss, (acc, tuple(post_s))
        out, new_s = self._body_layers.apply(items, post_w[:-2], post_s[:-2], rng)
        hidden = checkpoint_name(out[0], HEAD_HIDDEN)
        loss, acc = chunked_cross_entropy(hidden, dense["w"], dense.get("b"), targets, mask,
                                          self.loss_chunk_len)
        return loss, (acc, new_s + tuple(post_s[-2:]))

    def _head(self, post_w, items, post_s, rng, targets, mask):
        fn = self._head_loss
        if self.offload:
            policy = jax.checkpoint_policies.save_and_offload_only_these_names(
                names_which_can_be_saved=[], names_which_can_be_offloaded=[HEAD_HIDDEN],
                offload_src=device_memory_kind(), offload_dst=host_memory_kind())
        else:
            policy = jax.checkpoint_policies.save_only_these_names(HEAD_HIDDEN)
        fn = jax.checkpoint(fn, policy=policy)
        (loss, (acc, new_s)), (g_post, g_items) = jax.value_and_grad(
            fn, argnums=(0, 1), has_aux=True)(post_w, items, post_s, rng, targets, mask)
        return loss, acc, new_s, g_post, g_items, _sq_norm(g_post)

    def _outer_step(self, outer_w, outer_opt, g_post, pre_s, batch, rng, g_items, sq_blocks,
                    scale, update):
        pre_w = outer_w[: self.k]
        _, vjp = jax.vjp(lambda w: self._pre_forward(w, pre_s, batch, rng)[0], pre_w)
        (g_pre,) = vjp(tuple(g_items))
        grads = tuple(g_pre) + ((),) + tuple(g_post)
        sq = sq_blocks + _sq_norm(g_pre) + _sq_norm(g_post)
        if not update:
            return outer_w, outer_opt, sq
        grads = jax.tree.map(lambda g: (g * scale).astype(g.dtype), grads)
        updates, outer_opt = self.optimizer.update(grads, outer_opt, outer_w)
        return optax.apply_updates(outer_w, updates), outer_opt, sq

    # -- one step ----------------------------------------------------------------------------
    def step(self, weights, state, opt_state, batch, rng):
        """One training step: `(weights, state, opt_state, batch, rng) -> (weights, state,
        opt_state, metrics)`, metrics `loss`, `accuracy`, `grad_norm`, `lr` (scalars).

        `weights` and `state` are the model's pytrees (as `model.init` gives them);
        `opt_state` comes from `init_opt_state`. `batch` is `(inputs, targets, weights)`.
        The stack's host-resident arrays passed in are donated (updated in place).
        """
        # Everything committed to its memory once, so every piece compiles once.
        if self.mesh is not None:  # batch rows over data and fsdp, the rest replicated
            batch = put(tuple(batch), tuple(batch_sharding(self.mesh, np.shape(a), "batch")
                                            for a in batch))
            state, rng = put((tuple(state), rng),
                             jax.tree.map(lambda _: replicated(self.mesh), (tuple(state), rng)))
        batch, state, rng = to_device((tuple(jnp.asarray(a) for a in batch), tuple(state), rng))
        weights, opt_state = self.place(weights, opt_state)
        outer_w, stack_w = self._split_weights(weights)
        outer_w = to_device(outer_w)
        opt_state = MemoryEfficientOptState(opt_state.stack, to_device(opt_state.outer))
        pre_s, stack_s, post_s = state[: self.k], state[self.k], state[self.k + 1:]
        # The layer ranges split `rng` as model.apply does; the stack's key is that split's.
        block_rngs = self.blocks.rngs(split_rng(rng, len(self.model.sublayers))[self.k])
        n_stack = self.stack.n_in

        # forward: pre, then each block, keeping only the current streams
        items, new_pre_s = self._pre_fwd(outer_w[: self.k], pre_s, batch, rng)
        ys, rest = tuple(items[:n_stack]), tuple(items[n_stack:])
        new_block_s = []
        for i in range(self.blocks.n):
            ys, s_i = self.blocks.forward(i, stack_w, stack_s, ys, block_rngs[i])
            new_block_s.append(s_i)
        new_stack_s = self.blocks.stack_states(new_block_s)

        # head: loss and the gradients of the output layers and of the streams
        loss, acc, new_post_s, g_post, g_items, _ = self._head_grad(
            outer_w[self.k + 1:], ys + rest, post_s, rng, batch[1], batch[2])
        g_ys, g_rest = tuple(g_items[:n_stack]), tuple(g_items[n_stack:])

        stack_opt = opt_state.stack
        outer_opt = opt_state.outer
        scale = jnp.float32(1.0)
        if self.clip_grad_norm is not None:
            # A first walk for the global norm only (no update; the streams are copied, as
            # the walk consumes them), then the clipped updates.
            stack_w, stack_opt, g_xs, sq_blocks = self._walk(
                stack_w, stack_opt, stack_s, tuple(jnp.copy(a) for a in ys),
                tuple(jnp.copy(a) for a in g_ys), block_rngs, scale, update=False)
            _, _, sq = self._outer(outer_w, outer_opt, g_post, pre_s, batch, rng,
                                   g_xs + g_rest, sq_blocks, scale, update=False)
            scale = _clip_scale(sq, self.clip_grad_norm)
        stack_w, stack_opt, g_xs, sq_blocks = self._walk(
            stack_w, stack_opt, stack_s, ys, g_ys, block_rngs, scale, update=True)
        outer_w, outer_opt, sq = self._outer(outer_w, outer_opt, g_post, pre_s, batch, rng,
                                             g_xs + g_rest, sq_blocks, scale, update=True)

        weights = self._join(outer_w, stack_w)
        new_state = tuple(new_pre_s) + (new_stack_s,) + tuple(new_post_s)
        opt_state = MemoryEfficientOptState(stack_opt, outer_opt)
        metrics = {"loss": loss, "accuracy": acc, "grad_norm": jnp.sqrt(sq),
                   "lr": reported_learning_rate(opt_state)}
        return weights, new_state, opt_state, metrics

    def _walk(self, stack_w, stack_opt, stack_s, ys, g_ys, block_rngs, scale, update):
        """The blocks backwards from the stack's output `ys` with gradient `g_ys` (both
        consumed): returns (stack weights, stack slots, gradient of the stack's input, sum
        of squared block gradients). Blocks are updated on the way when `update`."""
        sq_total = jnp.float32(0)
        for i in reversed(range(self.blocks.n)):
            stack_w, stack_opt, ys, g_ys, sq = self.blocks.backward(
                i, stack_w, stack_opt, stack_s, ys, g_ys, block_rngs[i], scale, update)
            sq_total = sq_total + sq
        return stack_w, stack_opt, tuple(g_ys), sq_total

    __call__ = step

