"""The mesh's axis sizes, the sharding rules by weight path, the multi-process settings: pure
functions, checked in-process on an abstract mesh (no devices needed)."""

import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec

from terraformer.checks import ArgumentError
from terraformer.parallel.distributed import distributed_settings
from terraformer.parallel.mesh import AXES, make_mesh, mesh_sizes, parse_mesh_spec
from terraformer.parallel.sharding import batch_sharding, tree_shardings, weight_spec


def _mesh(data=1, fsdp=1, model=1, sequence=1):
    return AbstractMesh((data, fsdp, model, sequence), AXES)


def test_mesh_sizes_resolve_the_rest_and_refuse_what_cannot_fit():
    assert mesh_sizes(8, data=2, fsdp=-1) == {"data": 2, "fsdp": 4, "model": 1, "sequence": 1}
    assert mesh_sizes(8, model=-1) == {"data": 1, "fsdp": 1, "model": 8, "sequence": 1}
    assert mesh_sizes(8) == {"data": 1, "fsdp": 1, "model": 1, "sequence": 1}
    with pytest.raises(ArgumentError, match="at most one axis"):
        mesh_sizes(8, data=-1, model=-1)
    with pytest.raises(ArgumentError, match="not a multiple of 3"):
        mesh_sizes(8, data=3, model=-1)
    with pytest.raises(ArgumentError, match="need 16 devices, only 8"):
        mesh_sizes(8, data=4, model=4)
    with pytest.raises(ArgumentError, match="model must be an int >= 1, got 0"):
        mesh_sizes(8, model=0)


def test_default_mesh_is_one_device():
    mesh = make_mesh()
    assert mesh.size == 1 and mesh.axis_names == AXES


def test_parse_mesh_spec():
    assert parse_mesh_spec("data=2, model=2") == {"data": 2, "model": 2}
    assert parse_mesh_spec("fsdp=-1") == {"fsdp": -1}
    assert parse_mesh_spec("") == {}
    with pytest.raises(ArgumentError, match="AXIS=SIZE"):
        parse_mesh_spec("pipeline=2")
    with pytest.raises(ArgumentError, match="data must be an int"):
        parse_mesh_spec("data=two")


@pytest.mark.parametrize("path, shape, spec", [
    # into heads: heads (last) over model, the largest other dimension over fsdp
    ("4/0/0/1/1/wq", (64, 32), PartitionSpec("fsdp", "model")),
    # stacked layers [n_layers, ...]: the layer axis stays whole
    ("5/0/0/1/w_qk", (8, 64, 32), PartitionSpec(None, "fsdp", "model")),
    ("4/0/0/1/1/wo", (32, 64), PartitionSpec("model", "fsdp")),
    # Dense: the wider side (d_ff, vocabulary) over model
    ("4/1/0/1/0/1/w", (64, 128), PartitionSpec("fsdp", "model")),
    ("4/1/0/1/0/4/w", (128, 64), PartitionSpec("model", "fsdp")),
    # a head bias: one dimension, over both
    ("4/0/0/1/1/bq", (32,), PartitionSpec(("fsdp", "model"))),
    ("6/scale", (64,), PartitionSpec("fsdp")),
    # an unnamed table (the embedding): the vocabulary over model
    ("1", (256, 64), PartitionSpec("model", "fsdp")),
    ("0/mu/1", (256, 64), PartitionSpec("model", "fsdp")),
    # Adam's slot of wq: the same name and shape, the same layout
    ("0/mu/4/0/0/1/1/wq", (64, 32), PartitionSpec("fsdp", "model")),
    # a kernel packed for decoding (rows [d_out, d_in]) and its scale
    ("4/0/0/1/1/wq/0", (32, 64), PartitionSpec("model", "fsdp")),
    ("4/0/0/1/1/wq/1", (32,), PartitionSpec(("fsdp", "model"))),
])
def test_weight_rules(path, shape, spec):
    got, reasons = weight_spec(path, shape, _mesh(fsdp=2, model=2))
    assert got == spec and reasons == []


def test_indivisible_dimensions_stay_whole_with_a_reason():
    spec, reasons = weight_spec("4/0/0/1/1/wq", (6, 9), _mesh(fsdp=4, model=2))
    assert spec == PartitionSpec(None, None)
    assert "(9) is not a multiple of model=2" in reasons[0]
    assert "fsdp=4" in reasons[1]
    # one device on each axis: everything replicated, nothing to explain
    assert weight_spec("w", (6, 9), _mesh()) == (PartitionSpec(None, None), [])


def test_tree_shardings_follow_paths_and_batch_rows_split(np_rng):
    tree = {"wq": np.zeros((8, 4)), "count": np.zeros(()), "stack": [{"w": np.zeros((4, 8))}]}
    reasons = []
    shardings = tree_shardings(tree, _mesh(data=2, model=2), reasons=reasons)
    assert shardings["wq"].spec == PartitionSpec(None, "model")
    assert shardings["stack"][0]["w"].spec == PartitionSpec(None, "model")
    assert shardings["count"].spec == PartitionSpec()
    rows = int(np_rng.integers(1, 4)) * 4
    assert batch_sharding(_mesh(data=2, fsdp=2), (rows, 16)).spec == PartitionSpec(("data",
                                                                                     "fsdp"))
    with pytest.raises(ValueError, match="multiple of data \\* fsdp = 4"):
        batch_sharding(_mesh(data=2, fsdp=2), (rows + 2, 16))


def test_distributed_settings_from_arguments_or_environment():
    assert distributed_settings(environ={}) is None
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
           "JAX_PROCESS_ID": "3"}
    assert distributed_settings(environ=env) == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
    assert distributed_settings("h:1", 2, 0, environ=env)["num_processes"] == 2
    with pytest.raises(ValueError, match="need --coordinator"):
        distributed_settings(num_processes=2, process_id=0, environ={})
    with pytest.raises(ValueError, match="needs --num_processes"):
        distributed_settings("h:1", environ={})
    with pytest.raises(ArgumentError, match="process_id must be an int <= 1"):
        distributed_settings("h:1", 2, 2, environ={})


def test_gin_binds_the_mesh():
    import gin

    from terraformer import configs  # noqa: F401 (registers every gin name)
    from terraformer.parallel.mesh import mesh

    gin.clear_config()
    try:
        gin.parse_config("mesh.fsdp = -1\nmesh.model = 1")
        m = mesh()
        assert m.shape["fsdp"] == len(m.devices.flat) and m.axis_names == AXES
        gin.parse_config("mesh.fsdp = 1000")
        with pytest.raises(ArgumentError, match="need 1000 devices"):
            mesh()
    finally:
        gin.clear_config()


def test_a_sequence_axis_splits_the_length_of_the_batch():
    mesh = _mesh(data=2, sequence=2)
    assert batch_sharding(mesh, (4, 16)).spec == PartitionSpec(("data", "fsdp"), "sequence")
    # a classifier's targets, one per sequence: rows only
    assert batch_sharding(mesh, (4,)).spec == PartitionSpec(("data", "fsdp"))
    with pytest.raises(ValueError, match="length \\(15\\) must be a multiple of sequence = 2"):
        batch_sharding(mesh, (4, 15))
