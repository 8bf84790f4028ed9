"""Reads trax 1.4.1 checkpoint files without importing trax.

Two layouts exist, both gzipped pickles of a dict:
  - `Layer.save_to_file(path)`: `{'flat_weights': [arrays], 'flat_state': [...],
    'input_signature': ShapeDtype or tuple of them}`;
  - `training.Loop.save_checkpoint('model')`: `model.pkl.gz` holds `{'step', 'flat_weights':
    <int>, 'flat_state', 'flat_eval_state', 'history', 'input_signature', ...}`, where the int
    is the gzip level of the arrays, stored beside it in `model.weights.npy.gz` as consecutive
    `np.save` records (bfloat16 arrays bit-cast to uint16).

`flat_weights` are the leaves of the model's nested weight tuples, in trax's flattening order,
empty weights left out.

The pickles name a few non-builtin classes (numpy's array rebuilders, jax's Array rebuilder,
`trax.shapes.ShapeDtype`). `RestrictedUnpickler` resolves only those, to numpy or to small local
stand-ins, and refuses every other global: a checkpoint cannot run code on load.
"""

from __future__ import annotations

import gzip
import io
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class TraxImportError(ValueError):
    """A trax checkpoint that cannot be read or does not fit the model (one-line message)."""


class ShapeDtype:
    """Stand-in for `trax.shapes.ShapeDtype`: the pickle restores its attribute dict."""

    shape: tuple = ()
    dtype: object = np.float32

    def __repr__(self) -> str:
        return f"ShapeDtype(shape={tuple(self.shape)}, dtype={np.dtype(self.dtype).name})"


def _reconstruct_jax_array(fun, args, arr_state, aval_state):
    """Stand-in for jax's Array rebuilder: the same numpy array, kept on the host."""
    del aval_state  # weak_type and sharding: not needed for a numpy copy
    value = fun(*args)
    value.__setstate__(arr_state)
    return value


_NUMPY_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]
_NUMPY_SCALAR = np.float32(0).__reduce__()[0]
_NUMPY_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]  # pickle protocol 5 arrays
_NUMPY_TYPES = {"dtype": np.dtype, "ndarray": np.ndarray}
_NUMPY_TYPES.update(
    {name: getattr(np, name) for name in (
        "bool_", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
        "float16", "float32", "float64")})

ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _NUMPY_RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _NUMPY_RECONSTRUCT,
    ("numpy.core.multiarray", "scalar"): _NUMPY_SCALAR,
    ("numpy._core.multiarray", "scalar"): _NUMPY_SCALAR,
    ("numpy.core.numeric", "_frombuffer"): _NUMPY_FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _NUMPY_FROMBUFFER,
    ("jax._src.array", "_reconstruct_array"): _reconstruct_jax_array,
    ("trax.shapes", "ShapeDtype"): ShapeDtype,
    **{("numpy", name): value for name, value in _NUMPY_TYPES.items()},
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only the globals of `ALLOWED_GLOBALS`; anything else is a TraxImportError."""

    def __init__(self, file, source: str):
        super().__init__(file)
        self._source = source

    def find_class(self, module, name):
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise TraxImportError(
                f"{self._source}: refuses to unpickle {module}.{name} (a trax checkpoint holds "
                "only arrays, numbers and shapes)") from None


def _unpickle_gzip(path: Path) -> dict:
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as e:
        raise TraxImportError(f"{path}: not a gzipped trax checkpoint ({e})") from None
    try:
        obj = RestrictedUnpickler(io.BytesIO(raw), str(path)).load()
    except TraxImportError:
        raise
    except Exception as e:  # noqa: BLE001 - any malformed pickle becomes one line
        raise TraxImportError(f"{path}: not a trax checkpoint pickle ({type(e).__name__}: {e})"
                              ) from None
    if not isinstance(obj, dict) or "flat_weights" not in obj:
        raise TraxImportError(f"{path}: not a trax checkpoint (no 'flat_weights' entry)")
    return obj


def _read_npy_records(path: Path) -> list:
    """The arrays `np.save`d one after another into a gzip file (trax's `np_to_file`)."""
    if not path.is_file():
        raise TraxImportError(f"{path}: missing; trax's Loop stores the weights beside "
                              "model.pkl.gz in this file")
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as e:
        raise TraxImportError(f"{path}: not a gzipped array file ({e})") from None
    stream, arrays = io.BytesIO(raw), []
    while stream.tell() < len(raw):
        try:
            arrays.append(np.load(stream, allow_pickle=False))
        except ValueError as e:
            raise TraxImportError(f"{path}: array {len(arrays)} cannot be read ({e})") from None
    return arrays


def _from_bits(arrays: list) -> list:
    """trax stores bfloat16 weights bit-cast to uint16; turn them into float32 values."""
    out = []
    for a in arrays:
        if a.dtype == np.uint16:
            a = (a.astype(np.uint32) << 16).view(np.float32)
        out.append(np.asarray(a))
    return out


def _signature(sig) -> tuple | None:
    """The input signature as a tuple of (shape, dtype name), or None."""
    if sig is None:
        return None
    items = sig if isinstance(sig, (tuple, list)) else (sig,)
    out = []
    for s in items:
        if not isinstance(s, ShapeDtype):
            return None
        out.append((tuple(int(d) for d in s.shape), np.dtype(s.dtype).name))
    return tuple(out)


@dataclass
class TraxCheckpoint:
    """What a trax checkpoint file holds, as numpy arrays.

    Attributes:
      weights: the model's weights, flattened in trax's order.
      input_signature: ((shape, dtype name), ...) of the model's inputs, or None.
      step: the training step (0 for `Layer.save_to_file`).
      path: the file read.
    """

    weights: list
    input_signature: tuple | None
    step: int
    path: Path
    state: list = field(default_factory=list)


def read_trax_checkpoint(path) -> TraxCheckpoint:
    """Reads a trax 1.4.1 checkpoint (`model.pkl.gz` of `training.Loop`, or a file of
    `Layer.save_to_file`). Raises TraxImportError with a one-line message when it cannot."""
    path = Path(path)
    if not path.is_file():
        raise TraxImportError(f"{path}: no such trax checkpoint file")
    d = _unpickle_gzip(path)
    flat = d["flat_weights"]
    if isinstance(flat, int):  # training.Loop: the arrays live in a separate file
        name = path.name
        stem = name[: -len(".pkl.gz")] if name.endswith(".pkl.gz") else name
        weights_path = path.with_name(stem + ".weights.npy.gz")
        if not weights_path.is_file() and (path.parent / (name + ".npy")).is_file():
            weights_path = path.parent / (name + ".npy")
        flat = _read_npy_records(weights_path)
    if not isinstance(flat, (list, tuple)) or not all(isinstance(a, np.ndarray) for a in flat):
        raise TraxImportError(f"{path}: 'flat_weights' is not a list of arrays")
    state = d.get("flat_state") or []
    return TraxCheckpoint(
        weights=_from_bits(list(flat)),
        input_signature=_signature(d.get("input_signature")),
        step=int(d.get("step", 0) or 0),
        path=path,
        state=[np.asarray(s) for s in state if isinstance(s, np.ndarray)],
    )
