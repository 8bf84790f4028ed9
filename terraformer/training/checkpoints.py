"""Checkpoints with orbax: atomic writes, fall-back to the last good step, pytree-agnostic.

A checkpoint holds named pytrees (``weights``, ``opt_state``, ``model_state``, ``rng``) and a
JSON ``meta`` dict (step, batches consumed, eval metrics, ...). Pytrees are stored as their
flat list of leaves and rebuilt on restore from a *template* (a pytree of the same structure,
e.g. freshly initialised or abstract), so any layer structure (tuples, empty tuples, optax
named tuples) round-trips exactly.

Sharded arrays: an array spread over several processes is written by orbax shard by shard
(each process its own); `restore(..., shardings=...)` reads each array straight into the
target layout, which may be another mesh shape than the one that wrote it.

Atomicity: orbax writes each step into ``<step>.orbax-checkpoint-tmp-<time>/``, writes
``commit_success.txt`` there and renames the directory to ``<step>/`` only when everything is
on disk. A crash mid-write therefore leaves a temporary directory (removed when the next run
opens the directory) and the previous ``<step>/`` untouched. On restore, step directories
without ``commit_success.txt`` or that fail to load are set aside (renamed
``<step>.invalid-<time>``) with a warning, and the next older step is tried.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

__all__ = ["COMMIT_FILE", "CheckpointError", "Checkpointer", "NoCheckpointError"]

COMMIT_FILE = "commit_success.txt"
logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one that does not fit the model."""


class NoCheckpointError(CheckpointError):
    """The directory holds no (readable) checkpoint."""


def _quiet_orbax():
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:  # pragma: no cover - absl comes with orbax
        pass


def _flatten(tree) -> dict:
    def host(leaf):
        # an array spread over processes stays a jax.Array: orbax writes each process's shards
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return leaf
        return np.asarray(jax.device_get(leaf))

    leaves = jax.tree_util.tree_leaves(tree)
    return {f"{i:06d}": host(leaf) for i, leaf in enumerate(leaves)}


def _unflatten(template, flat: dict, name: str, where: str):
    leaves, treedef = jax.tree_util.tree_flatten(template)
    if len(flat) != len(leaves):
        raise CheckpointError(
            f"checkpoint {where}: '{name}' has {len(flat)} arrays but the model expects "
            f"{len(leaves)}; was it written by a different model configuration?"
        )
    restored = []
    for i, leaf in enumerate(leaves):
        value = flat[f"{i:06d}"]
        if not isinstance(value, jax.Array):
            value = np.asarray(value)
        if tuple(value.shape) != tuple(np.shape(leaf)):
            raise CheckpointError(
                f"checkpoint {where}: '{name}' array {i} has shape {tuple(value.shape)} but the "
                f"model expects {tuple(np.shape(leaf))}; was it written by a different model "
                "configuration?"
            )
        restored.append(value if value.dtype == leaf.dtype else value.astype(leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, restored)


def _targets(template, shardings, stored: dict) -> dict:
    """Abstract arrays (shape and dtype as stored, sharding as wanted) to restore ``stored``
    (the checkpoint's metadata of one tree) into, where it fits ``template``; a leaf that
    does not fit is left to `_unflatten`'s checks."""
    leaves = jax.tree_util.tree_leaves(template)
    shards = jax.tree_util.tree_leaves(
        shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    out = {}
    for key, meta in stored.items():
        i = int(key)
        if i < len(leaves) and len(shards) == len(leaves) and \
                tuple(meta.shape) == tuple(np.shape(leaves[i])):
            out[key] = jax.ShapeDtypeStruct(tuple(meta.shape), meta.dtype, sharding=shards[i])
        else:
            out[key] = None
    return out


class Checkpointer:
    """Saves and restores training checkpoints under ``directory`` with orbax.

    Args:
      directory: where step directories go (created if needed).
      max_to_keep: how many of the newest checkpoints to keep (None: all).
      async_save: write in a background thread (the arrays are copied to host first, so the
        caller may overwrite or donate them as soon as ``save`` returns).
      read_only: change nothing on disk: no directory made, no leftovers of an interrupted
        write removed, unreadable steps passed over rather than set aside, no save. A run
        checks an old checkpoint this way before it commits to its folder.
    """

    def __init__(self, directory, max_to_keep: int | None = 2, async_save: bool = True,
                 read_only: bool = False):
        _quiet_orbax()
        self.directory = Path(directory).absolute()
        self._async = async_save
        self._max_to_keep = max_to_keep
        self.read_only = read_only
        self._manager = self._open()

    def _open(self):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self._max_to_keep,
            cleanup_tmp_directories=not self.read_only,
            create=not self.read_only,
            read_only=self.read_only,
            enable_async_checkpointing=self._async,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ocp.CheckpointManager(self.directory, options=options)

    # -- what is there --------------------------------------------------------------------------
    def _committed(self, step: int) -> bool:
        return (self.directory / str(step) / COMMIT_FILE).is_file()

    def all_steps(self) -> list[int]:
        """Steps with a complete checkpoint, oldest first."""
        return sorted(s for s in self._manager.all_steps() if self._committed(s))

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def _set_aside(self, step: int, why: str) -> None:
        path = self.directory / str(step)
        target = self.directory / f"{step}.invalid-{time.strftime('%Y%m%d-%H%M%S')}"
        warnings.warn(
            f"checkpoint '{path}' is incomplete or unreadable ({why}); moved to '{target.name}' "
            "and falling back to the previous one",
            RuntimeWarning,
            stacklevel=3,
        )
        if jax.process_index() == 0:  # one process moves it; the others wait for the move
            path.rename(target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"set aside {path}")
        self._manager.close()  # its background machinery, before a new one lists the steps
        self._manager = self._open()

    def discard_incomplete(self, newer_than: int | None = None) -> None:
        """Sets aside step directories without a commit marker (a partial copy, a crash), and
        every step after ``newer_than`` when given (those a read-only restore passed over)."""
        for step in self._manager.all_steps():
            if not self._committed(step):
                self._set_aside(step, f"no {COMMIT_FILE}")
            elif newer_than is not None and step > newer_than:
                self._set_aside(step, "it could not be read")

    # -- save / restore ------------------------------------------------------------------------
    def save(self, step: int, trees: dict, meta: dict) -> None:
        """Writes ``trees`` (name -> pytree) and the JSON-able ``meta`` as step ``step``."""
        if self.read_only:
            raise CheckpointError(f"'{self.directory}' was opened read-only")
        items = {name: _flatten(tree) for name, tree in trees.items()}
        items = {name: flat for name, flat in items.items() if flat}
        meta = dict(meta, tree_names=sorted(items))
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(items), meta=ocp.args.JsonSave(meta)
        )
        self._manager.save(int(step), args=args, force=True)

    def restore(self, templates: dict, step: int | None = None,
                shardings: dict | None = None) -> tuple[dict, dict, int]:
        """Restores the newest complete checkpoint (or ``step``) into ``templates``' structures.

        ``shardings`` (name -> a pytree of Shardings like the template's) reads those trees
        as global arrays laid out so, whatever mesh wrote them; the others come back as
        numpy arrays. Returns ``(trees, meta, step)``. A step that fails to load is set aside
        with a warning and the next older one tried. Raises CheckpointError when none is usable.
        """
        self.wait()
        if not self.read_only:
            self.discard_incomplete()
        candidates = self.all_steps() if step is None else [int(step)]
        if not candidates:
            raise NoCheckpointError(f"no checkpoint in '{self.directory}'")
        for s in reversed(candidates):
            try:
                return self._restore_step(templates, s, shardings or {})
            except CheckpointError:
                raise
            except Exception as e:  # a torn or corrupted step: try an older one
                if step is not None:
                    raise CheckpointError(
                        f"checkpoint '{self.directory / str(s)}' cannot be read: {e}"
                    ) from e
                if not self.read_only:
                    self._set_aside(s, f"{type(e).__name__}: {str(e)[:200]}")
        raise NoCheckpointError(f"no readable checkpoint in '{self.directory}'")

    def _restore_step(self, templates: dict, step: int, shardings: dict):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            target = None
            if shardings:
                stored = ocp.StandardCheckpointer().metadata(
                    self.directory / str(step) / "state").item_metadata.tree
                target = {name: _targets(templates[name], shardings[name], flat)
                          for name, flat in stored.items()
                          if name in shardings and name in templates}
                if len(target) != len(stored) or any(
                        v is None for t in target.values() for v in t.values()):
                    target = None  # a leaf that does not fit: _unflatten names it
            out = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
                ),
            )
        flat, meta = out["state"] or {}, dict(out["meta"])
        where = f"'{self.directory / str(step)}'"
        trees = {}
        for name, template in templates.items():
            trees[name] = _unflatten(template, flat.get(name, {}), name, where)
        return trees, meta, step

    def read_meta(self, step: int | None = None) -> dict | None:
        """The JSON meta of the newest complete checkpoint (or ``step``), None if none."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        out = self._manager.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
        )
        return dict(out["meta"])

    def wait(self) -> None:
        """Blocks until background writes are on disk; re-raises their errors."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
