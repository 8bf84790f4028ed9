"""The training run: steps, periodic eval, checkpoints that resume exactly, metrics, progress.

::

    result = train("/tmp/run", model=functools.partial(TransformerLM, 32, d_model=64),
                   inputs=lambda: copy_task(16, 32, 32), steps=200)

``model`` is a function of ``mode`` returning a Layer (as gin's ``@TransformerLM``): called
with ``mode='train'`` for training and ``'eval'`` for evaluation. ``inputs`` and
``eval_inputs`` are functions of no arguments returning an iterator of batches
``(inputs, targets, weights)`` (``weights`` optional): calling them again restarts the stream
from its beginning, which is how a resumed run finds its place (it skips the batches the
checkpoint says were consumed) and how every evaluation sees the same held-out batches.

Randomness: weights are initialised from ``PRNGKey(seed)``; step ``i`` (1-based) gets the key
``fold_in(PRNGKey(seed), i)``, so a resumed run draws what an uninterrupted one would.

The run folder changes only once the run is known to be good: `TrainingRun.start` checks the
settings, builds the model and the inputs and checks an existing checkpoint against the model
before it writes anything, so a rejected start leaves the folder as it was (and a new folder
that fails before its first step is removed). SIGINT and SIGTERM finish the step in flight,
save it and raise `TrainingInterruptedError` (see `training.interrupts`). Files: see
`training.run_dir`.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from terraformer.checks import check_choice, check_int
from terraformer.parallel.mesh import mesh as configured_mesh
from terraformer.parallel.sharding import replicated
from terraformer.training.batches import (
    as_batch,
    batch_signature,
    check_ids,
    check_model_fn,
    check_stream_vocab,
    init_signature,
    open_stream,
)
from terraformer.training.checkpoints import Checkpointer, NoCheckpointError
from terraformer.training.dry_run import dry_run
from terraformer.training.interrupts import InterruptGuard, TrainingInterruptedError, signal_name
from terraformer.training.metrics import MetricsWriter
from terraformer.training.optimizers import Adam
from terraformer.training.run_dir import (
    BEST_DIR,
    CHECKPOINT_DIR,
    CONFIG_FILE,
    changed_bindings,
    load_weights,
    resumed_config_name,
    write_text_atomic,
)
from terraformer.training.step import evaluate, make_eval_step, make_train_step

__all__ = [
    "EVAL_METRICS",
    "TrainResult",
    "TrainingDivergedError",
    "TrainingInterruptedError",
    "TrainingRun",
    "dry_run",
    "evaluate",
    "evaluate_checkpoint",
    "load_weights",
    "progress_eta",
    "train",
    "train_config",
]

EVAL_METRICS = ("loss", "accuracy", "sequence_accuracy", "bits_per_token")


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
# Small pieces of the run.


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


def progress_eta(timed_steps: int, timed_seconds: float, remaining_steps: int) -> str:
    """The time left, from the steps timed after compiling; '-' until one has been timed (the
    first step's compile time says nothing about the rest)."""
    if timed_steps <= 0 or timed_seconds <= 0:
        return "-"
    return tqdm.format_interval(remaining_steps * timed_seconds / timed_steps)


def _best_spec(keep_best, checkpoint_lowest, checkpoint_highest):
    """(metric, 'min'|'max') by which the best checkpoint is chosen, or (None, None)."""
    if checkpoint_lowest and checkpoint_highest:
        raise ValueError(
            "train: give at most one of checkpoint_lowest and checkpoint_highest, got "
            f"{checkpoint_lowest!r} and {checkpoint_highest!r}"
        )
    metric, mode = (checkpoint_highest, "max") if checkpoint_highest else (
        checkpoint_lowest or "loss", "min")
    check_choice("checkpoint_lowest/checkpoint_highest", metric, EVAL_METRICS, "train")
    return (metric, mode) if keep_best else (None, None)


@jax.jit
def _finite(tree):
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves] or [jnp.bool_(True)]))


def _all_finite(tree) -> bool:
    """Whether every floating-point array in ``tree`` is free of NaN and inf."""
    return bool(jax.device_get(_finite(tree)))


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# The run.


class TrainingRun:
    """One call of `train`: its state and the steps that move it.

    ``run.run()`` (``start()``: build, restore, open; then ``train()``) and ``run.close()``
    in any case; `train` does exactly this. Arguments: those of `train`, plus ``log``, a function
    of one line of text (default: print to stderr).
    """

    def __init__(self, output_dir, model, inputs, eval_inputs=None, optimizer=Adam,
                 lr_schedule=None, steps: int = 1000, eval_frequency: int = 100,
                 eval_steps: int = 10, checkpoint_frequency: int | None = None,
                 keep_checkpoints: int = 2, keep_best: bool = True,
                 checkpoint_lowest: str | None = None, checkpoint_highest: str | None = None,
                 log_frequency: int = 10, seed: int = 0, progress: bool = True,
                 tensorboard: bool = True, async_checkpoints: bool = True,
                 memory_efficient: bool = False, log=_stderr, mesh=None):
        if model is gin.REQUIRED or inputs is gin.REQUIRED:
            raise ValueError(
                "train: model and inputs must be given (gin: train.model, train.inputs)")
        self.steps = check_int("steps", steps, 0, "train")
        self.eval_frequency = check_int("eval_frequency", eval_frequency, 1, "train")
        self.eval_steps = check_int("eval_steps", eval_steps, 1, "train")
        self.checkpoint_frequency = check_int(
            "checkpoint_frequency",
            eval_frequency if checkpoint_frequency is None else checkpoint_frequency, 1, "train")
        self.keep_checkpoints = keep_checkpoints
        self.log_frequency = check_int("log_frequency", log_frequency, 1, "train")
        self.best_metric, self.best_mode = _best_spec(keep_best, checkpoint_lowest,
                                                      checkpoint_highest)
        if eval_inputs is None:
            self.best_metric = None
        check_model_fn(model, "train")
        self.output_dir = Path(output_dir)
        self.model_fn, self.inputs, self.eval_inputs = model, inputs, eval_inputs
        self.optimizer_fn, self.lr_schedule = optimizer, lr_schedule
        self.seed, self.progress, self.tensorboard = seed, progress, tensorboard
        self.async_checkpoints, self.memory_efficient = async_checkpoints, memory_efficient
        self.log = log
        self.mesh = mesh
        self.guard = InterruptGuard()
        # the state
        self.step = self.start_step = self.consumed = 0
        self.best_value = None
        self.last_saved = None
        self.base_rng = jax.random.PRNGKey(seed)
        self.losses: dict[int, float] = {}
        self.eval_history: dict[int, dict] = {}
        # what open() makes
        self.created = False
        self.checkpoints = self.best_checkpoints = self.writer = self.bar = None
        self._restored = False

    # -- start: nothing is written before open() ----------------------------------------------
    def start(self) -> None:
        """Builds, restores, then opens the folder; on failure the folder is as it was."""
        self.build()
        self.restore()
        self.open()

    def build(self) -> None:
        """The models, the optimizer, the first batch's shapes, fresh weights and the steps;
        checks the model's vocabulary against the inputs."""
        self.train_model = self.model_fn(mode="train")
        self.eval_model = self.model_fn(mode="eval") if self.eval_inputs is not None else None
        self.optimizer = (self.optimizer_fn(learning_rate=self.lr_schedule)
                          if self.lr_schedule is not None else self.optimizer_fn())
        probe = open_stream(self.inputs, "inputs")
        first = as_batch(next(probe), "inputs")
        self.batch_sig = batch_signature(first)
        x_sig = init_signature(self.train_model, self.batch_sig)
        init_rng, _ = jax.random.split(self.base_rng)
        self.weights, self.state = self.train_model.init_weights_and_state(x_sig, init_rng)
        vocab_size = check_stream_vocab(probe, self.train_model, self.weights, self.state,
                                        self.batch_sig)
        check_ids(first, vocab_size, "inputs")
        if self.mesh is None:
            self.mesh = configured_mesh()  # gin: mesh.data = 2, ...; default one device
        self.train_step = make_train_step(self.train_model, self.optimizer,
                                          memory_efficient=self.memory_efficient,
                                          mesh=self.mesh)
        self.opt_state = self.train_step.init_opt_state(self.weights)
        self.eval_step = (make_eval_step(self.eval_model, self.mesh)
                          if self.eval_model is not None else None)

    def _trees(self) -> dict:
        return {"weights": self.weights, "model_state": self.state,
                "opt_state": self.opt_state, "rng": self.base_rng}

    def restore(self) -> None:
        """Resumes from the newest readable checkpoint of the folder, if any, read-only: a
        checkpoint of another model raises CheckpointError with the folder untouched."""
        directory = self.output_dir / CHECKPOINT_DIR
        exists = directory.is_dir()
        if jax.process_count() > 1:  # every process looks before any of them makes it
            multihost_utils.sync_global_devices(f"looked for {directory}")
        if not exists:
            return
        reader = Checkpointer(directory, max_to_keep=None, async_save=False, read_only=True)
        # Each array is read straight into its layout (whatever mesh wrote it).
        if self.train_step.mesh is not None:
            w, o, _, s = self.train_step.layout(self.weights, self.state, self.opt_state)
            shardings = {"weights": w, "model_state": s, "opt_state": o,
                         "rng": replicated(self.train_step.mesh)}
        else:
            one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            shardings = {name: jax.tree.map(lambda _: one, tree)
                         for name, tree in self._trees().items()}
        try:
            trees, meta, step = reader.restore(self._trees(), shardings=shardings)
        except NoCheckpointError:
            return
        finally:
            reader.close()
        self._restored = True
        self.weights, self.state = trees["weights"], trees["model_state"]
        self.opt_state, self.base_rng = trees["opt_state"], trees["rng"]
        self.step = self.start_step = self.last_saved = step
        self.consumed = int(meta.get("batches_consumed", step))
        self.best_value = meta.get("best_value")

    def open(self) -> None:
        """The run is good: makes the folder, records the config, opens checkpoints, metrics
        and the progress bar."""
        self.created = not self.output_dir.exists()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._record_config()
        if self.train_step.mesh is None:
            self.weights, self.state, self.opt_state = jax.device_put(
                (self.weights, self.state, self.opt_state))
        else:
            self.weights, self.state, self.opt_state = self.train_step.place(
                self.weights, self.state, self.opt_state)
        self.checkpoints = Checkpointer(self.output_dir / CHECKPOINT_DIR, self.keep_checkpoints,
                                        self.async_checkpoints)
        # What the read-only restore passed over (partial or unreadable steps, all newer
        # than the one restored) is set aside now, so that it is not mistaken for the newest.
        self.checkpoints.discard_incomplete(newer_than=self.start_step if self._restored
                                            else -1)
        if self.best_metric:
            self.best_checkpoints = Checkpointer(self.output_dir / BEST_DIR, 1,
                                                 self.async_checkpoints)
        self.writer = MetricsWriter(self.output_dir, start_step=self.start_step,
                                    tensorboard=self.tensorboard)
        if self._restored:
            self.log(f"resuming from step {self.start_step} "
                     f"(checkpoint '{self.checkpoints.directory / str(self.start_step)}')")
        self.log(f"writing the run to '{self.output_dir.absolute()}'")
        self.bar = tqdm(total=self.steps, initial=self.start_step, disable=not self.progress,
                        dynamic_ncols=True, mininterval=0.5, desc="train",
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")

    def _record_config(self) -> None:
        """config.gin on a first start; the bindings a resumed start changed beside it."""
        text = gin.config_str()
        if not text.strip():
            return
        path = self.output_dir / CONFIG_FILE
        if not self._restored or not path.is_file():
            write_text_atomic(path, text)
            return
        changes = changed_bindings(path.read_text(), text)
        if changes:
            header = (f"# Bindings changed when the run resumed at step {self.start_step} "
                      f"(the rest as in {CONFIG_FILE}).\n")
            write_text_atomic(self.output_dir / resumed_config_name(self.start_step),
                              header + changes)

    # -- steps ---------------------------------------------------------------------------------
    def run(self) -> None:
        """`start`, then `train`, with SIGINT and SIGTERM held by `guard` (see
        `training.interrupts`): an interrupt stops the run at a saved step."""
        with self.guard:
            try:
                self.start()
                self._stop_if_asked()
                self.train()
            except KeyboardInterrupt:
                if not self.guard.aborted:
                    raise
                where = self._save_now()
                raise TrainingInterruptedError(
                    f"stopped at once by a second {signal_name(self.guard.requested)} at step "
                    f"{self.step}; {where}", self.guard.requested, self.step) from None

    def train(self) -> None:
        """Trains to ``steps`` (or until the inputs run out), evaluating and checkpointing;
        stops at a saved step when `guard` has seen an interrupt."""
        stream = open_stream(self.inputs, "inputs")
        for _ in itertools.islice(stream, self.consumed):
            pass
        self._loop(stream)

    def _loop(self, stream) -> None:
        if self.eval_step is not None and self.start_step == 0 and self.steps > 0:
            self.evaluate()
        window = _Window()
        timed_steps, timed_s = 0, 0.0
        t_start = time.perf_counter()
        tokens_per_batch = int(np.prod(self.batch_sig[0].shape))
        while self.step < self.steps:
            self._stop_if_asked()
            try:
                raw = next(stream)
            except StopIteration:
                self.bar.write(f"inputs ran out after {self.consumed} batches; stopping at "
                               f"step {self.step}")
                break
            t0 = time.perf_counter()
            m = self.train_one(as_batch(raw, "inputs"))
            dt = time.perf_counter() - t0
            first_step = self.step == self.start_step + 1
            if first_step:
                self.writer.write(self.step, {"compile_s": dt})
            else:
                timed_steps, timed_s = timed_steps + 1, timed_s + dt
            window.add(m, None if first_step else dt)
            tps = window.tokens_per_s(tokens_per_batch)
            self.bar.set_postfix(loss=f"{float(m['loss']):.4f}",
                                 tok_s="-" if tps is None else f"{tps:,.0f}",
                                 eta=progress_eta(timed_steps, timed_s, self.steps - self.step),
                                 refresh=False)
            self.bar.update(1)
            if self.step % self.log_frequency == 0 or self.step == self.steps:
                record = window.means()
                record["lr"] = float(m["lr"])
                if tps is not None:
                    record["tokens_per_s"] = tps
                record["elapsed_s"] = time.perf_counter() - t_start
                self.writer.write(self.step, record)
                window = _Window()
            self._stop_if_asked()
            eval_metrics = None
            if self.eval_step is not None and (self.step % self.eval_frequency == 0
                                               or self.step == self.steps):
                eval_metrics = self.evaluate()
            is_checkpoint = self.step % self.checkpoint_frequency == 0 or self.step == self.steps
            if is_checkpoint or (eval_metrics is not None and self.best_metric is not None):
                self.checkpoint(eval_metrics, latest=is_checkpoint)
        if self.step > self.start_step and self.last_saved != self.step:
            self.checkpoint()

    def train_one(self, batch) -> dict:
        """One training step on ``batch``; returns its metrics (host scalars). A second
        interrupt waits for it to end, so that the weights, the step count and the data
        position always agree."""
        with self.guard.deferred():
            rng = jax.random.fold_in(self.base_rng, self.step + 1)
            weights, state, opt_state, m = self.train_step(
                self.weights, self.state, self.opt_state, batch, rng)
            self.weights, self.state, self.opt_state = weights, state, opt_state
            m = jax.device_get(m)
            self.step += 1
            self.consumed += 1
        loss, grad_norm = float(m["loss"]), float(m["grad_norm"])
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise self._diverged(f"loss is {loss}, gradient norm {grad_norm}")
        self.losses[self.step] = loss
        return m

    def evaluate(self) -> dict:
        """Evaluates the current weights on ``eval_steps`` held-out batches; logs the result."""
        weights = self.train_step.eval_weights(self.weights)
        metrics = evaluate(self.eval_step, weights, self.state, self.eval_inputs,
                           self.eval_steps)
        self.eval_history[self.step] = metrics
        self.writer.write(self.step, {f"eval/{k}": v for k, v in metrics.items()})
        self.bar.write(
            f"step {self.step}: eval loss {metrics['loss']:.4f}, accuracy "
            f"{metrics['accuracy']:.4f}, bits/token {metrics['bits_per_token']:.4f}"
        )
        return metrics

    def checkpoint(self, metrics: dict | None = None, latest: bool = True) -> None:
        """Saves the state at this step (and as the best one when ``metrics`` are)."""
        if not _all_finite(self.weights):
            raise self._diverged("the weights are no longer finite")
        with self.guard.deferred():
            trees = self._trees()
            new_best = False
            if metrics is not None and self.best_metric is not None:
                value = metrics[self.best_metric]
                new_best = self.best_value is None or (
                    value < self.best_value if self.best_mode == "min"
                    else value > self.best_value)
                if new_best:
                    self.best_value = value
            meta = {
                "step": self.step, "batches_consumed": self.consumed, "seed": self.seed,
                "input_signature": [[list(s.shape), str(s.dtype)] for s in self.batch_sig],
                "best_metric": self.best_metric, "best_value": self.best_value,
                "eval": metrics,
            }
            if new_best:
                self.best_checkpoints.save(self.step, trees, meta)
            if latest:
                self.checkpoints.save(self.step, trees, meta)
                self.last_saved = self.step

    def _save_now(self) -> str:
        """Saves the last finished step unless it is saved (or being saved); waits for the
        write. Returns where it is, in words."""
        if self.step > self.start_step and self.last_saved != self.step:
            self.checkpoint()
        if self.checkpoints is not None:
            self.checkpoints.wait()
        if self.last_saved is None:
            return "no step had finished: nothing to save"
        where = (self.output_dir / CHECKPOINT_DIR / str(self.last_saved)).absolute()
        return f"checkpoint '{where}' is on disk; run the same command to resume"

    def _stop_if_asked(self) -> None:
        signum = self.guard.requested
        if signum is None:
            return
        where = self._save_now()
        raise TrainingInterruptedError(f"interrupted by {signal_name(signum)} at step {self.step}; "
                                  f"{where}", signum, self.step)

    def _diverged(self, what: str) -> TrainingDivergedError:
        self.checkpoints.wait()
        good = self.checkpoints.latest_step()
        where = (f"the last good checkpoint is step {good} in '{self.checkpoints.directory}'"
                 if good is not None else "no checkpoint was written before it")
        return TrainingDivergedError(
            f"training stopped at step {self.step}: {what}; {where}. Lower the learning rate or "
            "clip gradients (e.g. --gin_param 'Adam.clip_grad_norm=1.0') and run again"
        )

    # -- the end -------------------------------------------------------------------------------
    def close(self, failed: bool = False) -> None:
        """Finishes the checkpoint writes and closes the files. After a failure, a folder this
        run made is removed when no step had finished (the start failed)."""
        if self.bar is not None:
            self.bar.close()
        for c in (self.checkpoints, self.best_checkpoints):
            if c is not None:
                try:
                    c.wait()
                except Exception:
                    if not failed:  # else the failure that brought us here is the news
                        raise
                finally:
                    c.close()
        if self.writer is not None:
            self.writer.close()
        if failed and self.created and self.step == self.start_step:
            shutil.rmtree(self.output_dir, ignore_errors=True)

    def result(self) -> TrainResult:
        return TrainResult(self.step, self.losses, self.eval_history, self.weights, self.state,
                           self.opt_state, self.output_dir)


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
    mesh=None,
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
        checkpoint is also written after the last step, and at the step an interrupt
        (SIGINT, SIGTERM) stops.
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
      memory_efficient: train with ``training.memory_efficient.MemoryEfficientTrainer`` (a
        model with one reversible stack: its weights and slots in host memory, per-block
        fused updates, chunked loss); same updates as the plain step. The optimizer must act
        per weight (no ``clip_grad_norm``).
      mesh: the `jax.sharding.Mesh` to train on; None: the gin-configured one
        (``mesh.data = 2``, ``mesh.fsdp = -1``, ...; see ``parallel.mesh``), one device
        unless bound.

    Raises:
      TrainingDivergedError: the loss or gradient norm became NaN/inf; the newest checkpoint
        is the last good state.
      TrainingInterruptedError: SIGINT or SIGTERM stopped the run; the step it stopped at is saved.
      CheckpointError: the folder's checkpoint does not fit the model (nothing was changed).
    """
    run = TrainingRun(output_dir, model, inputs, eval_inputs, optimizer, lr_schedule, steps,
                      eval_frequency, eval_steps, checkpoint_frequency, keep_checkpoints,
                      keep_best, checkpoint_lowest, checkpoint_highest, log_frequency, seed,
                      progress, tensorboard, async_checkpoints, memory_efficient, mesh=mesh)
    try:
        run.run()
    except BaseException:
        run.close(failed=True)
        raise
    run.close()
    return run.result()


# ---------------------------------------------------------------------------------------------
# Reading a run back: its gin configuration and its metrics.


def train_config() -> dict:
    """``train``'s arguments as the current gin config binds them, defaults filled in."""
    params = {
        name: p.default
        for name, p in inspect.signature(train).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    params.update(gin.get_bindings("train"))
    return params


def evaluate_checkpoint(output_dir, model=None, eval_inputs=None, eval_steps=None,
                        checkpoint: str = "latest", mesh=None) -> dict:
    """Evaluates a run's checkpoint on its held-out stream; arguments left None come from the
    gin config (``train.model``, ``train.eval_inputs``, ``train.eval_steps``, ``mesh.*``).
    On a mesh of several devices the weights are read straight into their layout and each
    batch's rows split over ``data`` and ``fsdp``. Returns the metrics dict of
    :func:`evaluate` plus ``step``."""
    config = train_config() if None in (model, eval_inputs, eval_steps) else {}
    model = model if model is not None else config.get("model")
    eval_inputs = eval_inputs if eval_inputs is not None else config.get("eval_inputs")
    eval_steps = eval_steps if eval_steps is not None else config.get("eval_steps", 10)
    if model is None or model is gin.REQUIRED:
        raise ValueError("evaluate: no model (gin: train.model)")
    if eval_inputs is None:
        raise ValueError("evaluate: no held-out stream (gin: train.eval_inputs)")
    if mesh is None:
        mesh = configured_mesh()  # gin: mesh.data = 2, ...; default one device
    weights, state, meta = load_weights(output_dir, model, checkpoint, mesh=mesh)
    metrics = evaluate(make_eval_step(model(mode="eval"), mesh), weights, state, eval_inputs,
                       eval_steps)
    return {"step": int(meta["step"]), **metrics}
