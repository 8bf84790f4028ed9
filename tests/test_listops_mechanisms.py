"""benchmarks/listops_mechanisms.py: its small knobs build every mechanism, and (slow) one
mechanism trains and is scored end to end."""

import importlib.util
import itertools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from terraformer.shapes import ShapeDtype

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    path = ROOT / "benchmarks" / "listops_mechanisms.py"
    spec = importlib.util.spec_from_file_location("listops_mechanisms", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_every_mechanism_builds_with_its_small_knobs():
    script = load_script()
    args = script.parse_args(["--max_len", "64", "--min_len", "10"])
    sig = ShapeDtype((2, 64), jnp.int32)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    for name in args.mechanisms:
        model = script.Classifier(attention_type=script.attention_of(name, 64), max_len=64,
                                  mode="eval", **script.MODEL)
        weights, state = jax.eval_shape(lambda rng, m=model: m.init_weights_and_state(sig, rng),
                                        key)
        out = jax.eval_shape(lambda x, w, s, m=model: m.apply(x, w, s, None)[0],
                             jax.ShapeDtypeStruct(sig.shape, sig.dtype), weights, state)
        assert out.shape == (2, 10), name


@pytest.mark.slow
def test_one_mechanism_trains_and_is_scored(tmp_path, capsys):
    script = load_script()
    out = tmp_path / "records.jsonl"
    argv = ["--mechanisms", "full", "--steps", "30", "--batch", "16", "--max_len", "64",
            "--min_len", "10", "--eval_batches", "2", "--learning_rate", "3e-3",
            "--out", str(out)]
    (record,) = script.main(argv)
    assert record["mechanism"] == "full" and record["eval_examples"] == 32
    assert 0.0 <= record["accuracy"] <= 1.0
    # 30 steps learn something (at least the skew of the labels): the eval loss falls.
    assert record["eval_loss"] < record["eval_loss_at_init"] - 0.05, record
    assert out.read_text().count("\n") == 1
    printed = capsys.readouterr().out
    assert "| full |" in printed and "(chance) | 10.0%" in printed
    # The majority share is the eval batches' own: recount it from the expressions.
    args = script.parse_args(argv)
    batches = itertools.islice(script.listops_inputs(
        split="eval", batch_size=16, max_len=64, min_len=10, seed=0, max_depth=10), 2)
    labels = np.concatenate([batch_labels for _, batch_labels, _ in batches])
    assert script.majority_share(args) == pytest.approx(
        np.bincount(labels).max() / len(labels))
