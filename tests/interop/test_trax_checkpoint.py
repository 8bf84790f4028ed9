"""Reading trax 1.4.1 checkpoint files without trax, and importing them as a terraformer run."""

import contextlib
import gzip
import io
import pickle
import shutil

import jax
import numpy as np
import pytest

from terraformer import layers as tl
from terraformer.interop import (
    TraxImportError,
    import_trax_checkpoint,
    load_trax_weights,
    read_trax_checkpoint,
)
from terraformer.interop.trax_checkpoint import model_from_gin
from terraformer.training.checkpoints import Checkpointer

ATOL = 1e-5


@pytest.fixture
def ckpt_dir(fixtures_dir):
    return fixtures_dir / "checkpoints"


def outputs(ckpt_dir, name):
    with np.load(ckpt_dir / f"{name}_outputs.npz") as z:
        return {k: z[k] for k in z.files}


def restore_run(run_dir, model):
    """The weights and state of an imported run, read back with the Checkpointer."""
    ckpt = Checkpointer(run_dir / "checkpoints", max_to_keep=None, async_save=False)
    try:
        meta = ckpt.read_meta()
        sig = tl.ShapeDtype(tuple(meta["input_signature"][0][0]), np.int32)
        w, s = jax.eval_shape(lambda r: model.init_weights_and_state(sig, r),
                              jax.random.PRNGKey(0))
        zeros = lambda t: jax.tree_util.tree_map(  # noqa: E731
            lambda a: np.zeros(a.shape, a.dtype), t)
        trees, meta, step = ckpt.restore({"weights": zeros(w), "model_state": zeros(s)})
    finally:
        ckpt.close()
    return trees["weights"], trees["model_state"], meta, step


def test_reads_both_trax_file_layouts(ckpt_dir):
    loop = read_trax_checkpoint(ckpt_dir / "reformer_loop" / "model.pkl.gz")
    saved = read_trax_checkpoint(ckpt_dir / "reformer_saved.pkl.gz")
    assert loop.step == 2 and saved.step == 0
    assert len(loop.weights) == len(saved.weights) == 31
    assert loop.input_signature == saved.input_signature == (((2, 16), "int32"),)
    assert [a.shape for a in loop.weights] == [a.shape for a in saved.weights]
    assert all(a.dtype == np.float32 for a in loop.weights)


@pytest.mark.parametrize("name,path", [
    ("reformer_loop", "reformer_loop/model.pkl.gz"),
    ("reformer_saved", "reformer_saved.pkl.gz"),
])
def test_import_then_eval_gives_trax_outputs(name, path, ckpt_dir, tmp_path):
    run = import_trax_checkpoint(ckpt_dir / path, [ckpt_dir / "reformer_lm.gin"], tmp_path / "run")
    assert (run / "config.gin").is_file()
    model_fn = model_from_gin([run / "config.gin"])
    model = model_fn(mode="eval")
    w, s, meta, step = restore_run(run, model)
    assert step == meta["step"] == (2 if name == "reformer_loop" else 0)
    ref = outputs(ckpt_dir, name)
    y, _ = model.apply(ref["tokens"], w, s, None)
    np.testing.assert_allclose(np.asarray(y), jax.nn.log_softmax(ref["logits"]), atol=ATOL)


@pytest.mark.slow  # the import-trax + decode command line test checks the same tokens
def test_imported_weights_decode_trax_greedy_tokens(ckpt_dir):
    ref = outputs(ckpt_dir, "reformer_saved")
    model_fn = model_from_gin([ckpt_dir / "reformer_lm.gin"])
    weights, _, _ = load_trax_weights(ckpt_dir / "reformer_saved.pkl.gz", model_fn(mode="eval"))
    model = model_fn(mode="predict")
    _, state = model.init(tl.signature(np.zeros((1, 1), np.int32)))
    y = None
    for t in np.concatenate([[0], ref["prompt"]]):
        y, state = model.apply(np.array([[t]], np.int32), weights, state, None)
    new = []
    for _ in range(len(ref["greedy_eval"])):
        new.append(int(np.argmax(np.asarray(y)[0, -1])))
        y, state = model.apply(np.array([[new[-1]]], np.int32), weights, state, None)
    np.testing.assert_array_equal(new, ref["greedy_eval"])


def test_import_then_cli_decode_gives_trax_greedy_tokens(ckpt_dir, tmp_path):
    ref = outputs(ckpt_dir, "reformer_saved")
    run = cli_import(ckpt_dir, "reformer_saved", "reformer_lm.gin", tmp_path / "run")
    tokens = cli_decode(run, ref["prompt"], len(ref["greedy_eval"]))
    np.testing.assert_array_equal(tokens, ref["greedy_eval"])


def cli_import(ckpt_dir, name: str, config: str, run):
    """`terraformer import-trax` of `<name>.pkl.gz` with `config` into `run`; returns `run`."""
    from terraformer import cli

    with contextlib.redirect_stdout(io.StringIO()):
        rc = cli.main(["import-trax", "--checkpoint", str(ckpt_dir / f"{name}.pkl.gz"),
                       "--config", str(ckpt_dir / config), "--output_dir", str(run)])
    assert rc == 0
    return run


def cli_decode(run, prompt, n_new: int) -> list[int]:
    """The tokens `terraformer decode` prints for `prompt` from the run directory `run`."""
    from terraformer import cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli.main(["decode", "--output_dir", str(run), "--prompt",
                       " ".join(map(str, prompt)), "--max_new_tokens", str(n_new)])
    assert rc == 0
    return [int(t) for t in out.getvalue().split()]


# -- bad inputs: one-line errors ---------------------------------------------------------------
def one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg and msg
    return msg


@pytest.mark.parametrize("case", ["missing checkpoint", "missing config", "bad input_shape",
                                  "another width"])
def test_cli_import_trax_bad_input_is_one_line_and_status_2(case, ckpt_dir, tmp_path, capsys):
    from terraformer import cli

    args = {"--checkpoint": str(ckpt_dir / "reformer_saved.pkl.gz"),
            "--config": str(ckpt_dir / "reformer_lm.gin"), "--output_dir": str(tmp_path / "run")}
    extra = []
    if case == "missing checkpoint":
        args["--checkpoint"] = str(tmp_path / "nope.pkl.gz")
    elif case == "missing config":
        args["--config"] = str(tmp_path / "nope.gin")
    elif case == "bad input_shape":
        extra = ["--input_shape", "1x8"]
    else:
        extra = ["--gin_param", "ReformerLM.d_model=24"]
    argv = ["import-trax", *[t for kv in args.items() for t in kv], *extra]
    with pytest.raises(SystemExit) if case == "bad input_shape" else contextlib.nullcontext():
        assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error" in err, err
    assert not (tmp_path / "run").exists()


def test_missing_checkpoint_file(ckpt_dir, tmp_path):
    with pytest.raises(TraxImportError) as e:
        import_trax_checkpoint(tmp_path / "nope.pkl.gz", [ckpt_dir / "reformer_lm.gin"],
                               tmp_path / "run")
    assert "no such trax checkpoint file" in one_line(e)
    assert not (tmp_path / "run").exists()


def test_loop_checkpoint_without_its_weights_file(ckpt_dir, tmp_path):
    shutil.copy(ckpt_dir / "reformer_loop" / "model.pkl.gz", tmp_path / "model.pkl.gz")
    with pytest.raises(TraxImportError) as e:
        read_trax_checkpoint(tmp_path / "model.pkl.gz")
    assert "model.weights.npy.gz" in one_line(e)


def test_missing_config_file(ckpt_dir, tmp_path):
    with pytest.raises(TraxImportError) as e:
        import_trax_checkpoint(ckpt_dir / "reformer_saved.pkl.gz", [tmp_path / "x.gin"],
                               tmp_path / "run")
    assert "no such gin config file" in one_line(e)


def test_config_without_a_model(ckpt_dir, tmp_path):
    gin_file = tmp_path / "empty.gin"
    gin_file.write_text("ReformerLM.d_model = 8\n")
    with pytest.raises(TraxImportError) as e:
        import_trax_checkpoint(ckpt_dir / "reformer_saved.pkl.gz", [gin_file], tmp_path / "run")
    assert "train.model" in one_line(e)


def test_config_of_another_width_names_the_weight(ckpt_dir, tmp_path):
    with pytest.raises(TraxImportError) as e:
        import_trax_checkpoint(ckpt_dir / "reformer_saved.pkl.gz", [ckpt_dir / "reformer_lm.gin"],
                               tmp_path / "run", bindings=["ReformerLM.d_ff = 32"])
    msg = one_line(e)
    assert "FeedForward" in msg and "Dense" in msg and "expected shape (8, 32), got (8, 16)" in msg
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_config_of_another_depth(ckpt_dir, tmp_path):
    """A deeper or shallower config meets the first weight that does not fit, and names it."""
    with pytest.raises(TraxImportError) as e:
        import_trax_checkpoint(ckpt_dir / "reformer_saved.pkl.gz", [ckpt_dir / "reformer_lm.gin"],
                               tmp_path / "run", bindings=["ReformerLM.n_layers = 3"])
    assert "ReversibleRepeat/layer2" in one_line(e)  # the third block meets the output layers
    with pytest.raises(TraxImportError) as e:
        import_trax_checkpoint(ckpt_dir / "reformer_saved.pkl.gz", [ckpt_dir / "reformer_lm.gin"],
                               tmp_path / "run", bindings=["ReformerLM.n_layers = 1"])
    assert "7:LayerNorm.scale: expected shape (16,), got (8,)" in one_line(e)


def test_config_of_another_model(ckpt_dir, tmp_path):
    """A TransformerLM config against a ReformerLM checkpoint: the first misfit is named."""
    with pytest.raises(TraxImportError) as e:
        import_trax_checkpoint(ckpt_dir / "reformer_saved.pkl.gz",
                               [ckpt_dir / "transformer_lm.gin"], tmp_path / "run")
    one_line(e)


def test_transformer_checkpoints_import_with_their_positional_table(ckpt_dir, tmp_path):
    """trax's TransformerLM keeps a trainable positional table; ours holds it (pos_type None):
    a fresh checkpoint gives trax's outputs, a trained one brings its moved table along."""
    model = model_from_gin([ckpt_dir / "transformer_lm.gin"])(mode="eval")
    run = import_trax_checkpoint(ckpt_dir / "transformer_saved.pkl.gz",
                                 [ckpt_dir / "transformer_lm.gin"], tmp_path / "saved")
    w, s, _, _ = restore_run(run, model)
    ref = outputs(ckpt_dir, "transformer_saved")
    y, _ = model.apply(ref["tokens"], w, s, None)
    np.testing.assert_allclose(np.asarray(y), jax.nn.log_softmax(ref["logits"]), atol=ATOL)
    run = import_trax_checkpoint(ckpt_dir / "transformer_trained_positions.pkl.gz",
                                 [ckpt_dir / "transformer_lm.gin"], tmp_path / "trained")
    trained, _, _, _ = restore_run(run, model)
    table = read_trax_checkpoint(ckpt_dir / "transformer_trained_positions.pkl.gz").weights[1]
    np.testing.assert_array_equal(np.asarray(trained[3]), table.reshape(trained[3].shape))


def test_pickle_naming_other_code_is_refused(tmp_path):
    evil = tmp_path / "evil.pkl.gz"

    class Boom:
        def __reduce__(self):
            return (shutil.rmtree, (str(tmp_path / "victim"),))

    (tmp_path / "victim").mkdir()
    evil.write_bytes(gzip.compress(pickle.dumps({"flat_weights": [Boom()]})))
    with pytest.raises(TraxImportError) as e:
        read_trax_checkpoint(evil)
    assert "refuses to unpickle shutil.rmtree" in one_line(e)
    assert (tmp_path / "victim").is_dir()


def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "bad.pkl.gz"
    bad.write_bytes(b"not gzip")
    with pytest.raises(TraxImportError) as e:
        read_trax_checkpoint(bad)
    assert "not a gzipped trax checkpoint" in one_line(e)
    bad.write_bytes(gzip.compress(pickle.dumps({"weights": 1})))
    with pytest.raises(TraxImportError) as e:
        read_trax_checkpoint(bad)
    assert "flat_weights" in one_line(e)


def test_output_dir_with_checkpoints_is_refused(ckpt_dir, tmp_path):
    run = import_trax_checkpoint(ckpt_dir / "reformer_saved.pkl.gz",
                                 [ckpt_dir / "reformer_lm.gin"], tmp_path / "run")
    with pytest.raises(TraxImportError) as e:
        import_trax_checkpoint(ckpt_dir / "reformer_saved.pkl.gz",
                               [ckpt_dir / "reformer_lm.gin"], run)
    assert "already holds checkpoints" in one_line(e)


@pytest.mark.slow
def test_import_then_resumed_train_continues_from_trax_weights(ckpt_dir, tmp_path):
    """`terraformer train` on an imported run starts from the trax weights (step 0 of a
    `save_to_file` checkpoint) and runs to train.steps."""
    from terraformer import cli

    run = import_trax_checkpoint(ckpt_dir / "reformer_saved.pkl.gz",
                                 [ckpt_dir / "reformer_lm.gin"], tmp_path / "run")
    with contextlib.redirect_stdout(io.StringIO()):
        rc = cli.main(["train", "--config", str(run / "config.gin"), "--output_dir", str(run),
                       "--gin_param", "train.steps = 2", "--gin_param", "train.eval_steps = 1"])
    assert rc == 0
    ckpt = Checkpointer(run / "checkpoints", max_to_keep=None, async_save=False)
    try:
        assert ckpt.latest_step() == 2
    finally:
        ckpt.close()


def test_loop_layout_with_bfloat16_weights(tmp_path):
    """trax's Loop stores bfloat16 weights bit-cast to uint16 in model.weights.npy.gz; they come
    back as float32 values."""
    values = np.array([1.0, -2.5, 0.15625], np.float32)
    bits = (values.view(np.uint32) >> 16).astype(np.uint16)  # exact in bfloat16
    buf = io.BytesIO()
    for a in (bits, np.arange(3, dtype=np.float32)):
        np.save(buf, a, allow_pickle=False)
    (tmp_path / "model.weights.npy.gz").write_bytes(gzip.compress(buf.getvalue()))
    (tmp_path / "model.pkl.gz").write_bytes(gzip.compress(pickle.dumps(
        {"step": 7, "flat_weights": 2, "flat_state": [], "input_signature": None})))
    ckpt = read_trax_checkpoint(tmp_path / "model.pkl.gz")
    assert ckpt.step == 7 and ckpt.input_signature is None
    np.testing.assert_array_equal(ckpt.weights[0], values)
    np.testing.assert_array_equal(ckpt.weights[1], np.arange(3, dtype=np.float32))


# -- the decoder-only Terraformer (trax's ReformerLM with the sparse layers) ---------------------
@pytest.mark.slow  # the reformer CLI test covers the command line; test_trax_models the mapping
def test_terraformer_import_then_eval_and_cli_decode_give_trax_outputs(ckpt_dir, tmp_path):
    """`import-trax` of trax's sparse ReformerLM into our TerraformerLM: eval gives trax's
    outputs, `decode` trax's greedy tokens (its predict mode's and its eval's)."""

    ref = outputs(ckpt_dir, "terraformer_saved")
    run = cli_import(ckpt_dir, "terraformer_saved", "terraformer_lm.gin", tmp_path / "run")
    model = model_from_gin([run / "config.gin"])(mode="eval")
    w, s, _, _ = restore_run(run, model)
    y, _ = model.apply(ref["tokens"], w, s, None)
    # weights with noise 1.0: log-probs reach -25, where trax's float32 forward carries its own
    # rounding (see test_trax_models.RTOL)
    np.testing.assert_allclose(np.asarray(y), jax.nn.log_softmax(ref["logits"]), atol=ATOL,
                               rtol=1e-4)
    tokens = cli_decode(run, ref["prompt"], len(ref["greedy"]))
    np.testing.assert_array_equal(tokens, ref["greedy"])
    np.testing.assert_array_equal(tokens, ref["greedy_eval"])


@pytest.mark.parametrize("binding,expected", [
    ("TerraformerLM.d_lowrank = 4", "SparseFF_24.m1: expected shape (8, 4), got (8, 6)"),
    ("TerraformerLM.ff_sparsity = 3", "SparseFF_24.m2: expected the controller's blocks "
     "[d_lowrank, n_blocks, n_elements_in_block] = [*, 8, 3], got shape (6, 6, 4)"),
    ("TerraformerLM.attention_sparsity = 4",
     "FactoredDense_4_8.D: expected shape (8, 4), got (8, 2)"),
    ("TerraformerLM.output_merge = 'average'", "LayerNorm.scale: expected shape (8,), got (16,)"),
])
def test_terraformer_config_that_does_not_fit_names_the_weight(binding, expected, ckpt_dir,
                                                               tmp_path):
    with pytest.raises(TraxImportError) as e:
        import_trax_checkpoint(ckpt_dir / "terraformer_saved.pkl.gz",
                               [ckpt_dir / "terraformer_lm.gin"], tmp_path / "run",
                               bindings=[binding])
    assert expected in one_line(e)
    assert not (tmp_path / "run" / "checkpoints").exists()
