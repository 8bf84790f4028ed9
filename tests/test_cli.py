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


# -- every bad input of the command line: one line on stderr, exit status 2 (subprocesses) -------


def _subprocess(argv, cwd, env_drop=()):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for name in ("TERRAFORMER_DEBUG", *env_drop):
        env.pop(name, None)
    return subprocess.run([sys.executable, "-m", "terraformer.cli", *map(str, argv)],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def _one_line_exit_2(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    return _one_line_error(proc.returncode, proc.stderr, *needles)


DECODE = ["decode", "--output_dir", "run", "--prompt", "a"]
BAD_ARGUMENTS = [
    (["bench", "train", "--seq_len", "0"], ("--seq_len", ">= 1",)),
    (["bench", "train", "--seq_len", "1e3"], ("--seq_len", "must be an int",)),
    (["bench", "train", "--n_layers", "0"], ("--n_layers",)),
    (["bench", "train", "--repeats", "-1"], ("--repeats",)),
    (["bench", "train", "--ff_chunk_size", "-5"], ("--ff_chunk_size",)),
    (["bench", "train", "--attention", "sparse"], ("--attention",)),
    (["bench", "decode", "--new_tokens", "0"], ("--new_tokens",)),
    (["bench", "decode", "--prompt_len", "1.5"], ("--prompt_len",)),
    (["bench", "decode", "--prefill_chunk", "0"], ("--prefill_chunk",)),
    (["bench", "decode", "--block_size", "0"], ("--block_size",)),
    (["bench", "decode", "--new_tokens", "8"], ("--block_size", "<= 8, got 16")),
    (["bench", "decode", "--dtype", "int4"], ("--dtype",)),
    (["bench", "nonsense"], ("nonsense",)),
    ([*DECODE, "--max_new_tokens", "0"], ("--max_new_tokens",)),
    ([*DECODE, "--temperature", "-1"], ("--temperature",)),
    ([*DECODE, "--temperature", "nan"], ("--temperature",)),
    ([*DECODE, "--top_k", "0"], ("--top_k",)),
    ([*DECODE, "--top_p", "1.5"], ("--top_p",)),
    ([*DECODE, "--seed", "x"], ("--seed",)),
    (["decode", "--output_dir", "run"], ("--prompt",)),
    (["eval", "--output_dir", "run", "--checkpoint", "newest"], ("--checkpoint",)),
    (["train", "--output_dir", "run"], ("--config",)),
]


@pytest.mark.parametrize("argv, needles", BAD_ARGUMENTS,
                         ids=[" ".join(a[2:] if a[0] != "bench" else a[:4])
                              for a, _ in BAD_ARGUMENTS])
def test_bad_argument_is_one_line_and_status_2(argv, needles, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    out, err = capsys.readouterr()
    _one_line_error(info.value.code, err, *needles)
    assert out == ""


IN_SUBPROCESS = (["bench", "train", "--seq_len", "0"], ["bench", "decode", "--new_tokens", "8"])


@pytest.mark.parametrize("argv, needles", [case for case in BAD_ARGUMENTS
                                           if case[0][:4] in IN_SUBPROCESS or "--top_p" in case[0]])
def test_bad_argument_in_a_subprocess(argv, needles, tmp_path):
    """The same, through ``python -m terraformer.cli`` (the issue's ``bench train --seq_len 0``
    ended in a ``math domain error`` traceback)."""
    _one_line_exit_2(_subprocess(argv, tmp_path), *needles)


def test_bench_workload_the_library_refuses_is_one_line(tmp_path):
    # 100 positions do not fit the workload's axial grid: the model refuses when it is built.
    proc = _subprocess(["bench", "train", "--seq_len", 100, "--n_layers", 1, "--repeats", 1],
                       tmp_path)
    _one_line_exit_2(proc, "terraformer bench", "100")


@pytest.mark.parametrize("binding, needles", [
    ("text_lm_inputs.path='{tmp}/gone.txt'", ("gone.txt", "does not exist")),
    ("text_lm_inputs.path='{tmp}/empty.txt'", ("empty.txt", "empty")),
    ("TransformerLM.vocab_size=100", ("vocab_size 258", "vocab_size is 100")),
    ("TransformerLM.n_heads=3", ("n_heads",)),
])
def test_failed_start_is_one_line(binding, needles, tiny_config, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    proc = _subprocess(["train", "--config", tiny_config, "--output_dir", tmp_path / "out",
                        "--gin_param", binding.format(tmp=tmp_path)], tmp_path)
    _one_line_exit_2(proc, *needles)


def test_bad_sentencepiece_model_is_one_line_without_tensorflow_logging(tiny_config, tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"\x00\x01 not a sentencepiece model \xff" * 8)
    proc = _subprocess(["train", "--config", tiny_config, "--output_dir", tmp_path / "out",
                        "--dry_run", "--gin_param", f"tokenizer.name_or_path='{bad}'"],
                       tmp_path, env_drop=("TF_CPP_MIN_LOG_LEVEL",))
    line = _one_line_exit_2(proc, "bad.model")
    assert "cuInit" not in proc.stderr and "oneDNN" not in proc.stderr, line


def test_rejected_resume_is_one_line(trained, tiny_config, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    proc = _subprocess(["train", "--config", tiny_config, "--output_dir", run,
                        "--gin_param", "TransformerLM.d_model=64"], tmp_path)
    _one_line_exit_2(proc)


# -- the CPU runtime settings: applied by the program, not by importing the library -------------


IMPORT_EVERYTHING = """
import ctypes, os, sys
calls = []
class NoLibc:
    def __init__(self, *a, **k):
        calls.append(a)
        raise OSError("libc refused by the test")
ctypes.CDLL = NoLibc
import terraformer, terraformer.configs, terraformer.cli, terraformer.bench  # noqa
import terraformer.data, terraformer.decoding, terraformer.training.loop  # noqa
print(repr(os.environ.get("XLA_FLAGS")), len(calls))
"""


def test_importing_terraformer_changes_nothing(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), XLA_FLAGS="--xla_dump_to=/nonexistent")
    env.pop("TERRAFORMER_CPU_TUNING", None)
    proc = subprocess.run([sys.executable, "-c", IMPORT_EVERYTHING], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["'--xla_dump_to=/nonexistent'", "0"]


def test_the_command_line_tunes_the_runtime(tmp_path):
    script = ("import os\nfrom terraformer import cli\n"
              "code = cli.main(['plot', 'no_such_run'])\n"
              "print(code, os.environ.get('XLA_FLAGS'))\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)
    env.pop("TERRAFORMER_CPU_TUNING", None)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    code, flags = proc.stdout.split(maxsplit=1)
    assert code == "2"
    assert "--xla_cpu_experimental_ynn_fusion_type=" in flags
    assert "--xla_cpu_copy_insertion_use_region_analysis=true" in flags
    assert "--xla_cpu_collective_call_terminate_timeout_seconds=3600" in flags
