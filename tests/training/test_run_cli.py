"""The training run through the real command line, in subprocesses: interrupts save the step
in flight, a rejected resume changes nothing, a failed start leaves no folder."""

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import gin
import numpy as np
import pytest

from terraformer import cli
from terraformer.training.checkpoints import COMMIT_FILE
from terraformer.training.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]

TINY_GIN = """
TransformerLM.vocab_size = 258
TransformerLM.d_model = 16
TransformerLM.d_ff = 32
TransformerLM.n_layers = 1
TransformerLM.n_heads = 1
TransformerLM.max_len = 32
TransformerLM.dropout = 0.0

tokenizer.name_or_path = 'byte'
text_lm_inputs.path = '{path}'
text_lm_inputs.seq_len = 16
text_lm_inputs.batch_size = 2

train.model = @TransformerLM
train.inputs = @text_lm_inputs
train.optimizer = @Adam
Adam.learning_rate = 0.01
train.steps = 100000
train.log_frequency = 1
train.eval_frequency = 1000
train.progress = False
train.tensorboard = False
"""
EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}
TIMEOUT = 300


@pytest.fixture(autouse=True)
def _clear_gin():
    gin.clear_config()
    yield
    gin.clear_config()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A text file, the tiny config, and a compilation cache the subprocesses share."""
    root = tmp_path_factory.mktemp("run_cli")
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far"]
    text = " ".join(np.random.default_rng(0).choice(words, size=3000))
    (root / "doc.txt").write_text(text)
    (root / "tiny.gin").write_text(TINY_GIN.format(path=root / "doc.txt"))
    (root / "jax_cache").mkdir()
    return root


def _env(workdir):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JAX_COMPILATION_CACHE_DIR=str(workdir / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    env.pop("TERRAFORMER_DEBUG", None)
    return env


def _argv(workdir, run_dir, *params):
    argv = [sys.executable, "-m", "terraformer.cli", "train", "--config",
            str(workdir / "tiny.gin"), "--output_dir", str(run_dir)]
    for p in params:
        argv += ["--gin_param", p]
    return argv


def _run(workdir, run_dir, *params):
    return subprocess.run(_argv(workdir, run_dir, *params), capture_output=True, text=True,
                          env=_env(workdir), cwd=workdir, timeout=TIMEOUT)


def _start(workdir, run_dir, *params):
    """The training command started in the background, its stderr in a file."""
    err = open(workdir / f"{run_dir.name}.stderr", "w+")  # noqa: SIM115 (closed by _finish)
    proc = subprocess.Popen(_argv(workdir, run_dir, *params), stdout=subprocess.DEVNULL,
                            stderr=err, text=True, env=_env(workdir), cwd=workdir)
    proc.stderr_file = err
    return proc


def _finish(proc) -> str:
    proc.wait(timeout=TIMEOUT)
    proc.stderr_file.seek(0)
    text = proc.stderr_file.read()
    proc.stderr_file.close()
    return text


def _logged_steps(run_dir) -> list[int]:
    try:
        return [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    except FileNotFoundError:
        return []


def _wait_until(condition, proc, what):
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (status {proc.returncode}) before {what}: "
                                 f"{_finish(proc)}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _committed(run_dir) -> list[int]:
    root = run_dir / "checkpoints"
    return sorted(int(p.name) for p in root.iterdir()
                  if p.name.isdigit() and (p / COMMIT_FILE).is_file())


def _last_loss(stdout: str) -> float:
    return json.loads(stdout.strip().splitlines()[-1])["last_loss"]


def _in_process_loss(workdir, run_dir, *params) -> float:
    """An uninterrupted run of the same command, in this process."""
    argv = _argv(workdir, run_dir, *params)[3:]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert cli.main(argv) == 0
    return _last_loss(out.getvalue())


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest()
                                       if p.is_file() else "dir")
            for p in sorted(root.rglob("*"))}


# -- interrupts ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def interrupted(workdir):
    """For SIGINT and SIGTERM: a run signalled mid-training: (folder, status, stderr)."""
    runs = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        run_dir = workdir / f"interrupted_{sig.name}"
        proc = _start(workdir, run_dir)
        _wait_until(lambda d=run_dir: len(_logged_steps(d)) >= 3, proc, "step 3")
        proc.send_signal(sig)
        runs[sig] = (run_dir, proc.wait(timeout=TIMEOUT), _finish(proc))
    return runs


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_interrupt_saves_the_step_in_flight(interrupted, sig):
    run_dir, status, err = interrupted[sig]
    assert status == EXIT_STATUS[sig], err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    match = re.fullmatch(rf"terraformer train: interrupted by {sig.name} at step (\d+); "
                         r"checkpoint '(.+)' is on disk; run the same command to resume",
                         lines[-1])
    assert match, err
    step = int(match.group(1))
    assert step >= 3 and Path(match.group(2)) == run_dir / "checkpoints" / str(step)
    # the checkpoint is at the last step trained, not at a periodic one
    assert _committed(run_dir)[-1] == step == _logged_steps(run_dir)[-1]
    assert step % 1000 != 0
    assert lines[:-1] == [f"writing the run to '{run_dir}'"], err


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_interrupted_run_resumes_to_the_same_loss(interrupted, workdir, tmp_path, sig):
    source, _, _ = interrupted[sig]
    run_dir = tmp_path / "resumed"
    shutil.copytree(source, run_dir)
    step = _committed(run_dir)[-1]
    final = f"train.steps = {step + 4}"
    proc = _run(workdir, run_dir, final)
    assert proc.returncode == 0, proc.stderr
    assert f"resuming from step {step} " in proc.stderr
    reference = _in_process_loss(workdir, tmp_path / "uninterrupted", final)
    assert _last_loss(proc.stdout) == pytest.approx(reference, rel=1e-5)
    # the resumed run recorded what it changed beside the first config
    changed = (run_dir / f"config.resumed-at-{step}.gin").read_text()
    assert final in changed and (run_dir / "config.gin").read_text() == (
        source / "config.gin").read_text()


@pytest.mark.slow
def test_kill_9_during_a_checkpoint_write_loses_only_what_was_in_flight(workdir, tmp_path):
    run_dir = tmp_path / "killed"
    proc = _start(workdir, run_dir, "train.checkpoint_frequency = 1")

    def writing():
        root = run_dir / "checkpoints"
        return (len(_logged_steps(run_dir)) >= 5 and root.is_dir()
                and any("tmp" in p.name for p in root.iterdir()))

    _wait_until(writing, proc, "a checkpoint write")
    proc.kill()
    _finish(proc)
    logged = {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}
    last = _committed(run_dir)[-1]
    # at most one write is in flight, and one step computed while it was
    assert max(logged) - last <= 2, (max(logged), last)
    resumed = _run(workdir, run_dir, f"train.steps = {max(logged) + 2}")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from step {last} " in resumed.stderr
    assert not any("tmp" in p.name for p in (run_dir / "checkpoints").iterdir())
    # the steps redone give the losses the killed run had logged for them
    again = {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}
    for step in range(last + 1, max(logged) + 1):
        assert again[step] == pytest.approx(logged[step], rel=1e-6), step


# -- starts that fail ----------------------------------------------------------------------------


def _one_line(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_rejected_resume_leaves_every_file_byte_identical(interrupted, workdir, tmp_path):
    run_dir = tmp_path / "trained"
    shutil.copytree(interrupted[signal.SIGINT][0], run_dir)
    (run_dir / "checkpoints" / "99999.orbax-checkpoint-tmp-1").mkdir()  # a write cut short
    before = _snapshot(run_dir)
    proc = _run(workdir, run_dir, "TransformerLM.d_model = 32", "train.steps = 100001")
    _one_line(proc, "shape", "different model")
    assert _snapshot(run_dir) == before


@pytest.mark.parametrize("fault", ["missing data file", "vocab mismatch"])
def test_failed_start_leaves_no_folder(workdir, tmp_path, fault):
    run_dir = tmp_path / "new" / "run"
    param, needles = {
        "missing data file": (f"text_lm_inputs.path = '{tmp_path / 'gone.txt'}'",
                              ("gone.txt", "does not exist")),
        "vocab mismatch": ("TransformerLM.vocab_size = 100", ("vocab_size 258",)),
    }[fault]
    proc = _run(workdir, run_dir, param)
    _one_line(proc, *needles)
    assert not (tmp_path / "new").exists()
