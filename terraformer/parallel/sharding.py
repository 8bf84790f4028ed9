"""Sharding rules: where each weight, optimizer slot and batch lives on a mesh.

One table, `WEIGHT_RULES`, maps a weight by the last key of its pytree path (as t5x and
MaxText map parameters by name) to the dimension that goes over ``model``:

- attention projections into heads (``wq``, ``wk``, ``wv``, ``w_qk``, ``w_v``, ...) and their
  biases: the heads dimension (the last) over ``model``;
- projections out of heads (``wo``, ``w_o``): the heads dimension (second to last);
- Dense kernels (``w``): the wider of their two dimensions (d_ff in a feed-forward, the
  vocabulary in the output layer), and their biases (``b``);
- a table without a name (the embedding): its wider dimension (the vocabulary);
- layer norms and the output projection's bias: no ``model`` dimension;
- kernels packed for decoding (rows ``[d_out, d_in]``): the same dimensions, transposed.

Then the largest remaining dimension (of the rule's trailing ones: a leading axis of stacked
layers is never split) that ``fsdp`` divides goes over ``fsdp``. A dimension that its axis does
not divide stays whole and `weight_spec` says why. Everything else is replicated.

Optimizer slots (Adam's ``mu`` and ``nu``, ...) keep their weight's key names and shape in
their own paths, so the same rules give them their weight's sharding; slots of another shape
(Adafactor's factored rows/columns, step counts) get the generic rule.

The batch ``[batch, length]`` goes over ``data`` and ``fsdp`` together (its rows), the model
state (rng seeds, caches) is replicated.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "BATCH_AXES",
    "WEIGHT_RULES",
    "Rule",
    "batch_sharding",
    "bytes_per_device",
    "path_name",
    "replicated",
    "tree_shardings",
    "train_shardings",
    "weight_spec",
]

BATCH_AXES = ("data", "fsdp")


@dataclasses.dataclass(frozen=True)
class Rule:
    """A weight kind: ``pattern`` matches the path (see `path_name`); ``rank`` is the rank of
    one layer's weight (a leaf with more dimensions is stacked, its leading axes whole);
    ``model_dim`` is the dimension (counted from the end) over ``model``, 'wider' for the
    wider of the last two, None for none."""

    pattern: str
    rank: int
    model_dim: int | str | None


_INTO_HEADS = r"(wq|wk|wv|w_q|w_k|w_qk|w_v|w_qkv)"
WEIGHT_RULES: tuple[Rule, ...] = (
    # kernels packed for decoding (`layers.core.PackedKernel`): rows [d_out, d_in], then a
    # scale [d_out]
    Rule(rf"(^|/){_INTO_HEADS}/0$", 2, -2),
    Rule(rf"(^|/){_INTO_HEADS}/1$", 1, -1),
    Rule(r"(^|/)(wo|w_o)/0$", 2, -1),
    Rule(r"(^|/)w/0$", 2, "wider"),
    Rule(r"(^|/)(wo|w_o|w)/1$", 1, None),
    Rule(rf"(^|/){_INTO_HEADS}$", 2, -1),
    Rule(r"(^|/)(wo|w_o)$", 2, -2),
    Rule(r"(^|/)(bq|bk|bv|b_q|b_k|b_v|b)$", 1, -1),
    Rule(r"(^|/)w$", 2, "wider"),
    Rule(r"(^|/)(bo|b_o|scale|bias)$", 1, None),
    # a table with no name (the embedding [vocab, d_model]): the wider side over model
    Rule(r"(^|/)\d+$", 2, "wider"),
)


def path_name(path) -> str:
    """A pytree key path as text: dict keys, sequence indices and attribute names joined by
    '/', e.g. ``'4/0/0/1/1/wq'`` or ``'0/mu/4/0/0/1/1/wq'``."""
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _axis_size(mesh: Mesh, axis: str) -> int:
    return int(mesh.shape.get(axis, 1))


def weight_spec(name: str, shape: tuple[int, ...], mesh: Mesh,
                rules: tuple[Rule, ...] = WEIGHT_RULES) -> tuple[PartitionSpec, list[str]]:
    """The PartitionSpec of a weight at path ``name`` with ``shape``, and the reasons a
    dimension meant for an axis stayed whole (its size not a multiple of the axis)."""
    ndim = len(shape)
    spec: list = [None] * ndim
    reasons: list[str] = []
    rule = next((r for r in rules if re.search(r.pattern, name)), None)
    trailing = list(range(ndim)) if rule is None or ndim < rule.rank else \
        list(range(ndim - rule.rank, ndim))
    model, fsdp = _axis_size(mesh, "model"), _axis_size(mesh, "fsdp")
    model_at = None
    if rule is not None and rule.model_dim is not None and ndim >= rule.rank:
        if rule.model_dim == "wider":
            a, b = ndim - 2, ndim - 1
            model_at = a if shape[a] > shape[b] else b
        else:
            model_at = ndim + rule.model_dim
    if model > 1 and model_at is not None:
        if shape[model_at] % model == 0:
            spec[model_at] = "model"
        else:
            reasons.append(f"{name}: dimension {model_at} ({shape[model_at]}) is not a multiple "
                           f"of model={model}; kept whole")
    if fsdp > 1 and ndim:
        free = [d for d in trailing if spec[d] is None and shape[d] % fsdp == 0]
        if free:
            spec[max(free, key=lambda d: (shape[d], d))] = "fsdp"
        elif model_at is not None and spec[model_at] == "model" and \
                shape[model_at] % (model * fsdp) == 0:
            spec[model_at] = ("fsdp", "model")  # the only dimension: split it over both
        else:
            reasons.append(f"{name}: no dimension of {tuple(shape)} is a multiple of "
                           f"fsdp={fsdp}; replicated over fsdp")
    return PartitionSpec(*spec), reasons


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def tree_shardings(tree, mesh: Mesh, rules: tuple[Rule, ...] = WEIGHT_RULES,
                   reasons: list | None = None):
    """NamedShardings for every array of ``tree`` (weights or optimizer state) by the rules;
    scalars replicated. ``reasons``, when a list, collects why dimensions stayed whole."""

    def one(path, leaf):
        shape = tuple(np.shape(leaf))
        if not shape:
            return replicated(mesh)
        spec, why = weight_spec(path_name(path), shape, mesh, rules)
        if reasons is not None:
            reasons.extend(why)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh, shape: tuple[int, ...], who: str = "batch") -> NamedSharding:
    """Rows of a ``[batch, ...]`` array over ``data`` and ``fsdp``, and with a ``sequence``
    axis of several devices the length of a ``[batch, length, ...]`` array over it (each
    device a contiguous shard of every document); ValueError when the batch is not a
    multiple of data * fsdp or the length not of sequence."""
    n = _axis_size(mesh, "data") * _axis_size(mesh, "fsdp")
    if not shape or shape[0] % n:
        raise ValueError(
            f"{who}: the batch ({shape[0] if shape else 'a scalar'}) must be a multiple of "
            f"data * fsdp = {n} to split its rows over the mesh {dict(mesh.shape)}")
    n_seq = _axis_size(mesh, "sequence")
    if n_seq == 1 or len(shape) < 2:
        return NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    if shape[1] % n_seq:
        raise ValueError(f"{who}: the length ({shape[1]}) must be a multiple of sequence = "
                         f"{n_seq} to split it over the mesh {dict(mesh.shape)}")
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, "sequence"))


def train_shardings(mesh: Mesh, weights, opt_state, batch, state=None):
    """The shardings of ``(weights, opt_state, batch[, state])`` (arrays or abstract
    ShapeDtypeStructs) on ``mesh``: weights and slots by `WEIGHT_RULES`, batch rows over
    ``data`` and ``fsdp``, model state replicated."""
    w = tree_shardings(weights, mesh)
    o = tree_shardings(opt_state, mesh)
    b = jax.tree.map(lambda x: batch_sharding(mesh, tuple(np.shape(x))), batch)
    if state is None:
        return w, o, b
    return w, o, b, jax.tree.map(lambda _: replicated(mesh), state)


def bytes_per_device(tree) -> dict:
    """Bytes of ``tree``'s arrays held by each (addressable) device."""
    out: dict = {}
    for leaf in jax.tree.leaves(tree):
        for shard in getattr(leaf, "addressable_shards", ()):
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out
