"""The commands the README and the gin files' opening comments show run as written.

Each command is taken from the text itself (the README's ``bash`` blocks and inline
``terraformer train|decode|eval|plot`` spans; the ``#   terraformer ...`` lines of each gin file,
with their ``\\`` continuations) and run from the repository root as a subprocess of the real
command line, its ``/tmp/`` folders moved into the test's temporary folder. Training commands
get small step counts; the copy examples train as written and must decode the copy (slow).
Commands that read data the repository does not ship (``../shared/data``) are skipped when it is
absent.
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import gin
import pytest

from terraformer import cli

REPO = Path(__file__).resolve().parents[1]
GIN_FILES = sorted((REPO / "gin").glob("*.gin"))
COMMAND = re.compile(r"terraformer (?:train|decode|eval|plot) ")
# Configs whose one training step takes minutes and most of this machine's memory: their
# commands are only built (--dry_run), never stepped.
TOO_BIG_TO_STEP = 262144
# Configs whose full-size commands are only built: a step of ListOps at the LRA size (32 x 2,000
# tokens, 4 layers of full attention) takes minutes on 2 cores; its CPU-sized command (which
# sets MAX_LEN) trains its two steps.
BUILT_AT_FULL_SIZE = {"listops.gin"}


def _joined(lines):
    """Lines with trailing ``\\`` continuations joined into one command each."""
    out, pending = [], ""
    for line in lines:
        line = line.strip()
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        out.append(pending + line)
        pending = ""
    return out


def readme_commands() -> list[str]:
    """The README's terraformer commands, in the order they appear."""
    text = (REPO / "README.md").read_text()
    found = []
    for match in re.finditer(r"```bash\n(.*?)```|`(terraformer [^`]+)`", text, re.S):
        if match.group(1) is not None:
            for line in _joined(match.group(1).splitlines()):
                found += [part.strip() for part in line.split("&&")]
        else:
            found.append(match.group(2))
    return [c for c in found if COMMAND.match(c)]


def gin_commands(path: Path) -> list[str]:
    """The commands of a gin file's opening comment (``#   terraformer ...`` lines)."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:])
    commands = []
    pending = False
    for line in lines:
        if COMMAND.match(line.strip()) or pending:
            commands.append(line)
            pending = line.rstrip().endswith("\\")
    return [c for c in _joined(commands) if COMMAND.match(c)]


def gin_constant(path: Path, name: str) -> int:
    return int(re.search(rf"^{name} = (\d+)", path.read_text(), re.M).group(1))


def _argv(command: str, tmp: Path) -> list[str]:
    """The command's arguments, its /tmp/ folders moved under ``tmp``."""
    words = shlex.split(command)
    assert words[0] == "terraformer"
    return [str(tmp / w[len("/tmp/"):]) if w.startswith("/tmp/") else w for w in words[1:]]


def _missing_data(argv: list[str]) -> str | None:
    """The first ``../shared/data`` file the command or its config reads that is absent (a
    config's binding that a ``--gin_param`` of the command replaces is not read)."""
    params = [argv[i + 1] for i, w in enumerate(argv) if w == "--gin_param"]
    replaced = {p.split("=")[0].strip() for p in params}
    text = " ".join(argv)
    for config in [argv[i + 1] for i, w in enumerate(argv) if w == "--config"]:
        text += "\n".join(line for line in (REPO / config).read_text().splitlines()
                          if line.split("=")[0].strip() not in replaced)
    for rel in re.findall(r"\.\./shared/data/[\w.\-]+", text):
        if not (REPO / rel).is_file():
            return rel
    return None


def _run(argv: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TERRAFORMER_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "terraformer.cli", *argv], cwd=REPO,
                          capture_output=True, text=True, env=env, timeout=timeout)


def _small(argv: list[str], steps: int) -> list[str]:
    """A training command cut to ``steps`` steps with one evaluation batch."""
    if argv[0] != "train":
        return argv
    return [*argv, "--gin_param", f"train.steps = {steps}", "--gin_param",
            "train.eval_steps = 1", "--gin_param", "train.progress = False"]


def _copy_prompt(command: str):
    """(the word w of a copy prompt '0 w 0', max_new_tokens) of a decode command."""
    argv = shlex.split(command)
    prompt = argv[argv.index("--prompt") + 1].split()
    return prompt, int(argv[argv.index("--max_new_tokens") + 1])


ALL_COMMANDS = [("README.md", c) for c in readme_commands()] + [
    (p.name, c) for p in GIN_FILES for c in gin_commands(p)]


def test_commands_are_found():
    assert len(readme_commands()) >= 8
    assert all(gin_commands(p) for p in GIN_FILES), [p.name for p in GIN_FILES
                                                      if not gin_commands(p)]


@pytest.fixture(autouse=True)
def _clear_gin():
    gin.clear_config()
    yield
    gin.clear_config()


@pytest.mark.parametrize("source, command", ALL_COMMANDS,
                         ids=[f"{s}:{c[:60]}" for s, c in ALL_COMMANDS])
def test_command_parses(source, command, tmp_path):
    args = cli._parser().parse_args(_argv(command, tmp_path))
    assert callable(args.func), (source, command)


@pytest.mark.parametrize("path", [p for p in GIN_FILES if "copy_task" in p.read_text()],
                         ids=lambda p: p.name)
def test_copy_examples_prompt_the_trained_word_length(path):
    """The copy task trains words of one length: a decode example must prompt '0 w 0' with a
    word of that length, of symbols the task draws, and ask for exactly w back."""
    word_len, vocab = gin_constant(path, "SEQ_LEN") // 2 - 1, gin_constant(path, "VOCAB")
    decodes = [c for c in gin_commands(path) if c.startswith("terraformer decode")]
    if "reformer_copy" in path.name:  # the README's first decode is of this config's run
        decodes += [c for c in readme_commands() if c.startswith("terraformer decode")
                    and "--output_dir /tmp/run " in c]
        assert decodes
    for command in decodes:
        prompt, max_new_tokens = _copy_prompt(command)
        word = prompt[1:-1]
        assert prompt[0] == prompt[-1] == "0", command
        assert len(word) == word_len == max_new_tokens, command
        assert all(1 <= int(t) < vocab for t in word), command


@pytest.mark.parametrize("source, command",
                         [(s, c) for s, c in ALL_COMMANDS if c.startswith("terraformer train")],
                         ids=lambda x: x[:60] if isinstance(x, str) else x)
def test_train_commands_build(source, command, tmp_path, capsys, monkeypatch):
    """Every training command's config, gin parameters, model and data are good (a dry run)."""
    monkeypatch.chdir(REPO)
    argv = _argv(command, tmp_path)
    missing = _missing_data(argv)
    if missing:
        pytest.skip(f"{missing} is not here")
    code = cli.main([*argv, "--dry_run", "--gin_param", "dry_run.estimate_activations=False"])
    _, err = capsys.readouterr()
    assert code == 0, err


@pytest.mark.slow  # test_readme_commands_run_in_order (slow) runs these too, in full
def test_readme_first_commands_run(tmp_path):
    """The README's first training command (cut to a few steps) and its decode, as written:
    the decode prints the number of tokens it asks for."""
    train, decode = readme_commands()[:2]
    assert train.startswith("terraformer train --config gin/reformer_copy.gin")
    proc = _run(_small(_argv(train, tmp_path), 2))
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = _run(_argv(decode, tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    _, max_new_tokens = _copy_prompt(decode)
    assert len(proc.stdout.split()) == max_new_tokens


@pytest.mark.slow
def test_readme_commands_run_in_order(tmp_path):
    """Every README command in order: the first training in full, so that its decode example
    decodes the copy; other trainings cut to a few steps (the resume example as written)."""
    commands = readme_commands()
    for i, command in enumerate(commands):
        argv = _argv(command, tmp_path)
        missing = _missing_data(argv)
        if missing:
            continue
        if argv[0] == "train" and i > 0 and "train.steps" not in command:
            argv = _small(argv, 20)
        proc = _run(argv)
        assert proc.returncode == 0, (command, proc.stderr[-2000:])
        if command.startswith("terraformer decode") and "--output_dir /tmp/run " in command:
            prompt, _ = _copy_prompt(command)
            assert proc.stdout.split() == prompt[1:-1], (command, proc.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("path", GIN_FILES, ids=lambda p: p.name)
def test_gin_commands_run(path, tmp_path):
    """Each gin file's commands in order. A copy config's run that a decode example reads
    trains as written, and the decode must print the copy; other trainings take two steps (or,
    above TOO_BIG_TO_STEP tokens, are only built)."""
    text = path.read_text()
    commands = gin_commands(path)
    decoded = {shlex.split(c)[shlex.split(c).index("--output_dir") + 1] for c in commands
               if c.startswith("terraformer decode") and "copy_task" in text}
    for command in commands:
        argv = _argv(command, tmp_path)
        missing = _missing_data(argv)
        if missing:
            pytest.skip(f"{missing} is not here")
        words = shlex.split(command)
        if argv[0] == "train" and words[words.index("--output_dir") + 1] not in decoded:
            lengths = [int(n) for n in re.findall(r"SEQ_LEN = (\d+)", text + command)]
            argv = _small(argv, 2)
            if max(lengths, default=0) >= TOO_BIG_TO_STEP or (
                    path.name in BUILT_AT_FULL_SIZE and "MAX_LEN = " not in command):
                argv += ["--dry_run", "--gin_param", "dry_run.estimate_activations=False"]
        proc = _run(argv)
        assert proc.returncode == 0, (command, proc.stderr[-2000:])
        if argv[0] == "decode" and "copy_task" in text:
            prompt, _ = _copy_prompt(command)
            assert proc.stdout.split() == prompt[1:-1], (command, proc.stdout)
