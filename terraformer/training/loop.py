"""The training loop: jitted steps, periodic eval, checkpoints that resume exactly, metrics.

::

    result = train("/tmp/run", model=functools.partial(TransformerLM, 32, d_model=64),
                   inputs=lambda: copy_task(16, 32, 32), steps=200)

``model`` is a function of ``mode`` returning a Layer (as gin's ``@TransformerLM``): called
with ``mode='train'`` for training and ``'eval'`` for evaluation. ``inputs`` and
``eval_inputs`` are functions of no arguments returning an iterator of batches
``(inputs, targets, weights)`` (``weights`` optional): calling them again restarts the stream
from its beginning, which is how a resumed run finds its place (it skips the batches the
checkpoint says were consumed) and how every evaluation sees the same held-out batches.

A model with one input gets ``inputs``; one with two (encoder-decoder) gets
``(inputs, targets)``. Its first output is taken as log-probabilities ``[batch, length,
vocab]`` and scored against ``targets`` with ``weights``.

Randomness: weights are initialised from ``PRNGKey(seed)``; step ``i`` (1-based) gets the key
``fold_in(PRNGKey(seed), i)``, so a resumed run draws what an uninterrupted one would.

Files in ``output_dir``: ``checkpoints/<step>/`` (the newest ``keep_checkpoints``),
``checkpoints_best/<step>/`` (the best by ``checkpoint_lowest``/``checkpoint_highest`` eval
metric), ``metrics.jsonl``, ``tensorboard/{train,eval}/``, ``config.gin`` (the gin config the
run used, read back by ``terraformer eval`` and ``decode``).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np

from terraformer.layers.base import Layer
from terraformer.layers.losses import accuracy, cross_entropy, sequence_accuracy
from terraformer.shapes import ShapeDtype
from terraformer.training.checkpoints import Checkpointer, NoCheckpointError
from terraformer.training.metrics import MetricsWriter
from terraformer.training.optimizers import Adam, current_learning_rate

__all__ = [
    "TrainResult",
    "TrainingDivergedError",
    "dry_run",
    "evaluate",
    "evaluate_checkpoint",
    "load_weights",
    "train",
    "train_config",
]

CHECKPOINT_DIR = "checkpoints"
BEST_DIR = "checkpoints_best"
CONFIG_FILE = "config.gin"
LN2 = math.log(2.0)


class TrainingDivergedError(RuntimeError):
    """The loss (or gradient norm) stopped being finite; the run was stopped."""


@dataclasses.dataclass
class TrainResult:
    """What `train` returns.

    Attributes:
      step: the last step done (== ``steps`` unless stopped).
      losses: training loss of every step this call ran, by step.
      eval_metrics: evaluation metrics by step (keys ``loss``, ``accuracy``,
        ``sequence_accuracy``, ``bits_per_token``).
      weights, model_state, opt_state: the final training state.
      output_dir: where the run wrote its files.
    """

    step: int
    losses: dict[int, float]
    eval_metrics: dict[int, dict]
    weights: Any
    model_state: Any
    opt_state: Any
    output_dir: Path | None


# ---------------------------------------------------------------------------------------------
# Batches and the model's view of them.


def _open_stream(inputs, who: str) -> Iterator:
    """A fresh iterator from ``inputs``, a function of no arguments."""
    if not callable(inputs):
        raise TypeError(
            f"{who} must be a function returning an iterator of batches (gin: "
            f"train.{who} = @copy_task, not @copy_task()), got {type(inputs).__name__}"
        )
    stream = inputs()
    try:
        return iter(stream)
    except TypeError as e:
        raise TypeError(
            f"{who}() must return an iterator of batches, got {type(stream).__name__}"
        ) from e


def _as_batch(batch, who: str) -> tuple:
    """(inputs, targets, weights) with weights of ones when the stream gives none."""
    if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
        raise ValueError(
            f"{who}: a batch must be a tuple (inputs, targets[, weights]), got "
            f"{type(batch).__name__}{'' if not hasattr(batch, '__len__') else len(batch)}"
        )
    inputs, targets = np.asarray(batch[0]), np.asarray(batch[1])
    if len(batch) == 3:
        weights = np.asarray(batch[2], np.float32)
    else:
        weights = np.ones(targets.shape, np.float32)
    return inputs, targets, weights


def _check_model_fn(model, who):
    if isinstance(model, Layer) or not callable(model):
        raise TypeError(
            f"{who}: model must be a function of mode returning a Layer (gin: "
            f"train.model = @TransformerLM), got {type(model).__name__}"
        )


def _model_input(model, batch):
    if model.n_in == 1:
        return batch[0]
    if model.n_in == 2:
        return (batch[0], batch[1])
    raise ValueError(
        f"train: the model must take 1 input (tokens) or 2 (inputs, targets), takes {model.n_in}"
    )


def _log_probs(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _batch_signature(batch) -> tuple:
    return tuple(ShapeDtype(np.shape(x), np.asarray(x).dtype) for x in batch)


def _init_signature(model, batch_sig):
    return batch_sig[0] if model.n_in == 1 else (batch_sig[0], batch_sig[1])


def _check_ids(batch, vocab_size: int, who: str) -> None:
    for name, arr in (("inputs", batch[0]), ("targets", batch[1])):
        if np.issubdtype(arr.dtype, np.integer) and arr.size:
            hi, lo = int(arr.max()), int(arr.min())
            if hi >= vocab_size or lo < 0:
                raise ValueError(
                    f"{who}: {name} hold token ids in [{lo}, {hi}] but the model's vocab_size "
                    f"is {vocab_size}; match the tokenizer (or task vocab) to the model"
                )


def _output_vocab(model, weights, state, batch_sig) -> int:
    """The last axis of the model's log-probabilities, found abstractly."""
    x_sig = _init_signature(model, batch_sig)
    structs = jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), x_sig,
        is_leaf=lambda s: isinstance(s, ShapeDtype),
    )
    out, _ = jax.eval_shape(
        lambda x, w, s: model.apply(x, w, s, jax.random.PRNGKey(0)), structs, weights, state)
    return int(_log_probs(out).shape[-1])


def _check_vocab(stream, model, weights, state, batch_sig, who: str):
    """Output vocab of the model vs. the stream's tokenizer; returns the vocab size."""
    vocab_size = _output_vocab(model, weights, state, batch_sig)
    tokenizer = getattr(stream, "tokenizer", None)
    if tokenizer is not None:
        from terraformer.data.tokenizers import check_vocab

        check_vocab(tokenizer, vocab_size)
    return vocab_size


# ---------------------------------------------------------------------------------------------
# Steps.


def _loss_and_metrics(model, weights, state, batch, rng):
    out, new_state = model.apply(_model_input(model, batch), weights, state, rng)
    log_probs = _log_probs(out)
    _, targets, mask = batch
    loss = cross_entropy(log_probs, targets, mask)
    return loss, (new_state, accuracy(log_probs, targets, mask))


def make_train_step(model, optimizer) -> Callable:
    """The jitted step ``(weights, state, opt_state, batch, rng) -> (weights, state, opt_state,
    metrics)``; metrics: ``loss``, ``accuracy``, ``grad_norm``, ``lr`` (scalars)."""
    import optax

    def step(weights, state, opt_state, batch, rng):
        grad_fn = jax.value_and_grad(
            lambda w: _loss_and_metrics(model, w, state, batch, rng), has_aux=True
        )
        (loss, (new_state, acc)), grads = grad_fn(weights)
        updates, opt_state = optimizer.update(grads, opt_state, weights)
        weights = optax.apply_updates(weights, updates)
        metrics = {
            "loss": loss,
            "accuracy": acc,
            "grad_norm": optax.global_norm(grads),
            "lr": current_learning_rate(opt_state),
        }
        return weights, new_state, opt_state, metrics

    donate = (0, 1, 2) if jax.default_backend() != "cpu" else ()
    return jax.jit(step, donate_argnums=donate)


def make_eval_step(model) -> Callable:
    """Jitted ``(weights, state, batch) -> sums`` of loss, accuracy and weight per batch."""

    def step(weights, state, batch):
        out, _ = model.apply(_model_input(model, batch), weights, state, None)
        log_probs = _log_probs(out)
        _, targets, mask = batch
        total = jnp.sum(mask.astype(jnp.float32))
        return {
            "loss": cross_entropy(log_probs, targets, mask) * total,
            "accuracy": accuracy(log_probs, targets, mask) * total,
            "sequence_accuracy": sequence_accuracy(log_probs, targets, mask) * targets.shape[0],
            "weight": total,
            "sequences": jnp.float32(targets.shape[0]),
        }

    return jax.jit(step)


def evaluate(eval_step, weights, state, eval_inputs, eval_steps: int) -> dict:
    """Mean loss (nats/token), accuracy, sequence accuracy and bits per token over the first
    ``eval_steps`` batches of a fresh ``eval_inputs`` stream (fewer if it ends first)."""
    stream = _open_stream(eval_inputs, "eval_inputs")
    sums = None
    for batch in itertools.islice(stream, eval_steps):
        out = jax.device_get(eval_step(weights, state, _as_batch(batch, "eval_inputs")))
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


# ---------------------------------------------------------------------------------------------
# Memory report for --dry_run.


def _tree_bytes(tree) -> int:
    return sum(
        math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)
    )


def _tree_size(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


def _fmt_bytes(n: float) -> str:
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
    stream = _open_stream(inputs, "inputs")
    batch = _as_batch(next(stream), "inputs")
    batch_sig = _batch_signature(batch)
    x_sig = _init_signature(train_model, batch_sig)
    rng = jax.random.PRNGKey(seed)
    weights, state = jax.eval_shape(lambda r: train_model.init_weights_and_state(x_sig, r), rng)
    vocab_size = _check_vocab(stream, train_model, weights, state, batch_sig, "inputs")
    _check_ids(batch, vocab_size, "inputs")
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
        f"weights: {_fmt_bytes(report['weights_bytes'])}",
        f"optimizer slots: {_fmt_bytes(report['optimizer_bytes'])}",
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
                         f"{_fmt_bytes(report['temp_bytes'])}")
            lines.append(f"peak estimate for one step: "
                         f"{_fmt_bytes(report['peak_bytes_estimate'])}")
        else:
            lines.append("step scratch: not reported by this backend")
    for line in lines:
        print_fn(line)
    return report


# ---------------------------------------------------------------------------------------------
# The loop.


class _Window:
    """Training metrics summed since the last log record."""

    def __init__(self):
        self.sums = {"loss": 0.0, "accuracy": 0.0, "grad_norm": 0.0}
        self.n = 0
        self.timed_steps = 0
        self.time = 0.0

    def add(self, metrics, seconds):
        for key in self.sums:
            self.sums[key] += float(metrics[key])
        self.n += 1
        if seconds is not None:
            self.timed_steps += 1
            self.time += seconds

    def means(self) -> dict:
        return {k: v / max(self.n, 1) for k, v in self.sums.items()}

    def tokens_per_s(self, tokens_per_batch):
        if not self.timed_steps or self.time <= 0:
            return None
        return tokens_per_batch * self.timed_steps / self.time


EVAL_METRICS = ("loss", "accuracy", "sequence_accuracy", "bits_per_token")


def _best_spec(keep_best, checkpoint_lowest, checkpoint_highest):
    """(metric, 'min'|'max') by which the best checkpoint is chosen, or (None, None)."""
    if checkpoint_lowest and checkpoint_highest:
        raise ValueError(
            "train: give at most one of checkpoint_lowest and checkpoint_highest, got "
            f"{checkpoint_lowest!r} and {checkpoint_highest!r}"
        )
    metric, mode = (checkpoint_highest, "max") if checkpoint_highest else (
        checkpoint_lowest or "loss", "min")
    if metric not in EVAL_METRICS:
        raise ValueError(
            f"train: checkpoint_lowest/checkpoint_highest must name an eval metric "
            f"({', '.join(EVAL_METRICS)}), got {metric!r}"
        )
    return (metric, mode) if keep_best else (None, None)


def _check_count(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"train: {name} must be an int >= {minimum}, got {value!r}")
    return int(value)


@jax.jit
def _finite(tree):
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves] or [jnp.bool_(True)]))


def _all_finite(tree) -> bool:
    """Whether every floating-point array in ``tree`` is free of NaN and inf."""
    return bool(jax.device_get(_finite(tree)))


def _write_config(output_dir: Path) -> None:
    text = gin.config_str()
    if text.strip():
        tmp = output_dir / (CONFIG_FILE + ".tmp")
        tmp.write_text(text)
        tmp.replace(output_dir / CONFIG_FILE)


@gin.configurable(module="terraformer")
def train(
    output_dir,
    model=gin.REQUIRED,
    inputs=gin.REQUIRED,
    eval_inputs=None,
    optimizer=Adam,
    lr_schedule=None,
    steps: int = 1000,
    eval_frequency: int = 100,
    eval_steps: int = 10,
    checkpoint_frequency: int | None = None,
    keep_checkpoints: int = 2,
    keep_best: bool = True,
    checkpoint_lowest: str | None = None,
    checkpoint_highest: str | None = None,
    log_frequency: int = 10,
    seed: int = 0,
    progress: bool = True,
    tensorboard: bool = True,
    async_checkpoints: bool = True,
    memory_efficient: bool = False,
) -> TrainResult:
    """Trains ``model`` on ``inputs`` for ``steps`` steps, resuming from ``output_dir``.

    Args:
      output_dir: the run directory; when it holds checkpoints, training resumes from the
        newest (weights, optimizer state, rng, data position) and continues to ``steps``.
      model: function of ``mode`` returning the Layer (gin: ``train.model = @TransformerLM``).
      inputs: function returning an iterator of training batches (see the module docstring).
      eval_inputs: the same for the held-out stream, or None (no evaluation).
      optimizer: function of ``learning_rate`` (optional) returning an optax transformation,
        e.g. ``Adam``; see ``optimizers``.
      lr_schedule: a schedule (``step -> rate``) given to the optimizer as its
        ``learning_rate``; None keeps the optimizer's own.
      steps: total number of training steps (counting those of earlier runs in output_dir).
      eval_frequency: evaluate every this many steps (and before the first and after the last).
      eval_steps: batches per evaluation.
      checkpoint_frequency: checkpoint every this many steps (default: eval_frequency); a
        checkpoint is also written after the last step.
      keep_checkpoints: how many recent checkpoints to keep.
      keep_best: also keep the best checkpoint by an eval metric in ``checkpoints_best/``
        (when there is an ``eval_inputs``).
      checkpoint_lowest / checkpoint_highest: that metric (``loss``, ``accuracy``,
        ``sequence_accuracy``, ``bits_per_token``), lowest or highest best; give at most one
        (default: lowest ``loss``).
      log_frequency: write averaged training metrics every this many steps.
      seed: seed of initialisation and of the per-step rngs.
      progress: show a tqdm progress bar.
      tensorboard: write TensorBoard event files.
      async_checkpoints: write checkpoints in the background.
      memory_efficient: train with ``memory.offload.MemoryEfficientTrainer`` (a model with one
        reversible stack: its weights and slots in host memory, per-block fused updates,
        chunked loss); same updates as the plain step. The optimizer must act per weight
        (no ``clip_grad_norm``).

    Raises:
      TrainingDivergedError: the loss or gradient norm became NaN/inf; the newest checkpoint
        is the last good state.
    """
    steps = _check_count("steps", steps, 0)
    eval_frequency = _check_count("eval_frequency", eval_frequency)
    eval_steps = _check_count("eval_steps", eval_steps)
    checkpoint_frequency = _check_count(
        "checkpoint_frequency", eval_frequency if checkpoint_frequency is None
        else checkpoint_frequency)
    log_frequency = _check_count("log_frequency", log_frequency)
    best_metric, best_mode = _best_spec(keep_best, checkpoint_lowest, checkpoint_highest)
    if eval_inputs is None:
        best_metric = None
    if model is gin.REQUIRED or inputs is gin.REQUIRED:
        raise ValueError("train: model and inputs must be given (gin: train.model, train.inputs)")

    _check_model_fn(model, "train")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    _write_config(output_dir)

    train_model = model(mode="train")
    eval_model = model(mode="eval") if eval_inputs is not None else None
    opt = optimizer(learning_rate=lr_schedule) if lr_schedule is not None else optimizer()

    # Shapes from the first batch; the stream is reopened below at the right position.
    probe = _open_stream(inputs, "inputs")
    first = _as_batch(next(probe), "inputs")
    batch_sig = _batch_signature(first)
    x_sig = _init_signature(train_model, batch_sig)
    base_rng = jax.random.PRNGKey(seed)
    init_rng, _ = jax.random.split(base_rng)
    weights, state = train_model.init_weights_and_state(x_sig, init_rng)
    vocab_size = _check_vocab(probe, train_model, weights, state, batch_sig, "inputs")
    _check_ids(first, vocab_size, "inputs")
    del probe
    if memory_efficient:
        from terraformer.memory.offload import MemoryEfficientTrainer

        trainer = MemoryEfficientTrainer(train_model, opt)
        opt_state = trainer.init_opt_state(weights)
    else:
        opt_state = jax.jit(opt.init)(weights)

    checkpoints = Checkpointer(output_dir / CHECKPOINT_DIR, keep_checkpoints, async_checkpoints)
    best_checkpoints = (
        Checkpointer(output_dir / BEST_DIR, 1, async_checkpoints) if best_metric else None
    )
    start_step, consumed, best_value = 0, 0, None
    last_saved = None
    try:
        trees, meta, start_step = checkpoints.restore(
            {"weights": weights, "model_state": state, "opt_state": opt_state, "rng": base_rng}
        )
    except NoCheckpointError:
        pass
    else:
        weights, state, opt_state = trees["weights"], trees["model_state"], trees["opt_state"]
        base_rng = trees["rng"]
        consumed = int(meta.get("batches_consumed", start_step))
        best_value = meta.get("best_value")
        last_saved = start_step
    weights, state, opt_state = jax.device_put((weights, state, opt_state))

    train_step = make_train_step(train_model, opt) if not memory_efficient else trainer.step
    eval_step = make_eval_step(eval_model) if eval_model is not None else None
    if memory_efficient and eval_step is not None:
        eval_step = trainer.wrap_eval_step(eval_step)
    writer = MetricsWriter(output_dir, start_step=start_step, tensorboard=tensorboard)
    tokens_per_batch = int(np.prod(batch_sig[0].shape))
    losses: dict[int, float] = {}
    eval_history: dict[int, dict] = {}

    from tqdm.auto import tqdm

    bar = tqdm(total=steps, initial=start_step, disable=not progress, dynamic_ncols=True,
               mininterval=0.5, desc="train")

    def run_eval(step):
        metrics = evaluate(eval_step, weights, state, eval_inputs, eval_steps)
        eval_history[step] = metrics
        writer.write(step, {f"eval/{k}": v for k, v in metrics.items()})
        bar.write(
            f"step {step}: eval loss {metrics['loss']:.4f}, accuracy {metrics['accuracy']:.4f}, "
            f"bits/token {metrics['bits_per_token']:.4f}"
        )
        return metrics

    def save(step, metrics=None, latest=True):
        nonlocal best_value, last_saved
        trees = {"weights": weights, "model_state": state, "opt_state": opt_state,
                 "rng": base_rng}
        new_best = False
        if metrics is not None and best_metric is not None:
            value = metrics[best_metric]
            new_best = best_value is None or (
                value < best_value if best_mode == "min" else value > best_value)
            if new_best:
                best_value = value
        meta = {
            "step": step, "batches_consumed": consumed, "seed": seed,
            "input_signature": [[list(s.shape), str(s.dtype)] for s in batch_sig],
            "best_metric": best_metric, "best_value": best_value, "eval": metrics,
        }
        if new_best:
            best_checkpoints.save(step, trees, meta)
        if latest:
            checkpoints.save(step, trees, meta)
            last_saved = step

    def diverged(step, what):
        checkpoints.wait()
        good = checkpoints.latest_step()
        where = (f"the last good checkpoint is step {good} in '{checkpoints.directory}'"
                 if good is not None else "no checkpoint was written before it")
        return TrainingDivergedError(
            f"training stopped at step {step}: {what}; {where}. Lower the learning rate or "
            "clip gradients (e.g. --gin_param 'Adam.clip_grad_norm=1.0') and run again"
        )

    stream = _open_stream(inputs, "inputs")
    step = start_step
    try:
        for _ in itertools.islice(stream, consumed):
            pass
        if eval_step is not None and start_step == 0 and steps > 0:
            run_eval(0)
        window = _Window()
        t_start = time.perf_counter()
        while step < steps:
            try:
                raw = next(stream)
            except StopIteration:
                bar.write(f"inputs ran out after {consumed} batches; stopping at step {step}")
                break
            batch = _as_batch(raw, "inputs")
            t0 = time.perf_counter()
            rng = jax.random.fold_in(base_rng, step + 1)
            weights, state, opt_state, m = train_step(weights, state, opt_state, batch, rng)
            m = jax.device_get(m)
            dt = time.perf_counter() - t0
            step += 1
            consumed += 1
            loss, grad_norm = float(m["loss"]), float(m["grad_norm"])
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                raise diverged(step, f"loss is {loss}, gradient norm {grad_norm}")
            losses[step] = loss
            first_step = step == start_step + 1
            if first_step:
                writer.write(step, {"compile_s": dt})
            window.add(m, None if first_step else dt)
            tps = window.tokens_per_s(tokens_per_batch)
            bar.set_postfix(loss=f"{loss:.4f}",
                            tok_s="-" if tps is None else f"{tps:,.0f}", refresh=False)
            bar.update(1)
            if step % log_frequency == 0 or step == steps:
                record = window.means()
                record["lr"] = float(m["lr"])
                if tps is not None:
                    record["tokens_per_s"] = tps
                record["elapsed_s"] = time.perf_counter() - t_start
                writer.write(step, record)
                window = _Window()
            eval_metrics = None
            if eval_step is not None and (step % eval_frequency == 0 or step == steps):
                eval_metrics = run_eval(step)
            is_checkpoint = step % checkpoint_frequency == 0 or step == steps
            if is_checkpoint or (eval_metrics is not None and best_metric is not None):
                if not _all_finite(weights):
                    raise diverged(step, "the weights are no longer finite")
                save(step, eval_metrics, latest=is_checkpoint)
        if step > start_step and last_saved != step:
            if not _all_finite(weights):
                raise diverged(step, "the weights are no longer finite")
            save(step)
    finally:
        bar.close()
        for c in (checkpoints, best_checkpoints):
            if c is not None:
                c.wait()
                c.close()
        writer.close()
    return TrainResult(step, losses, eval_history, weights, state, opt_state, output_dir)


# ---------------------------------------------------------------------------------------------
# Reading a run back: its gin configuration and its weights.


def train_config() -> dict:
    """``train``'s arguments as the current gin config binds them, defaults filled in."""
    import inspect

    params = {
        name: p.default
        for name, p in inspect.signature(train).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    params.update(gin.get_bindings("train"))
    return params


def load_weights(output_dir, model, checkpoint: str = "latest"):
    """``(weights, model_state, meta)`` of a run's newest (or best) checkpoint; ``meta`` holds
    ``step``, ``input_signature``, ``vocab_size`` (the model's output vocabulary) and the eval
    metrics of that step.

    Args:
      output_dir: the run directory.
      model: function of ``mode`` returning the Layer the run trained.
      checkpoint: ``'latest'`` or ``'best'``.

    Raises:
      CheckpointError: no checkpoint there, or one of another model.
    """
    _check_model_fn(model, "load_weights")
    if checkpoint not in ("latest", "best"):
        raise ValueError(f"checkpoint must be 'latest' or 'best', got {checkpoint!r}")
    directory = Path(output_dir) / (CHECKPOINT_DIR if checkpoint == "latest" else BEST_DIR)
    if not directory.is_dir():
        raise NoCheckpointError(f"no checkpoint in '{directory}' (train a model there first)")
    ckpt = Checkpointer(directory, max_to_keep=None, async_save=False)
    try:
        meta = ckpt.read_meta()
        if meta is None:
            raise NoCheckpointError(
                f"no checkpoint in '{directory}' (train a model there first)")
        batch_sig = tuple(ShapeDtype(tuple(s), d) for s, d in meta["input_signature"])
        train_model = model(mode="train")
        x_sig = _init_signature(train_model, batch_sig)
        weights, state = jax.eval_shape(
            lambda r: train_model.init_weights_and_state(x_sig, r), jax.random.PRNGKey(0))
        templates = {
            "weights": jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), weights),
            "model_state": jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), state),
        }
        trees, meta, _ = ckpt.restore(templates)
    finally:
        ckpt.close()
    meta["vocab_size"] = _output_vocab(train_model, weights, state, batch_sig)
    return jax.device_put(trees["weights"]), jax.device_put(trees["model_state"]), meta


def evaluate_checkpoint(output_dir, model=None, eval_inputs=None, eval_steps=None,
                        checkpoint: str = "latest") -> dict:
    """Evaluates a run's checkpoint on its held-out stream; arguments left None come from the
    gin config (``train.model``, ``train.eval_inputs``, ``train.eval_steps``). Returns the
    metrics dict of :func:`evaluate` plus ``step``."""
    config = train_config() if None in (model, eval_inputs, eval_steps) else {}
    model = model if model is not None else config.get("model")
    eval_inputs = eval_inputs if eval_inputs is not None else config.get("eval_inputs")
    eval_steps = eval_steps if eval_steps is not None else config.get("eval_steps", 10)
    if model is None or model is gin.REQUIRED:
        raise ValueError("evaluate: no model (gin: train.model)")
    if eval_inputs is None:
        raise ValueError("evaluate: no held-out stream (gin: train.eval_inputs)")
    weights, state, meta = load_weights(output_dir, model, checkpoint)
    metrics = evaluate(make_eval_step(model(mode="eval")), weights, state, eval_inputs,
                       eval_steps)
    return {"step": int(meta["step"]), **metrics}
