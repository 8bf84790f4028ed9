"""The training run in this process: interrupts (one and two), failed starts, the recorded
config of a resumed run, the progress bar's ETA."""

import functools
import signal

import gin
import pytest

from terraformer.data.streams import copy_task
from terraformer.models.transformer import TransformerLM
from terraformer.training import Adam, TrainingInterruptedError, train
from terraformer.training.checkpoints import Checkpointer
from terraformer.training.interrupts import InterruptGuard
from terraformer.training.loop import progress_eta
from terraformer.training.run_dir import changed_bindings

VOCAB, SEQ_LEN, BATCH = 16, 16, 4
MODEL = functools.partial(TransformerLM, VOCAB, d_model=16, d_ff=32, n_layers=1, n_heads=1,
                          max_len=32, dropout=0.0)


@pytest.fixture(autouse=True)
def _clear_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def _inputs(seed, signals_at=None, fail_at=None):
    """The copy task; the training stream (every call after the first, which only probes the
    shapes) raises ``signals_at[i]`` signals before batch ``i``, or fails at batch ``fail_at``.
    """
    calls = []

    def make():
        calls.append(1)
        probing = len(calls) == 1
        for i, batch in enumerate(copy_task(BATCH, SEQ_LEN, VOCAB, seed=seed)):
            if not probing:
                for _ in range((signals_at or {}).get(i, 0)):
                    signal.raise_signal(signal.SIGINT)
                if i == fail_at:
                    raise OSError("the disk went away")
            yield batch

    return make


def _train(out, inputs, steps=20, **kw):
    return train(out, model=MODEL, inputs=inputs, steps=steps, checkpoint_frequency=10,
                 optimizer=functools.partial(Adam, 0.01), progress=False, tensorboard=False,
                 **kw)


def test_guard_defers_the_first_signal_and_stops_on_the_second():
    before = signal.getsignal(signal.SIGINT)
    with InterruptGuard() as guard:
        signal.raise_signal(signal.SIGTERM)
        assert guard.requested == signal.SIGTERM and not guard.aborted
        with pytest.raises(KeyboardInterrupt):
            with guard.deferred():
                signal.raise_signal(signal.SIGINT)
                reached_end_of_block = True
        assert reached_end_of_block and guard.aborted
    assert signal.getsignal(signal.SIGINT) is before


def test_guard_leaves_an_ignored_signal_ignored():
    before = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with InterruptGuard() as guard:
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
            signal.raise_signal(signal.SIGTERM)
            assert guard.requested is None
    finally:
        signal.signal(signal.SIGTERM, before)


def test_interrupt_saves_the_step_in_flight(tmp_path, seed):
    with pytest.raises(TrainingInterruptedError) as info:
        _train(tmp_path, _inputs(seed, signals_at={3: 1}))
    # the signal came while batch 3 (step 4) was being read: step 4 ran, then the run stopped
    assert info.value.step == 4 and info.value.exit_status == 130
    assert str(info.value).startswith("interrupted by SIGINT at step 4; checkpoint '")
    assert Checkpointer(tmp_path / "checkpoints").latest_step() == 4
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_second_interrupt_stops_at_once_and_keeps_the_last_finished_step(tmp_path, seed):
    with pytest.raises(TrainingInterruptedError) as info:
        _train(tmp_path, _inputs(seed, signals_at={5: 2}))
    # batch 5 was never used: step 6 did not run; step 5, the last finished, was saved
    assert info.value.step == 5
    assert str(info.value).startswith("stopped at once by a second SIGINT at step 5; checkpoint")
    assert Checkpointer(tmp_path / "checkpoints").latest_step() == 5
    resumed = _train(tmp_path, _inputs(seed), steps=7)
    assert sorted(resumed.losses) == [6, 7]


def test_a_new_folder_whose_start_failed_is_removed(tmp_path, seed):
    out = tmp_path / "new"
    with pytest.raises(OSError, match="disk went away"):
        _train(out, _inputs(seed, fail_at=0))
    assert not out.exists()
    # an existing folder is left where it was, and a run that trained is kept
    out.mkdir()
    with pytest.raises(OSError):
        _train(out, _inputs(seed, fail_at=0))
    assert out.is_dir()
    with pytest.raises(OSError):
        _train(tmp_path / "trained", _inputs(seed, fail_at=12))
    assert Checkpointer(tmp_path / "trained" / "checkpoints").latest_step() == 10


def test_resumed_run_keeps_config_and_records_its_changes(tmp_path, seed):
    gin.parse_config("Adam.b1 = 0.8\nAdam.eps = 1e-6")
    _train(tmp_path, _inputs(seed), steps=10)
    first = (tmp_path / "config.gin").read_text()
    assert "Adam.b1 = 0.8" in first
    gin.clear_config()
    gin.parse_config("Adam.b1 = 0.85\nAdam.b2 = 0.99")
    result = _train(tmp_path, _inputs(seed), steps=12)
    assert sorted(result.losses) == [11, 12]
    assert (tmp_path / "config.gin").read_text() == first
    changes = (tmp_path / "config.resumed-at-10.gin").read_text()
    assert "Adam.b1 = 0.85" in changes and "Adam.b2 = 0.99" in changes
    assert "# no longer bound: Adam.eps = 1e-06" in changes


def test_changed_bindings_reads_values_over_several_lines():
    old = "# Parameters for f:\n# ===\nf.a = 1\nf.b = [1,\n    2]\nf.c = 'x'\n"
    new = "f.a = 1\nf.b = [1,\n    3]\nf.d = @g\n"
    assert changed_bindings(old, new) == (
        "f.b = [1,\n    3]\nf.d = @g\n# no longer bound: f.c = 'x'\n")
    assert changed_bindings(old, old) == ""


def test_no_eta_until_a_step_is_timed_after_compiling():
    assert progress_eta(0, 0.0, 500) == "-"
    assert progress_eta(4, 2.0, 120) == "01:00"


def test_resume_passes_over_an_unreadable_step_and_sets_it_aside(tmp_path, seed):
    _train(tmp_path, _inputs(seed), steps=20)
    root = tmp_path / "checkpoints"
    for f in (root / "20" / "state").rglob("*"):
        if f.is_file() and "manifest" in f.name:
            f.write_bytes(b"garbage")
    with pytest.warns(RuntimeWarning, match="incomplete or unreadable"):
        result = _train(tmp_path, _inputs(seed), steps=21)
    assert sorted(result.losses) == list(range(11, 22))
    assert any(p.name.startswith("20.invalid") for p in root.iterdir())
    assert Checkpointer(root).latest_step() == 21
