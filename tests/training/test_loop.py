"""The training loop: learning, exact resume, divergence, metrics, decoding a trained model."""

import functools
import itertools
import json

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from terraformer.data.streams import copy_task
from terraformer.decoding import generate as greedy_decode
from terraformer.models.transformer import TransformerLM
from terraformer.training import (
    Adam,
    TrainingDivergedError,
    load_weights,
    plot_metrics,
    read_metrics,
    train,
)
from terraformer.training.checkpoints import Checkpointer

VOCAB, SEQ_LEN, BATCH = 16, 16, 8
STEPS, CKPT = 24, 8
MODEL = functools.partial(TransformerLM, VOCAB, d_model=32, d_ff=64, n_layers=1, n_heads=2,
                          max_len=32, dropout=0.1)


@pytest.fixture(autouse=True)
def _clear_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def _inputs(seed, crash_at=None):
    def make():
        stream = copy_task(BATCH, SEQ_LEN, VOCAB, seed=seed)
        if crash_at is None:
            return stream
        return _crashing(stream, crash_at)

    return make


class SimulatedCrashError(Exception):
    """Stands for a crash or a kill in the middle of training."""


def _crashing(stream, crash_at):
    for i, batch in enumerate(stream):
        if i == crash_at:
            raise SimulatedCrashError("simulated interruption")
        yield batch


def _train(output_dir, inputs, steps=STEPS, **kw):
    kw.setdefault("optimizer", functools.partial(Adam, 0.01))
    return train(output_dir, model=MODEL, inputs=inputs, steps=steps, checkpoint_frequency=CKPT,
                 progress=False, **kw)


@pytest.fixture(scope="module")
def data_seed():
    return int(np.random.SeedSequence().entropy % 2**31)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, data_seed):
    """An uninterrupted run with evaluation, shared by several tests."""
    gin.clear_config()
    out = tmp_path_factory.mktemp("full")
    result = _train(out, _inputs(data_seed), eval_inputs=_inputs(data_seed + 1),
                    eval_frequency=CKPT, eval_steps=1, seed=data_seed % 1000)
    return out, result


def test_training_reduces_the_loss(full_run, data_seed):
    _, result = full_run
    assert sorted(result.losses) == list(range(1, STEPS + 1))
    first = np.mean([result.losses[s] for s in range(1, 5)])
    last = np.mean([result.losses[s] for s in range(STEPS - 3, STEPS + 1)])
    assert last < first - 0.05, (first, last, data_seed)
    assert result.eval_metrics[STEPS]["loss"] < result.eval_metrics[0]["loss"]
    m = result.eval_metrics[STEPS]
    assert m["bits_per_token"] == pytest.approx(m["loss"] / np.log(2))


def test_resume_equals_uninterrupted(full_run, tmp_path, data_seed):
    _, full = full_run
    out = tmp_path / "resumed"
    crash_at = CKPT + 3  # dies after step CKPT + 3, whose checkpoint was never written
    with pytest.raises(SimulatedCrashError):
        _train(out, _inputs(data_seed, crash_at=crash_at), eval_inputs=_inputs(data_seed + 1),
               eval_frequency=CKPT, eval_steps=1, seed=data_seed % 1000)
    assert Checkpointer(out / "checkpoints").latest_step() == CKPT
    resumed = _train(out, _inputs(data_seed), eval_inputs=_inputs(data_seed + 1),
                     eval_frequency=CKPT, eval_steps=1, seed=data_seed % 1000)
    assert sorted(resumed.losses) == list(range(CKPT + 1, STEPS + 1))
    for step, loss in resumed.losses.items():
        assert loss == pytest.approx(full.losses[step], abs=1e-6), step
    for a, b in zip(jax.tree_util.tree_leaves(resumed.weights),
                    jax.tree_util.tree_leaves(full.weights), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # The log reads as one run: each logged training step once, in order.
    steps = [r["step"] for r in read_metrics(out) if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS


def test_metrics_log_tensorboard_and_plot(full_run):
    out, _ = full_run
    records = read_metrics(out)
    train_records = [r for r in records if "loss" in r]
    eval_records = [r for r in records if "eval/loss" in r]
    assert [r["step"] for r in eval_records] == [0, 8, 16, 24]
    for key in ("loss", "accuracy", "lr", "grad_norm", "tokens_per_s"):
        assert key in train_records[-1], key
    assert "eval/bits_per_token" in eval_records[-1]
    assert any((out / "tensorboard" / "train").glob("events.out.tfevents*"))
    assert any((out / "tensorboard" / "eval").glob("events.out.tfevents*"))
    png = plot_metrics(out)
    assert png == out / "metrics.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_best_and_latest_checkpoints(full_run):
    out, result = full_run
    assert Checkpointer(out / "checkpoints").all_steps() == [16, 24]
    best = Checkpointer(out / "checkpoints_best").all_steps()
    losses = {s: m["loss"] for s, m in result.eval_metrics.items() if s > 0}
    assert best == [min(losses, key=losses.get)]
    weights, _, meta = load_weights(out, MODEL, "best")
    assert meta["step"] == best[0] and meta["vocab_size"] == VOCAB


def _poisoned(seed, bad_batch):
    """The copy task, with NaN loss weights in batch ``bad_batch`` (0-based)."""

    def make():
        for i, (x, y, w) in enumerate(copy_task(BATCH, SEQ_LEN, VOCAB, seed=seed)):
            yield x, y, (w * np.nan if i == bad_batch else w)

    return make


def test_nan_stops_with_clear_message_and_keeps_last_good(tmp_path, data_seed):
    with pytest.raises(TrainingDivergedError) as info:
        train(tmp_path, model=MODEL, inputs=_poisoned(data_seed, bad_batch=6),
              optimizer=functools.partial(Adam, 0.01), steps=STEPS, checkpoint_frequency=2,
              progress=False, tensorboard=False)
    first_line = str(info.value).splitlines()[0]
    assert first_line.startswith("training stopped at step 7: loss is nan"), first_line
    assert "the last good checkpoint is step 6 in" in first_line
    assert Checkpointer(tmp_path / "checkpoints").latest_step() == 6
    weights, _, meta = load_weights(tmp_path, MODEL)
    assert meta["step"] == 6
    assert all(bool(jnp.all(jnp.isfinite(w))) for w in jax.tree_util.tree_leaves(weights))


def test_greedy_decode_follows_the_model(full_run, np_rng):
    """Each greedy token is the argmax of the eval-mode forward pass over the sequence so far."""
    _, result = full_run
    prompt = np_rng.integers(1, VOCAB, size=5).astype(np.int32)
    new = greedy_decode(MODEL, result.weights, prompt, max_new_tokens=6)
    assert new.shape == (6,) and new.dtype == np.int32
    seq = np.concatenate([prompt, new])[None]
    model = MODEL(mode="eval")
    forward = jax.jit(lambda x, w, s: model.apply(x, w, s, None)[0])
    log_probs = forward(jnp.asarray(seq), result.weights, result.model_state)
    expected = np.argmax(np.asarray(log_probs[0]), axis=-1)[len(prompt):]
    np.testing.assert_array_equal(new, expected)
    # top_k=1 sampling is greedy; sampling stays in the vocabulary.
    same = greedy_decode(MODEL, result.weights, prompt, 6, temperature=1.0, top_k=1, seed=3)
    np.testing.assert_array_equal(same, new)
    batch = np.stack([prompt, prompt])
    sampled = greedy_decode(MODEL, result.weights, batch, 4, temperature=1.0, top_p=0.9, seed=1)
    assert sampled.shape == (2, 4) and sampled.min() >= 0 and sampled.max() < VOCAB


def test_inputs_running_out_stops_cleanly(tmp_path, data_seed):
    def short():
        return itertools.islice(copy_task(BATCH, SEQ_LEN, VOCAB, seed=data_seed), 3)

    result = train(tmp_path, model=MODEL, inputs=short, steps=10, progress=False,
                   optimizer=functools.partial(Adam, 0.01), tensorboard=False)
    assert result.step == 3
    assert Checkpointer(tmp_path / "checkpoints").latest_step() == 3


def test_vocab_mismatch_is_clear(tmp_path, data_seed):
    small = functools.partial(TransformerLM, 8, d_model=16, d_ff=16, n_layers=1, n_heads=1)
    with pytest.raises(ValueError, match="token ids in .* vocab_size is 8"):
        train(tmp_path, model=small, inputs=_inputs(data_seed), steps=1, progress=False)


def test_metrics_lines_are_json(full_run):
    out, _ = full_run
    for line in (out / "metrics.jsonl").read_text().splitlines():
        assert isinstance(json.loads(line)["step"], int)
