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


EVAL_GIN = TWO_PROCESS_GIN + """
train.eval_inputs = @eval/copy_task
eval/copy_task.seed = {eval_seed}
train.eval_steps = 2
"""


@pytest.mark.slow
def test_eval_on_a_mesh_gives_the_metrics_of_one_device(seed, tmp_path):
    """`terraformer eval` of a run trained on one device, on 4 devices with the weights over
    fsdp and model and the batch rows over fsdp: the metrics of one device."""
    config = tmp_path / "tiny.gin"
    config.write_text(EVAL_GIN.format(seed=seed % 1000, eval_seed=seed % 1000 + 1))
    run = tmp_path / "run"
    cli = [sys.executable, "-m", "terraformer.cli"]
    trained = subprocess.run(cli + ["train", "--config", str(config), "--output_dir", str(run)],
                             env=_env(1), capture_output=True, text=True, timeout=TIMEOUT)
    assert trained.returncode == 0, trained.stderr[-3000:]
    metrics = {}
    for n, params in ((1, []), (4, ["mesh.fsdp = 2", "mesh.model = 2"])):
        cmd = cli + ["eval", "--output_dir", str(run)]
        for param in params:
            cmd += ["--gin_param", param]
        out = subprocess.run(cmd, env=_env(n), capture_output=True, text=True, timeout=TIMEOUT)
        assert out.returncode == 0, out.stderr[-3000:]
        metrics[n] = json.loads(out.stdout.strip().splitlines()[-1])
    assert metrics[4]["step"] == metrics[1]["step"] == 2
    for key in ("loss", "accuracy", "bits_per_token"):
        assert abs(metrics[4][key] - metrics[1][key]) <= TOL * max(1.0, metrics[1][key]), key


@pytest.mark.slow
@pytest.mark.parametrize("mesh, causal", [("sequence=4", 1), ("data=2,sequence=2", 0)])
def test_ring_attention_equals_full_attention_in_value_and_gradient(seed, mesh, causal):
    r = _check(4, "ring", seed, mesh, causal)
    assert r["value"] < 1e-5 * max(1.0, r["scale"])
    assert max(r["grads"]) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("mesh, causal", [("sequence=4", 1), ("data=2,sequence=2", 0)])
def test_ring_attention_layer_equals_full_attention(seed, mesh, causal):
    """attention_type='ring' on a mesh with a sequence axis: SelfAttention's full attention
    (same weights, one device) in value and in the gradients of input and weights, the
    output left split over the sequence, keys and values passed round by collective permutes."""
    r = _check(4, "ring_layer", seed, mesh, causal)
    assert r["value"] < 1e-5 * max(1.0, r["scale"])
    assert max(r["grads"]) < 1e-4
    assert "sequence" in r["out_spec"] and r["ppermute"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["transformer:ring", "reformer:ring"])
def test_one_document_over_the_sequence_axis_trains_as_on_one_device(seed, kind):
    """A model with ring attention, its batch's length split over sequence=4 (and over
    data=2 x sequence=2): the losses of one device."""
    meshes = ["sequence=4", "data=2,sequence=2"]
    r = _check(4, "train", seed, kind, ";".join(meshes))
    for mesh in meshes:
        assert _rel(r[mesh]["losses"], r["one_device"]) < TOL, mesh


@pytest.mark.slow
def test_memory_efficient_trainer_on_a_mesh_matches_one_device(seed):
    """The memory-efficient trainer on fsdp=4 and data=2 x model=2: the losses of the
    trainer on one device; the stack's weights and slots in host memory, sharded as the
    plain step shards them, each slot as its weight; fsdp keeps a quarter per device."""
    meshes = ["fsdp=4", "data=2,model=2"]
    r = _check(4, "train", seed, "reformer", ";".join(meshes), 3, 2, 1)
    for mesh in meshes:
        got, stack = r[mesh], r[mesh + ":stack"]
        assert _rel(got["losses"], r["one_device"]) < TOL, mesh
        assert stack["kinds"] == stack["slot_kinds"] == ["pinned_host"], mesh
        assert stack["outer_kinds"] == ["device"], mesh
        assert stack["mu_specs"] == stack["weight_specs"], mesh
    assert all("fsdp" in spec for spec in r["fsdp=4"]["weight_specs"])
    assert any("model" in spec for spec in r["data=2,model=2:stack"]["weight_specs"])
    assert max(r["fsdp=4"]["bytes"]) <= 1.1 * r["bytes_one"] / 4


def _assert_sequence_parallel(record: dict):
    for name, got in record.items():
        if name == "dropout":
            assert got["finite"] and got["changed"] > 1e-3
            continue
        assert got["value"] < 1e-5 * max(1.0, got["scale"]), name
        assert max(got["grads"]) < 1e-5, name  # relative to the largest gradient entry
        assert "sequence" in got["out_spec"] and got["ppermute"], name


def test_local_attention_over_the_sequence_axis_equals_one_device(seed):
    """Chunked local attention (non-causal, two chunks back, one ahead: a whole shard and the
    next one's first chunk) over sequence=4: one device's layer in value and in the gradients
    of input and weights, only neighbours' chunks passed by collective permutes."""
    _assert_sequence_parallel(_check(4, "sequence_layers", seed, "sequence=4",
                                     "local_both_ways"))


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["sequence=4", "data=2,sequence=2"])
def test_local_and_blockwise_attention_over_the_sequence_axis_equal_one_device(seed, mesh):
    """Local (halo exchange) and blockwise (ring) attention, causal and not, with padding,
    and attention dropout: one device's layer in value and gradient."""
    _assert_sequence_parallel(_check(4, "sequence_layers", seed, mesh))


@pytest.mark.slow
def test_a_device_a_minute_late_at_a_collective_does_not_abort_the_process(seed):
    """Simulated devices share the cores: one may reach a collective 75 s after the others
    (XLA:CPU's default aborts after 20 + 40 s); with `tune_cpu_runtime` the step completes."""
    r = _check(4, "lagging_device", seed, 75)
    assert r["sum"] == r["expected"]
