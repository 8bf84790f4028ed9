"""Training, checkpoints and decoding on a mesh of simulated CPU devices give what one device
gives. Each check runs `mesh_checks.py` in a subprocess started with
XLA_FLAGS=--xla_force_host_platform_device_count=N (the device count is fixed when JAX starts).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TIMEOUT = 900
TOL = 1e-5


def _env(n_devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={n_devices}").strip()
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def _check(n_devices: int, *args) -> dict:
    out = subprocess.run([sys.executable, str(HERE / "mesh_checks.py"), *map(str, args)],
                         env=_env(n_devices), capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.abs(b)))


def test_data_and_model_parallel_steps_match_one_device(seed):
    """data=2 x model=2: the losses of one device, heads and d_ff split over model, Adam's
    slots laid out as their weights, the batch split over data."""
    r = _check(4, "train", seed, "transformer", "data=2,model=2", 2, 1)
    got = r["data=2,model=2"]
    assert got["n_devices"] == 4
    assert _rel(got["losses"], r["one_device"]) < TOL
    assert "P(None, 'model')" in got["weight_specs"]  # into heads, into d_ff
    assert "P('model', None)" in got["weight_specs"]  # out of heads, out of d_ff
    assert got["mu_follows_weights"]
    assert max(got["bytes"]) < r["bytes_one"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["transformer", "reformer"])
def test_every_mesh_matches_one_device_and_shards_the_weights(seed, kind):
    meshes = ["data=4", "data=2,model=2", "fsdp=4", "fsdp=2,model=2"]
    r = _check(4, "train", seed, kind, ";".join(meshes))
    for mesh in meshes:
        got = r[mesh]
        assert _rel(got["losses"], r["one_device"]) < TOL, mesh
        assert got["mu_follows_weights"], mesh
    # data parallel keeps a whole copy on every device ...
    assert r["data=4"]["bytes"] == [r["bytes_one"]] * 4
    # ... fully sharded data parallel (with or without model) a quarter, slots as well
    for mesh in ("fsdp=4", "fsdp=2,model=2"):
        assert max(r[mesh]["bytes"]) <= 1.1 * r["bytes_one"] / 4, mesh
        assert max(r[mesh]["slot_bytes"]) <= 1.1 * r["slot_bytes_one"] / 4, mesh
        assert all("fsdp" in spec for spec in r[mesh]["weight_specs"]), mesh


@pytest.mark.slow
def test_checkpoint_moves_between_mesh_shapes(seed, tmp_path):
    """Saved on 4 devices (fsdp=4), resumed on 1 and on 2 (model=2); saved on 2 (data=2),
    resumed on 4 (fsdp=2, model=2): every resumed step has the loss of a run that never
    stopped, on one device."""
    whole = _check(1, "run_dir", seed, "transformer", "", tmp_path / "whole", 4)["losses"]
    first = _check(4, "run_dir", seed, "transformer", "fsdp=4", tmp_path / "a", 2)
    assert "P('fsdp', None)" in first["weight_specs"]
    for n, mesh, directory in ((1, "", "b"), (2, "model=2", "c")):
        shutil.copytree(tmp_path / "a" / "checkpoints", tmp_path / directory / "checkpoints")
        resumed = _check(n, "run_dir", seed, "transformer", mesh, tmp_path / directory, 3)
        assert resumed["start_step"] == 2
        assert _rel([resumed["losses"]["3"]], [whole["3"]]) < TOL, mesh
    _check(2, "run_dir", seed, "transformer", "data=2", tmp_path / "d", 2)
    back = _check(4, "run_dir", seed, "transformer", "fsdp=2,model=2", tmp_path / "d", 4)
    assert back["start_step"] == 2
    assert _rel([back["losses"]["3"], back["losses"]["4"]], [whole["3"], whole["4"]]) < TOL
    assert any("('fsdp', 'model')" in spec or "'model'" in spec for spec in back["weight_specs"])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["transformer", "reformer"])
def test_decoding_with_weights_over_model_gives_the_tokens_of_one_device(seed, kind):
    r = _check(4, "decode", seed, kind, "model=4")
    assert r["mesh"] == r["one"]
    assert any("model" in spec for spec in r["weight_specs"])


TWO_PROCESS_GIN = """
TransformerLM.vocab_size = 32
TransformerLM.d_model = 16
TransformerLM.d_ff = 32
TransformerLM.n_layers = 1
TransformerLM.n_heads = 2
TransformerLM.max_len = 16
TransformerLM.dropout = 0.0
copy_task.batch_size = 4
copy_task.seq_len = 16
copy_task.vocab_size = 32
copy_task.seed = {seed}
train.model = @TransformerLM
train.inputs = @copy_task
train.optimizer = @Adam
Adam.learning_rate = 0.01
train.steps = 2
train.seed = {seed}
train.progress = False
train.tensorboard = False
train.async_checkpoints = False
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_together(seed, tmp_path):
    """Two `terraformer train` processes (2 CPU devices each) joined by
    jax.distributed on loopback, on a data=2 x fsdp=2 mesh, report the loss one process
    reports alone."""
    config = tmp_path / "tiny.gin"
    config.write_text(TWO_PROCESS_GIN.format(seed=seed % 1000))
    cmd = [sys.executable, "-m", "terraformer.cli", "train", "--config", str(config)]
    alone = subprocess.run(cmd + ["--output_dir", str(tmp_path / "alone")], env=_env(1),
                           capture_output=True, text=True, timeout=TIMEOUT)
    assert alone.returncode == 0, alone.stderr[-3000:]
    port = _free_port()
    procs = [subprocess.Popen(
        cmd + ["--output_dir", str(tmp_path / "together"), "--gin_param", "mesh.data = 2",
               "--gin_param", "mesh.fsdp = 2", "--coordinator", f"127.0.0.1:{port}",
               "--num_processes", "2", "--process_id", str(i)],
        env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    outs = [p.communicate(timeout=TIMEOUT) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    losses = [json.loads(out.strip().splitlines()[-1])["last_loss"] for out, _ in outs]
    reference = json.loads(alone.stdout.strip().splitlines()[-1])["last_loss"]
    assert losses[0] == losses[1]
    assert _rel([losses[0]], [reference]) < TOL
    assert (tmp_path / "together" / "checkpoints" / "2" / "commit_success.txt").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("mesh, causal", [("sequence=4", 1), ("data=2,sequence=2", 0)])
def test_ring_attention_equals_full_attention_in_value_and_gradient(seed, mesh, causal):
    r = _check(4, "ring", seed, mesh, causal)
    assert r["value"] < 1e-5 * max(1.0, r["scale"])
    assert max(r["grads"]) < 1e-4
