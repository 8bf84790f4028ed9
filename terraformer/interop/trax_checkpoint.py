"""`import_trax_checkpoint`: a trax 1.4.1 checkpoint in, a terraformer run directory out.

The run directory is what `terraformer train` leaves: `config.gin` (the operative gin config)
and `checkpoints/<step>/` written by `Checkpointer` with the model's `weights`, its initial
`model_state`, a fresh `opt_state` of the configured optimizer (trax's optimizer slots are not
carried over) and `rng`, and the meta `eval` / `decode` read (step, input signature).
`terraformer eval`, `decode` and a resumed `train` use it as they use a trained run.
"""

from __future__ import annotations

from pathlib import Path

import gin
import jax
import numpy as np

from terraformer import configs  # noqa: F401 (registers the gin names the configs use)
from terraformer.interop.trax_pickle import TraxImportError, read_trax_checkpoint
from terraformer.interop.trax_weights import trax_to_terraformer
from terraformer.shapes import ShapeDtype
from terraformer.training.checkpoints import Checkpointer
from terraformer.training.optimizers import Adam

CONFIG_FILE = "config.gin"
CHECKPOINT_DIR = "checkpoints"


def model_from_gin(config_files, bindings=()) -> object:
    """Parses `config_files` (and `bindings`) and returns `train.model`, a function of mode."""
    for f in config_files:
        if not Path(f).is_file():
            raise TraxImportError(f"{f}: no such gin config file")
    gin.clear_config()
    try:
        gin.parse_config_files_and_bindings([str(f) for f in config_files], list(bindings))
    except Exception as e:  # noqa: BLE001 - gin raises many kinds; report one line
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TraxImportError(f"gin config {list(map(str, config_files))}: {first}") from None
    model_fn = gin.get_bindings("train").get("model")
    if not callable(model_fn):
        raise TraxImportError(
            "the gin config does not set train.model (e.g. 'train.model = @ReformerLM')")
    return model_fn


def _input_signature(ckpt, input_shape):
    if input_shape is not None:
        return tuple(int(d) for d in input_shape), "int32"
    if ckpt.input_signature:
        return ckpt.input_signature[0]
    raise TraxImportError(f"{ckpt.path}: holds no input signature; pass input_shape "
                          "(batch, length) of the model's token inputs")


def load_trax_weights(checkpoint_path, model, input_shape=None):
    """`(weights, state, ckpt)`: `model`'s weights from a trax checkpoint and its own initial
    state (trax's state, such as LSH hash keys, has no counterpart here)."""
    ckpt = read_trax_checkpoint(checkpoint_path)
    shape, dtype = _input_signature(ckpt, input_shape)
    sig = ShapeDtype(tuple(shape), np.dtype(dtype))
    rng = jax.random.PRNGKey(0)
    try:
        template, _ = jax.eval_shape(lambda r: model.init_weights_and_state(sig, r), rng)
        state = jax.jit(lambda r: model.init_weights_and_state(sig, r)[1])(rng)
    except Exception as e:  # noqa: BLE001 - a model the signature does not fit
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TraxImportError(f"the model cannot take the checkpoint's inputs {shape}: {first}"
                              ) from None
    weights = trax_to_terraformer(model, template, ckpt.weights)
    return weights, state, ckpt


def initial_optimizer_state(weights):
    """A fresh state of the optimizer the gin config's `train` would build for `weights`."""
    bindings = gin.get_bindings("train")
    optimizer = bindings.get("optimizer", Adam)
    schedule = bindings.get("lr_schedule")
    opt = optimizer(learning_rate=schedule) if schedule is not None else optimizer()
    return opt.init(weights)


def import_trax_checkpoint(checkpoint_path, config_files, output_dir, bindings=(),
                           input_shape=None) -> Path:
    """Writes a run directory for the model of `config_files` with a trax checkpoint's weights.

    Args:
      checkpoint_path: trax's `model.pkl.gz` (of `training.Loop`, with `model.weights.npy.gz`
        beside it) or a file written by `Layer.save_to_file`.
      config_files: gin files building the same model (`train.model = @ReformerLM`, ...).
      output_dir: the run directory to create; it must not hold a checkpoint already.
      bindings: extra gin bindings.
      input_shape: (batch, length) of the token inputs, when the checkpoint has no signature.
    Returns:
      The run directory.
    Raises:
      TraxImportError: a missing or unreadable file, a config without `train.model`, or weights
        that do not fit the model (the message names the weight, expected and received shape).
    """
    model_fn = model_from_gin(config_files, bindings)
    output_dir = Path(output_dir)
    ckpt_dir = output_dir / CHECKPOINT_DIR
    if ckpt_dir.exists() and any(ckpt_dir.iterdir()):
        raise TraxImportError(f"{output_dir}: already holds checkpoints; import into a new "
                              "directory")
    model = model_fn(mode="train")
    weights, state, ckpt = load_trax_weights(checkpoint_path, model, input_shape)
    shape, dtype = _input_signature(ckpt, input_shape)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / CONFIG_FILE).write_text(gin.config_str())
    meta = {
        "step": ckpt.step, "batches_consumed": 0,
        "seed": int(gin.get_bindings("train").get("seed", 0)),
        "input_signature": [[list(shape), dtype], [list(shape), dtype],
                            [list(shape), "float32"]],
        "best_metric": None, "best_value": None, "eval": None,
        "imported_from": str(Path(checkpoint_path).absolute()),
    }
    saver = Checkpointer(ckpt_dir, max_to_keep=None, async_save=False)
    try:
        trees = {"weights": weights, "model_state": state,
                 "opt_state": initial_optimizer_state(weights),
                 "rng": jax.random.PRNGKey(int(gin.get_bindings("train").get("seed", 0)))}
        saver.save(ckpt.step, trees, meta)
        saver.wait()
    finally:
        saver.close()
    return output_dir
