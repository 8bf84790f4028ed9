"""What a run folder holds, and reading a run back.

::

    DIR/config.gin                    the gin config of the run's first start
    DIR/config.resumed-at-STEP.gin    bindings a later start changed (resumed at STEP)
    DIR/checkpoints/<step>/           the newest checkpoints (orbax, atomic)
    DIR/checkpoints_best/<step>/      the best one by an eval metric
    DIR/metrics.jsonl, DIR/tensorboard/{train,eval}/

`terraformer eval` and `decode` read ``config.gin``: a resumed run may change how it trains
(steps, rates, data) but not the model, whose checkpoint must still fit.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import numpy as np

from terraformer.parallel.sharding import replicated, tree_shardings
from terraformer.shapes import ShapeDtype
from terraformer.training.batches import check_model_fn, init_signature, output_vocab
from terraformer.training.checkpoints import Checkpointer, NoCheckpointError

__all__ = [
    "BEST_DIR",
    "CHECKPOINT_DIR",
    "CONFIG_FILE",
    "changed_bindings",
    "load_weights",
    "resumed_config_name",
    "write_text_atomic",
]

CHECKPOINT_DIR = "checkpoints"
BEST_DIR = "checkpoints_best"
CONFIG_FILE = "config.gin"

_BINDING = re.compile(r"^([^\s#=][^=]*?)\s*=\s*(.*)$")


def resumed_config_name(step: int) -> str:
    """The file recording the bindings a start resumed at ``step`` changed."""
    return f"config.resumed-at-{int(step)}.gin"


def _bindings(config_text: str) -> dict[str, str]:
    """``key -> value text`` of a config as `gin.config_str` writes it (a value may go on over
    indented lines)."""
    bindings: dict[str, str] = {}
    key = None
    for line in config_text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            key = None if not line.strip() else key
            continue
        match = _BINDING.match(line) if not line[0].isspace() else None
        if match and not line.startswith((")", "]", "}")):
            key = match.group(1).strip()
            bindings[key] = match.group(2).rstrip()
        elif key is not None:
            bindings[key] += "\n" + line.rstrip()
    return bindings


def changed_bindings(old_text: str, new_text: str) -> str:
    """The bindings of ``new_text`` that ``old_text`` lacks or binds otherwise, as gin text
    (empty when none); bindings ``new_text`` dropped are listed as comments."""
    old, new = _bindings(old_text), _bindings(new_text)
    lines = [f"{key} = {value}" for key, value in new.items() if old.get(key) != value]
    lines += [f"# no longer bound: {key} = {value}".replace("\n", "\n# ")
              for key, value in old.items() if key not in new]
    return "\n".join(lines) + "\n" if lines else ""


def write_text_atomic(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file and a rename (never half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def load_weights(output_dir, model, checkpoint: str = "latest", mesh=None):
    """``(weights, model_state, meta)`` of a run's newest (or best) checkpoint; ``meta`` holds
    ``step``, ``input_signature``, ``vocab_size`` (the model's output vocabulary) and the eval
    metrics of that step.

    Args:
      output_dir: the run directory.
      model: function of ``mode`` returning the Layer the run trained.
      checkpoint: ``'latest'`` or ``'best'``.
      mesh: a `jax.sharding.Mesh` of several devices to read the weights straight into, laid
        out by `parallel.sharding.WEIGHT_RULES` (the state replicated); None or one device:
        the first device.

    Raises:
      CheckpointError: no checkpoint there, or one of another model.
    """
    check_model_fn(model, "load_weights")
    if checkpoint not in ("latest", "best"):
        raise ValueError(f"checkpoint must be 'latest' or 'best', got {checkpoint!r}")
    directory = Path(output_dir) / (CHECKPOINT_DIR if checkpoint == "latest" else BEST_DIR)
    if not directory.is_dir():
        raise NoCheckpointError(f"no checkpoint in '{directory}' (train a model there first)")
    ckpt = Checkpointer(directory, max_to_keep=None, async_save=False, read_only=True)
    try:
        meta = ckpt.read_meta()
        if meta is None:
            raise NoCheckpointError(
                f"no checkpoint in '{directory}' (train a model there first)")
        batch_sig = tuple(ShapeDtype(tuple(s), d) for s, d in meta["input_signature"])
        train_model = model(mode="train")
        x_sig = init_signature(train_model, batch_sig)
        weights, state = jax.eval_shape(
            lambda r: train_model.init_weights_and_state(x_sig, r), jax.random.PRNGKey(0))
        templates = {
            "weights": jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), weights),
            "model_state": jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), state),
        }
        # read into one device or this mesh, whatever mesh (or processes) wrote the arrays
        if mesh is not None and mesh.size > 1:
            shardings = {"weights": tree_shardings(templates["weights"], mesh),
                         "model_state": jax.tree_util.tree_map(lambda _: replicated(mesh),
                                                               templates["model_state"])}
        else:
            one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            shardings = {name: jax.tree_util.tree_map(lambda _: one, tree)
                         for name, tree in templates.items()}
        trees, meta, _ = ckpt.restore(templates, shardings=shardings)
    finally:
        ckpt.close()
    meta["vocab_size"] = output_vocab(train_model, weights, state, batch_sig)
    return jax.device_put(trees["weights"]), jax.device_put(trees["model_state"]), meta
