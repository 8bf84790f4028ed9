"""Checkpoints: round trips of arbitrary pytrees, and interrupted writes leave the last good one."""

import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from terraformer.training.checkpoints import (
    COMMIT_FILE,
    Checkpointer,
    CheckpointError,
    NoCheckpointError,
)


def _trees(np_rng, scale=1.0):
    return {
        "weights": ({"w": jnp.asarray(scale * np_rng.normal(size=(3, 5)), jnp.float32)}, (),
                    [jnp.arange(4, dtype=jnp.int32)]),
        "rng": jnp.asarray(np_rng.integers(0, 2**31, size=2), jnp.uint32),
    }


def _assert_equal(a, b):
    import jax

    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _saved(tmp_path, np_rng, steps=(1, 2)):
    ckpt = Checkpointer(tmp_path / "ckpt", max_to_keep=None, async_save=True)
    saved = {}
    for s in steps:
        saved[s] = _trees(np_rng, scale=s)
        ckpt.save(s, saved[s], {"step": s, "batches_consumed": 3 * s})
    ckpt.wait()
    ckpt.close()
    return saved


def test_round_trip_keeps_structure_and_dtypes(tmp_path, np_rng):
    saved = _saved(tmp_path, np_rng)
    ckpt = Checkpointer(tmp_path / "ckpt")
    assert ckpt.all_steps() == [1, 2]
    trees, meta, step = ckpt.restore(_trees(np_rng))
    assert step == 2 and meta["batches_consumed"] == 6
    _assert_equal(trees, saved[2])
    trees, meta, step = ckpt.restore(_trees(np_rng), step=1)
    _assert_equal(trees, saved[1])


def test_no_checkpoint(tmp_path, np_rng):
    with pytest.raises(NoCheckpointError, match="no checkpoint"):
        Checkpointer(tmp_path / "empty").restore(_trees(np_rng))


def test_other_model_is_a_clear_error(tmp_path, np_rng):
    _saved(tmp_path, np_rng)
    other = {"weights": {"w": jnp.zeros((4, 4))}, "rng": jnp.zeros(2, jnp.uint32)}
    with pytest.raises(CheckpointError, match="different model"):
        Checkpointer(tmp_path / "ckpt").restore(other)


def test_crash_before_commit_keeps_previous(tmp_path, np_rng, monkeypatch):
    """A write that dies before its atomic rename leaves only a temporary directory."""
    from orbax.checkpoint._src.path import atomicity

    saved = _saved(tmp_path, np_rng)

    async def crash(self, *args, **kwargs):
        raise OSError("simulated crash in the middle of a checkpoint write")

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", crash)
    ckpt = Checkpointer(tmp_path / "ckpt", async_save=False)
    with pytest.raises(Exception, match="simulated crash"):
        ckpt.save(3, _trees(np_rng, scale=3), {"step": 3})
        ckpt.wait()
    monkeypatch.undo()
    leftovers = [p.name for p in (tmp_path / "ckpt").iterdir() if p.name.startswith("3")]
    assert leftovers and all("tmp" in name for name in leftovers), leftovers
    reopened = Checkpointer(tmp_path / "ckpt")
    assert reopened.latest_step() == 2
    trees, meta, step = reopened.restore(_trees(np_rng))
    assert step == 2
    _assert_equal(trees, saved[2])


def test_partial_step_directory_falls_back(tmp_path, np_rng):
    """A step directory without its commit marker (e.g. a copy cut short) is set aside."""
    saved = _saved(tmp_path, np_rng)
    root = tmp_path / "ckpt"
    shutil.copytree(root / "2", root / "3")
    (root / "3" / COMMIT_FILE).unlink()
    for f in (root / "3" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    (root / "4.orbax-checkpoint-tmp-1700000000").mkdir()
    ckpt = Checkpointer(root)
    assert ckpt.latest_step() == 2
    with pytest.warns(RuntimeWarning, match="incomplete or unreadable"):
        trees, _, step = ckpt.restore(_trees(np_rng))
    assert step == 2
    _assert_equal(trees, saved[2])
    assert not (root / "3").exists() and any(p.name.startswith("3.invalid") for p in root.iterdir())


def test_corrupt_committed_step_falls_back(tmp_path, np_rng):
    saved = _saved(tmp_path, np_rng)
    root = tmp_path / "ckpt"
    for f in (root / "2" / "state").rglob("*"):
        if f.is_file() and "manifest" in f.name:
            f.write_bytes(b"garbage")
    with pytest.warns(RuntimeWarning, match="incomplete or unreadable"):
        trees, _, step = Checkpointer(root).restore(_trees(np_rng))
    assert step == 1
    _assert_equal(trees, saved[1])
