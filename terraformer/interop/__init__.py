"""trax checkpoints in, without importing trax: read the files, map the weights, write a run."""

from terraformer.interop.trax_checkpoint import import_trax_checkpoint, load_trax_weights
from terraformer.interop.trax_pickle import TraxCheckpoint, TraxImportError, read_trax_checkpoint
from terraformer.interop.trax_weights import trax_to_terraformer

__all__ = [
    "TraxCheckpoint",
    "TraxImportError",
    "import_trax_checkpoint",
    "load_trax_weights",
    "read_trax_checkpoint",
    "trax_to_terraformer",
]
