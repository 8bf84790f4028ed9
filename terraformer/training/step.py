"""The training and evaluation steps: one builder for every trainer.

`make_train_step(model, optimizer)` gives the step that `train`, `terraformer bench train` and
`dry_run` run::

    step = make_train_step(model, optimizer)                  # or memory_efficient=True
    opt_state = step.init_opt_state(weights)
    weights, state, opt_state, metrics = step(weights, state, opt_state, batch, rng)

``batch`` is ``(inputs, targets, weights)`` with arrays ``[batch, length]`` (a classifier's
targets and weights: ``[batch]``, one label per sequence); ``metrics`` holds
the scalars ``loss`` (mean cross-entropy in nats per weighted token), ``accuracy``,
``grad_norm`` and ``lr``. The plain step differentiates the whole model in one compiled
function; ``memory_efficient=True`` runs the same update as `MemoryEfficientTrainer`'s
per-block pieces (a model with one reversible stack; see `training.memory_efficient`).

``offload=True`` (the plain step on one device) keeps the weights and the optimizer slots in
host memory (the ``pinned_host`` memory kind) between steps: the step brings the weights in
at its start and the slots only for the update at its end, and writes both back to host
memory. On a GPU this frees the device of them between steps (3 x 4 bytes a parameter in
float32 with Adam's two slots: 2.6 GB for the 220M-parameter D models, 14 MB for the T
workload's 1.15M) and of the slots (8 bytes a parameter) during the forward and backward
passes, at the cost of moving them over the host link once a step (each way). On CPU, host
and device memory are one RAM: the arrays do carry the ``pinned_host`` kind, XLA compiles the
transfers to nothing and the step computes the same numbers.

On a mesh of several devices (``make_train_step(..., mesh=make_mesh(data=2, model=2))``) the
plain step is one `jax.jit` with in and out shardings from `parallel.sharding` (weights and
slots by their paths, batch rows over ``data`` and ``fsdp``, its length over ``sequence``):
`TrainStep.place` lays the weights and slots out, and the batch (host arrays) is laid out on
each call. The memory-efficient step runs on a mesh too (its pieces partitioned from the same
layouts, the stack's shards in each device's host memory). Steps trace and run with the mesh
in effect (``jax.set_mesh``), which `SelfAttention` reads (sequence-parallel attention).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from terraformer.layers.losses import accuracy, cross_entropy, sequence_accuracy
from terraformer.memory.placement import host_memory_kind, on_memory_kind, to_device, to_host
from terraformer.parallel.distributed import global_batch, put
from terraformer.parallel.mesh import mesh_context
from terraformer.parallel.sharding import replicated, train_shardings
from terraformer.training.batches import as_batch, log_probs_of, model_input, open_stream
from terraformer.training.chunked_head import chunked_loss, head_split
from terraformer.training.memory_efficient import MemoryEfficientTrainer
from terraformer.training.optimizers import reported_learning_rate

__all__ = ["LN2", "TrainStep", "evaluate", "make_eval_step", "make_train_step"]

LN2 = math.log(2.0)


def _loss_and_metrics(model, weights, state, batch, rng):
    # A language model's merge, LayerNorm, output layer and loss run by chunks of positions
    # (training.chunked_head): no [length, vocab] log-probabilities, nor their gradient.
    split = head_split(model)
    if split is not None:
        chunked = chunked_loss(model, split, weights, state, batch, rng)
        if chunked is not None:
            return chunked
    out, new_state = model.apply(model_input(model, batch), weights, state, rng)
    log_probs = log_probs_of(out)
    _, targets, mask = batch
    loss = cross_entropy(log_probs, targets, mask)
    return loss, (new_state, accuracy(log_probs, targets, mask))


def _plain_step(model, optimizer, donate: bool, shardings=None,
                offload: bool = False) -> Callable:
    def step(weights, state, opt_state, batch, rng):
        if offload:  # (host memory between steps; see the module docstring)
            weights = to_device(weights)
        grad_fn = jax.value_and_grad(
            lambda w: _loss_and_metrics(model, w, state, batch, rng), has_aux=True
        )
        (loss, (new_state, acc)), grads = grad_fn(weights)
        if offload:
            opt_state = to_device(opt_state)
        updates, opt_state = optimizer.update(grads, opt_state, weights)
        weights = optax.apply_updates(weights, updates)
        if offload:
            weights, opt_state = to_host((weights, opt_state))
        metrics = {
            "loss": loss,
            "accuracy": acc,
            "grad_norm": optax.global_norm(grads),
            "lr": reported_learning_rate(opt_state),
        }
        return weights, new_state, opt_state, metrics

    donate_argnums = (0, 1, 2) if donate else ()
    if shardings is None:
        return jax.jit(step, donate_argnums=donate_argnums)
    w, o, b, s, rep = shardings
    return jax.jit(step, donate_argnums=donate_argnums, in_shardings=(w, s, o, b, rep),
                   out_shardings=(w, s, o, rep))


def _mesh_of_many(mesh):
    """``mesh`` when it has several devices; None for no mesh or one device (the plain
    single-device path, unchanged)."""
    return mesh if mesh is not None and mesh.size > 1 else None


class TrainStep:
    """A training step ``(weights, state, opt_state, batch, rng) -> (weights, state,
    opt_state, metrics)``, with the optimizer state it needs (see the module docstring).

    Attributes:
      model, optimizer: what it was built from.
      trainer: the `MemoryEfficientTrainer` running it, or None for the plain step.
      mesh: the mesh it runs on (None: one device).
      offload: whether the plain step keeps its weights and slots in host memory between
        steps (``offload=True`` where the backend has a pinned_host kind).
      shardings: on a mesh, ``(weights, opt_state, batch, state)`` NamedShardings once
        `init_opt_state` or `place` has seen the trees; else None.
    """

    def __init__(self, model, optimizer, memory_efficient: bool = False,
                 donate: bool | None = None, mesh=None, **memory_options):
        self.model = model
        self.optimizer = optimizer
        self.mesh = _mesh_of_many(mesh)
        self.shardings = None
        self.offload = False  # the plain step's weights and slots in host memory
        if memory_efficient:
            self.trainer = MemoryEfficientTrainer(model, optimizer, mesh=self.mesh,
                                                  **memory_options)
            self._step = self.trainer.step
        else:
            offload = bool(memory_options.pop("offload", False))
            if memory_options:
                raise TypeError(
                    f"make_train_step: {sorted(memory_options)} apply only with "
                    "memory_efficient=True")
            if offload and self.mesh is not None:
                raise TypeError("make_train_step: offload=True applies to the plain step on "
                                "one device or to memory_efficient=True, not to the plain "
                                "step on a mesh")
            # where the backend has no pinned_host kind, the arrays stay where they are
            self.offload = offload and host_memory_kind() is not None
            self.trainer = None
            # On CPU the arrays a caller holds (numpy views, restored checkpoints) may share
            # memory with the step's inputs: donate only where device memory is separate.
            if donate is None:
                donate = jax.default_backend() != "cpu"
            self._donate = bool(donate)
            # (on a mesh: built once the shardings are known)
            self._step = (_plain_step(model, optimizer, self._donate, offload=self.offload)
                          if self.mesh is None else None)

    def _shard(self, weights, state, opt_state, batch):
        """Finds the shardings of these trees (arrays or abstract) once, and builds the step
        (the batch's from this batch: `layout` knew only its rank-2 stand-in)."""
        if self.shardings is None:
            self.shardings = train_shardings(self.mesh, weights, opt_state, batch, state)
        else:
            w, o, _, s = self.shardings
            self.shardings = (w, o, train_shardings(self.mesh, (), (), batch)[2], s)
        if self._step is None:
            self._step = _plain_step(self.model, self.optimizer, self._donate,
                                     self.shardings + (replicated(self.mesh),))

    def _batch_like(self):
        """A batch signature for the shardings before a batch is seen: its sharding is fixed
        by the mesh alone, so any row count the mesh divides will do."""
        n = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        return tuple(jax.ShapeDtypeStruct((n, self.mesh.shape["sequence"]), jnp.int32)
                     for _ in range(3))

    def place(self, weights, state, opt_state):
        """``(weights, state, opt_state)`` laid out as the step takes them: on a mesh, as
        global arrays with `shardings` (the memory-efficient trainer's stack in host memory);
        else unchanged (the memory-efficient trainer places its own)."""
        if self.mesh is None:
            if self.trainer is None and self.offload:
                return self._to_host(weights), state, self._to_host(opt_state)
            return weights, state, opt_state
        w, o, _, s = self.layout(weights, state, opt_state)
        if self.trainer is not None:
            weights, opt_state = self.trainer.place(weights, opt_state)
            return weights, put(state, s), opt_state
        return put(weights, w), put(state, s), put(opt_state, o)

    def layout(self, weights, state, opt_state):
        """On a mesh, the `shardings` ``(weights, opt_state, batch, state)`` of these trees
        (arrays or abstract); None without a mesh."""
        if self.mesh is not None and self.shardings is None:
            self.shardings = train_shardings(self.mesh, weights, opt_state,
                                             self._batch_like(), state)
        return self.shardings

    def _to_host(self, tree):
        """`tree` in pinned_host memory (a no-op for arrays already there)."""
        return tree if on_memory_kind(tree, host_memory_kind()) else to_host(tree)

    def __call__(self, weights, state, opt_state, batch, rng):
        if self.trainer is None and self.offload:  # (arrays restored to device memory)
            weights, opt_state = self._to_host(weights), self._to_host(opt_state)
        if self.mesh is not None and self.trainer is None:  # (the trainer lays out its own)
            if self._step is None:
                self._shard(weights, state, opt_state, batch)
            batch = global_batch(batch, train_shardings(self.mesh, (), (), batch)[2])
            rng = put(rng, replicated(self.mesh))
        with mesh_context(self.mesh):  # (for layers that read it: ring attention)
            return self._step(weights, state, opt_state, batch, rng)

    def init_opt_state(self, weights):
        """The optimizer state for ``weights`` (the memory-efficient one keeps the stack's
        slots in host memory; on a mesh, each slot sharded as its weight)."""
        if self.trainer is not None:
            return self.trainer.init_opt_state(weights)
        if self.mesh is None:
            slots = jax.jit(self.optimizer.init)(to_device(weights) if self.offload else weights)
            return self._to_host(slots) if self.offload else slots
        abstract = jax.eval_shape(self.optimizer.init, weights)
        w, o = train_shardings(self.mesh, weights, abstract, ())[:2]
        return jax.jit(self.optimizer.init, in_shardings=(w,), out_shardings=o)(put(weights, w))

    def eval_weights(self, weights):
        """``weights`` as a plain (whole-model) function takes them: all in device memory."""
        return to_device(weights) if self.trainer is not None or self.offload else weights

    def lower(self, weights, state, opt_state, batch, rng):
        """The plain step lowered for these (possibly abstract) arguments, to compile it and
        read its memory analysis."""
        if self.trainer is not None:
            raise TypeError("TrainStep.lower: the memory-efficient step is several compiled "
                            "pieces, not one function")
        if self.mesh is not None and self._step is None:
            self._shard(weights, state, opt_state, batch)
        with mesh_context(self.mesh):
            return self._step.lower(weights, state, opt_state, batch, rng)


def make_train_step(model, optimizer, *, memory_efficient: bool = False,
                    donate: bool | None = None, mesh=None, **memory_options) -> TrainStep:
    """The training step of ``model`` (a train-mode Layer) with ``optimizer`` (optax).

    Args:
      model: the Layer; its first output is taken as log-probabilities.
      optimizer: an optax transformation.
      memory_efficient: run `MemoryEfficientTrainer` (``memory_options`` go to it:
        ``clip_grad_norm``, ``offload``, ``loss_chunk_len``, ``chunk_head``). Without it,
        ``offload=True`` keeps the plain step's weights and slots in host memory between
        steps (see the module docstring); the other options do not apply.
      donate: let the plain step reuse the memory of its weights, state and optimizer
        state (the caller must not use them after the call); None: on accelerators only.
      mesh: a `jax.sharding.Mesh` (`parallel.make_mesh`) to run on, for either step; None
        or one device: the single-device step. Place the weights with `TrainStep.place` (or
        make the slots with `init_opt_state`, which places them).
    """
    return TrainStep(model, optimizer, memory_efficient, donate, mesh, **memory_options)


def make_eval_step(model, mesh=None) -> Callable:
    """Jitted ``(weights, state, batch) -> sums`` of loss, accuracy and weight per batch; on
    a mesh of several devices, the batch's rows are split over ``data`` and ``fsdp`` and the
    weights taken as they are laid out."""

    def step(weights, state, batch):
        out, _ = model.apply(model_input(model, batch), weights, state, None)
        log_probs = log_probs_of(out)
        _, targets, mask = batch
        total = jnp.sum(mask.astype(jnp.float32))
        return {
            "loss": cross_entropy(log_probs, targets, mask) * total,
            "accuracy": accuracy(log_probs, targets, mask) * total,
            "sequence_accuracy": sequence_accuracy(log_probs, targets, mask) * targets.shape[0],
            "weight": total,
            "sequences": jnp.float32(targets.shape[0]),
        }

    mesh = _mesh_of_many(mesh)
    if mesh is None:
        return jax.jit(step)
    jitted = jax.jit(step, out_shardings=replicated(mesh))

    def sharded(weights, state, batch):
        sh = train_shardings(mesh, (), (), batch)[2]
        with mesh_context(mesh):
            return jitted(weights, state, global_batch(batch, sh))

    return sharded


def evaluate(eval_step, weights, state, eval_inputs, eval_steps: int) -> dict:
    """Mean loss (nats/token), accuracy, sequence accuracy and bits per token over the first
    ``eval_steps`` batches of a fresh ``eval_inputs`` stream (fewer if it ends first)."""
    stream = open_stream(eval_inputs, "eval_inputs")
    sums = None
    for batch in itertools.islice(stream, eval_steps):
        out = jax.device_get(eval_step(weights, state, as_batch(batch, "eval_inputs")))
        sums = out if sums is None else {k: sums[k] + out[k] for k in sums}
    if sums is None:
        raise ValueError("eval_inputs yielded no batch")
    weight = max(float(sums["weight"]), 1e-9)
    loss = float(sums["loss"]) / weight
    return {
        "loss": loss,
        "accuracy": float(sums["accuracy"]) / weight,
        "sequence_accuracy": float(sums["sequence_accuracy"]) / float(sums["sequences"]),
        "bits_per_token": loss / LN2,
    }
