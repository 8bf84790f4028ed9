"""The command line: train / eval / decode / plot on a tiny byte-level model, dry runs of every
gin file, and one-line errors for bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import gin
import numpy as np
import pytest

from terraformer import cli

REPO = Path(__file__).resolve().parents[1]
GIN_FILES = sorted((REPO / "gin").glob("*.gin"))

TINY_GIN = """
TransformerLM.vocab_size = 258
TransformerLM.d_model = 32
TransformerLM.d_ff = 64
TransformerLM.n_layers = 1
TransformerLM.n_heads = 2
TransformerLM.max_len = 128
TransformerLM.dropout = 0.0

tokenizer.name_or_path = 'byte'
text_lm_inputs.path = '{path}'
text_lm_inputs.seq_len = 32
text_lm_inputs.batch_size = 4
text_lm_inputs.held_out_fraction = 0.2
eval/text_lm_inputs.split = 'eval'

train.model = @TransformerLM
train.inputs = @text_lm_inputs
train.eval_inputs = @eval/text_lm_inputs
train.optimizer = @Adam
Adam.learning_rate = 0.01
train.steps = 6
train.eval_frequency = 3
train.eval_steps = 2
train.progress = False
train.tensorboard = False
"""


@pytest.fixture(autouse=True)
def _clear_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def _run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code, err, *needles):
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    rng = np.random.default_rng()
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "é"]
    text = " ".join(rng.choice(words, size=1500))
    path = tmp_path_factory.mktemp("text") / "doc.txt"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_config(text_file):
    path = text_file.parent / "tiny.gin"
    path.write_text(TINY_GIN.format(path=text_file))
    return path


@pytest.fixture(scope="module")
def trained(tiny_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    gin.clear_config()
    code = cli.main(["train", "--config", str(tiny_config), "--output_dir", str(out)])
    gin.clear_config()
    assert code == 0
    return out


def test_train_writes_run_files(trained):
    for name in ("config.gin", "metrics.jsonl", "checkpoints"):
        assert (trained / name).exists(), name
    assert sorted(p.name for p in (trained / "checkpoints").iterdir()) == ["3", "6"]


def test_eval_reads_the_saved_config(trained, capsys):
    code, out, err = _run(["eval", "--output_dir", trained], capsys)
    assert code == 0, err
    metrics = json.loads(out.strip().splitlines()[-1])
    assert metrics["step"] == 6 and np.isfinite(metrics["loss"])
    assert metrics["bits_per_token"] == pytest.approx(metrics["loss"] / np.log(2))


def test_decode_continues_a_prompt(trained, capsys, tmp_path):
    code, out, err = _run(["decode", "--output_dir", trained, "--prompt", "the cat ",
                           "--max_new_tokens", 12], capsys)
    assert code == 0, err
    assert out.endswith("\n") and len(out.strip("\n")) > 0
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("a dog ")
    code, out2, err = _run(["decode", "--output_dir", trained, "--prompt_file", prompt,
                            "--max_new_tokens", 8, "--temperature", 0.8, "--top_k", 5,
                            "--seed", 3], capsys)
    assert code == 0, err and out2


def test_plot(trained, capsys):
    code, out, err = _run(["plot", trained], capsys)
    assert code == 0, err
    png = Path(out.strip())
    assert png == trained / "metrics.png" and png.read_bytes()[:4] == b"\x89PNG"


def test_train_resumes_to_more_steps(trained, tiny_config, capsys, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    code, out, err = _run(["train", "--config", tiny_config, "--output_dir", run,
                           "--gin_param", "train.steps=8"], capsys)
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["step"] == 8


def test_dry_run_reports_memory(tiny_config, capsys, tmp_path):
    code, out, err = _run(["train", "--config", tiny_config, "--output_dir", tmp_path,
                           "--dry_run"], capsys)
    assert code == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["n_params"] > 0 and report["vocab_size"] == 258
    assert report["weights_bytes"] == 4 * report["n_params"]
    assert report["optimizer_bytes"] >= 2 * report["weights_bytes"]
    assert "parameters:" in out
    assert not any(tmp_path.iterdir())  # a dry run writes nothing


@pytest.mark.parametrize("gin_file", GIN_FILES, ids=[p.name for p in GIN_FILES])
def test_every_gin_file_builds(gin_file, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # data paths in gin files are relative to the repository root
    code, out, err = _run(["train", "--config", gin_file, "--output_dir", tmp_path, "--dry_run",
                           "--gin_param", "dry_run.estimate_activations=False"], capsys)
    if code == 2 and "does not exist" in err and str(gin_file) not in err:
        pytest.skip(f"data for {gin_file.name} is not here: {err.strip()}")
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["n_params"] > 0


# -- errors --------------------------------------------------------------------------------------


def test_missing_config(capsys, tmp_path):
    code, _, err = _run(["train", "--config", tmp_path / "nope.gin", "--output_dir", tmp_path],
                        capsys)
    _one_line_error(code, err, "nope.gin", "does not exist")


def test_unknown_binding(tiny_config, capsys, tmp_path):
    code, _, err = _run(["train", "--config", tiny_config, "--output_dir", tmp_path,
                         "--gin_param", "train.stepz=3"], capsys)
    _one_line_error(code, err, "stepz")
    code, _, err = _run(["train", "--config", tiny_config, "--output_dir", tmp_path,
                         "--gin_param", "NoSuchThing.x=3"], capsys)
    _one_line_error(code, err, "NoSuchThing")


def test_gin_syntax_error(capsys, tmp_path):
    bad = tmp_path / "bad.gin"
    bad.write_text("train.steps = 3\ntrain.eval_steps = (\n")
    code, _, err = _run(["train", "--config", bad, "--output_dir", tmp_path], capsys)
    _one_line_error(code, err, "gin")
    bad.write_text("train.steps = 3\ntrain steps 4\n")
    code, _, err = _run(["train", "--config", bad, "--output_dir", tmp_path], capsys)
    _one_line_error(code, err, "bad.gin")


def test_missing_and_empty_data_files(tiny_config, capsys, tmp_path):
    code, _, err = _run(["train", "--config", tiny_config, "--output_dir", tmp_path,
                         "--gin_param", f"text_lm_inputs.path='{tmp_path / 'gone.txt'}'"], capsys)
    _one_line_error(code, err, "gone.txt", "does not exist")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, _, err = _run(["train", "--config", tiny_config, "--output_dir", tmp_path,
                         "--gin_param", f"text_lm_inputs.path='{empty}'"], capsys)
    _one_line_error(code, err, "empty.txt", "empty")


def test_tokenizer_vocab_mismatch(tiny_config, capsys, tmp_path):
    code, _, err = _run(["train", "--config", tiny_config, "--output_dir", tmp_path, "--dry_run",
                         "--gin_param", "TransformerLM.vocab_size=100"], capsys)
    _one_line_error(code, err, "vocab_size 258", "vocab_size is 100")


def test_decode_and_eval_without_a_run(capsys, tmp_path, tiny_config):
    code, _, err = _run(["decode", "--output_dir", tmp_path / "none", "--prompt", "x"], capsys)
    _one_line_error(code, err, "does not exist")
    code, _, err = _run(["eval", "--output_dir", tmp_path], capsys)
    _one_line_error(code, err, "config.gin")
    (tmp_path / "config.gin").write_text(tiny_config.read_text())
    code, _, err = _run(["decode", "--output_dir", tmp_path, "--prompt", "x"], capsys)
    _one_line_error(code, err, "no checkpoint")


def test_missing_prompt_file(trained, capsys, tmp_path):
    code, _, err = _run(["decode", "--output_dir", trained, "--prompt_file",
                         tmp_path / "prompt.txt"], capsys)
    _one_line_error(code, err, "prompt.txt", "does not exist")


def test_bench_is_dispatched(monkeypatch):
    import terraformer.bench

    seen = []
    monkeypatch.setattr(terraformer.bench, "main", lambda argv: seen.append(argv) or 0)
    assert cli.main(["bench", "train", "--seq_len", "64"]) == 0
    assert seen == [["train", "--seq_len", "64"]]


def test_subprocess_error_has_no_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TERRAFORMER_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, "-m", "terraformer.cli", "train", "--config", str(tmp_path / "x.gin"),
         "--output_dir", str(tmp_path)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "x.gin" in lines[0], proc.stderr
