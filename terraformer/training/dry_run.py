"""`terraformer train --dry_run`: parameter counts and memory estimates, nothing allocated."""

from __future__ import annotations

import math

import gin
import jax
import jax.numpy as jnp

from terraformer.training.batches import (
    as_batch,
    batch_signature,
    check_ids,
    check_stream_vocab,
    init_signature,
    open_stream,
)
from terraformer.training.step import make_train_step

__all__ = ["dry_run", "format_bytes"]


def _tree_bytes(tree) -> int:
    return sum(
        math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)
    )


def _tree_size(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


def format_bytes(n: float) -> str:
    """``n`` bytes in B, KiB, MiB, GiB or TiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


@gin.configurable(module="terraformer", denylist=["model", "optimizer", "inputs", "print_fn"])
def dry_run(model, optimizer, inputs, seed: int = 0, estimate_activations: bool = True,
            print_fn=print) -> dict:
    """Builds the model and optimizer abstractly (no weights allocated) from the first batch of
    ``inputs``; prints and returns parameter counts and memory estimates in bytes.

    Returns a dict with ``n_params``, ``weights_bytes``, ``optimizer_bytes``, ``batch_shapes``,
    and, when ``estimate_activations`` and the backend reports it, ``temp_bytes`` (XLA's
    scratch memory for one compiled training step, activations included) and
    ``peak_bytes_estimate``.
    """
    train_model = model(mode="train")
    stream = open_stream(inputs, "inputs")
    batch = as_batch(next(stream), "inputs")
    batch_sig = batch_signature(batch)
    x_sig = init_signature(train_model, batch_sig)
    rng = jax.random.PRNGKey(seed)
    weights, state = jax.eval_shape(lambda r: train_model.init_weights_and_state(x_sig, r), rng)
    vocab_size = check_stream_vocab(stream, train_model, weights, state, batch_sig)
    check_ids(batch, vocab_size, "inputs")
    opt = optimizer()
    opt_state = jax.eval_shape(opt.init, weights)
    report = {
        "n_params": _tree_size(weights),
        "weights_bytes": _tree_bytes(weights),
        "optimizer_bytes": _tree_bytes(opt_state),
        "model_state_bytes": _tree_bytes(state),
        "batch_shapes": [list(s.shape) for s in batch_sig],
        "vocab_size": vocab_size,
    }
    lines = [
        f"model: {train_model.name}, vocab {vocab_size}, batch "
        + " ".join(f"{tuple(s.shape)}:{s.dtype}" for s in batch_sig),
        f"parameters: {report['n_params']:,}",
        f"weights: {format_bytes(report['weights_bytes'])}",
        f"optimizer slots: {format_bytes(report['optimizer_bytes'])}",
    ]
    top = train_model.sublayers or (train_model,)
    for i, (layer, w) in enumerate(zip(top, weights if train_model.sublayers else (weights,))):
        n = _tree_size(w)
        if n:
            lines.append(f"  [{i}] {layer.name}: {n:,} parameters")
    if estimate_activations:
        step = make_train_step(train_model, opt)
        batch_structs = tuple(jax.ShapeDtypeStruct(s.shape, s.dtype) for s in batch_sig)
        compiled = step.lower(weights, state, opt_state, batch_structs, rng).compile()
        analysis = compiled.memory_analysis()
        if analysis is not None:
            report["temp_bytes"] = int(analysis.temp_size_in_bytes)
            report["peak_bytes_estimate"] = int(
                analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes
            )
            lines.append(f"step scratch (activations, temporaries): "
                         f"{format_bytes(report['temp_bytes'])}")
            lines.append(f"peak estimate for one step: "
                         f"{format_bytes(report['peak_bytes_estimate'])}")
        else:
            lines.append("step scratch: not reported by this backend")
    for line in lines:
        print_fn(line)
    return report
