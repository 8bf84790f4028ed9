"""Beyond one device: the mesh, sharding rules by weight path, several processes."""

from terraformer.parallel.distributed import (
    distributed_settings,
    global_batch,
    initialize,
    process_rows,
    put,
)
from terraformer.parallel.mesh import AXES, make_mesh, mesh, mesh_sizes, parse_mesh_spec
from terraformer.parallel.sharding import (
    WEIGHT_RULES,
    Rule,
    batch_sharding,
    bytes_per_device,
    replicated,
    train_shardings,
    tree_shardings,
    weight_spec,
)

__all__ = [
    "AXES",
    "WEIGHT_RULES",
    "Rule",
    "batch_sharding",
    "bytes_per_device",
    "distributed_settings",
    "global_batch",
    "initialize",
    "make_mesh",
    "mesh",
    "mesh_sizes",
    "parse_mesh_spec",
    "process_rows",
    "put",
    "replicated",
    "train_shardings",
    "tree_shardings",
    "weight_spec",
]
