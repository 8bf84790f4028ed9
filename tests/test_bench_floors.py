"""The floors of the benchmark records: FLOP counts against hand counts, the peak record and
its cache, the new record fields, and (slow) linear memory of a training step up to 64K."""

import functools
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from terraformer import flops, peak
from terraformer.layers.lsh import LSHSelfAttention
from terraformer.models.reformer import ReformerLM
from terraformer.models.transformer import TransformerLM
from terraformer.shapes import ShapeDtype

ROOT = Path(__file__).resolve().parents[1]


def abstract_init(model, length):
    return jax.eval_shape(
        lambda: model.init(ShapeDtype((1, length), jnp.int32), jax.random.PRNGKey(0)))


def count(model, length, train=False):
    weights, state = abstract_init(model, length)
    tokens = jax.ShapeDtypeStruct((1, length), jnp.int32)
    if train:
        return flops.train_flops(model, tokens, weights, state, jax.random.PRNGKey(1))
    return flops.model_forward_flops(model, tokens, weights, state)


def test_transformer_flops_equal_the_hand_count():
    vocab, d, d_ff, layers, heads, length = 16, 8, 24, 2, 2, 12
    model = TransformerLM(vocab, d_model=d, d_ff=d_ff, n_layers=layers, n_heads=heads,
                          max_len=length, dropout=0.0, mode="eval")
    d_head = d // heads
    projections = 4 * 2 * length * d * d              # wq, wk, wv, wo
    feed_forward = 2 * 2 * length * d * d_ff          # d -> d_ff -> d
    scores_and_values = heads * 2 * (2 * length * length * d_head)  # the whole L x L square
    output = 2 * length * d * vocab
    hand = layers * (projections + feed_forward + scores_and_values) + output
    assert count(model, length) == hand == 2 * (6144 + 9216 + 4608) + 3072
    # A training step: three times the forward pass (no recomputation counted).
    train_model = TransformerLM(vocab, d_model=d, d_ff=d_ff, n_layers=layers, n_heads=heads,
                                max_len=length, dropout=0.0, mode="train")
    assert count(train_model, length, train=True) == 3 * hand


def test_blockwise_full_attention_is_counted_as_its_dense_twin():
    """From 4,096 positions 'full' runs blockwise attention, whose causal key loop jaxpr_flops
    cannot count; `bench train` counts the same model with the whole L x L scores instead,
    which equals the hand count of T-full at 4,096 tokens."""
    from terraformer.bench import t_workload_model

    length, d, d_ff, vocab, layers = 4096, 256, 512, 256, 2
    with pytest.raises(ValueError, match="while_loop"):
        count(t_workload_model(length, layers, "full"), length, train=True)
    per_token = layers * (4 * 2 * d * d + 2 * 2 * d * d_ff) + 2 * d * vocab
    attention = layers * 4 * length * length * d   # scores and values, all heads, whole square
    hand = 3 * (length * per_token + attention)
    twin = t_workload_model(length, layers, "full", dense_attention=True)
    assert count(twin, length, train=True) == hand == 130_459_631_616


def test_reformer_lsh_flops_equal_the_hand_count():
    vocab, d, d_ff, layers, heads, d_qk, d_v, length = 16, 8, 12, 2, 2, 4, 6, 32
    chunk, before, hashes, buckets = 4, 1, 2, 4
    attn = functools.partial(LSHSelfAttention, chunk_len=chunk, n_chunks_before=before,
                             n_chunks_after=0, n_hashes=hashes, n_buckets=buckets)
    model = ReformerLM(vocab, d_model=d, d_ff=d_ff, d_attention_key=d_qk,
                       d_attention_value=d_v, n_layers=layers, n_heads=heads, dropout=0.0,
                       max_len=length, attention_type=attn, mode="train")
    window = (before + 1) * chunk                     # keys each query chunk sees
    projections = 2 * length * d * heads * (d_qk + d_v) + 2 * length * heads * d_v * d
    hashing = heads * 2 * length * d_qk * hashes * (buckets // 2)   # random rotations
    attention = heads * hashes * (2 * length * window * d_qk + 2 * length * window * d_v)
    feed_forward = 2 * 2 * length * d * d_ff
    output = 2 * length * (2 * d) * vocab             # the two streams concatenated
    hand = layers * (projections + hashing + attention + feed_forward) + output
    assert hand == 2 * (16384 + 2048 + 20480 + 12288) + 16384
    assert count(model, length, train=True) == 3 * hand


def test_loops_and_convolutions_are_counted():
    def body(carry, w):
        return carry @ w, None

    def scanned(x, ws):
        return jax.lax.scan(body, x, ws)[0]

    x, ws = jnp.ones((3, 5)), jnp.ones((7, 5, 5))
    assert flops.forward_flops(scanned, x, ws) == 7 * 2 * 3 * 5 * 5
    # A cond counts its dearer branch.
    square = jnp.ones((4, 4))
    assert flops.forward_flops(
        lambda p, x: jax.lax.cond(p, lambda x: x, lambda x: x @ x, x), True, square) == 2 * 4**3
    # A depthwise conv over length (as the Terraformer's local conv): 2 * outputs * kernel.
    lhs, kernel = jnp.ones((1, 10, 6)), jnp.ones((3, 1, 6))
    conv = functools.partial(jax.lax.conv_general_dilated, window_strides=(1,),
                             padding="SAME", dimension_numbers=("NWC", "WIO", "NWC"),
                             feature_group_count=6)
    assert flops.forward_flops(conv, lhs, kernel) == 2 * 10 * 6 * 3


def test_a_while_loop_with_matmuls_is_refused():
    def loop(n, x):
        return jax.lax.fori_loop(0, n, lambda i, x: x @ x, x)

    with pytest.raises(ValueError, match="while_loop"):
        flops.forward_flops(loop, 3, jnp.ones((2, 2)))


def test_peak_record_is_measured_cached_and_reused(tmp_path, monkeypatch):
    path = tmp_path / "peak.json"
    record = peak.measure(matmul_shapes=((64, 32, 48), (32, 64, 16)), read_bytes=1 << 20,
                          repeats=2)
    assert record["flops_per_s"] == max(r["flops_per_s"] for r in record["matmuls"]) > 0
    assert record["read_bytes_per_s"] > 0 and record["machine"] == peak.machine()
    peak.save(record, path)

    def no_measuring(**kwargs):
        raise AssertionError("measured again although a record of this machine is cached")

    monkeypatch.setattr(peak, "measure", no_measuring)
    assert peak.load_or_measure(path) == record
    # A record of another machine is not used.
    path.write_text(json.dumps({**record, "machine": {**record["machine"], "cpu_count": -1}}))
    assert peak.load(path) is None
    monkeypatch.setattr(peak, "measure", lambda: {**record, "flops_per_s": 1.0})
    assert peak.load_or_measure(path)["flops_per_s"] == 1.0
    assert peak.load(path)["flops_per_s"] == 1.0
    path.write_text(json.dumps({"flops_per_s": 1.0}))
    with pytest.raises(ValueError, match="read_bytes_per_s"):
        peak.load(path)


def fake_peak(path, flops_per_s=1e11, read_bytes_per_s=1e10):
    """A peak record of this machine with round figures (so a test measures nothing)."""
    peak.save({"flops_per_s": flops_per_s, "read_bytes_per_s": read_bytes_per_s,
               "machine": peak.machine()}, path)
    return path


def run_bench(argv, capsys):
    from terraformer import bench

    assert bench.main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.slow
def test_train_record_carries_the_floor(tmp_path, capsys):
    from terraformer.bench import t_workload_model

    path = fake_peak(tmp_path / "peak.json")
    record = run_bench(["train", "--seq_len", "256", "--n_layers", "1", "--repeats", "1",
                        "--peak_file", str(path)], capsys)
    assert record["model_flops"] == count(t_workload_model(256, 1, "lsh"), 256, train=True)
    assert record["flops_per_s"] == pytest.approx(record["model_flops"] / record["step_s"])
    assert record["floor_fraction"] == pytest.approx(record["flops_per_s"] / 1e11)


@pytest.mark.slow
def test_decode_record_carries_the_floors(tmp_path, capsys):
    from terraformer.bench import prefill_flops

    path = fake_peak(tmp_path / "peak.json")
    record = run_bench(["decode", "--model", "dense", "--n_layers", "1", "--prompt_len", "20",
                        "--new_tokens", "4", "--block_size", "2", "--peak_file", str(path)],
                       capsys)
    # Hand count: d_model 1024, d_ff 4096, 21 positions (start token + prompt), the output
    # layer (1024 x 32000) on the last one only, full 21 x 21 attention.
    length, d, d_ff, vocab = 21, 1024, 4096, 32000
    hand = (4 * 2 * length * d * d + 2 * 2 * length * d * d_ff + 2 * 2 * length * length * d
            + 2 * d * vocab)
    assert record["prefill_flops"] == hand == prefill_flops("dense", 1, 32, 20)
    assert record["prefill_floor_s"] == pytest.approx(hand / 1e11)
    assert record["first_token_s"] > record["prefill_s"] > 0
    assert record["prefill_tokens_per_s"] == pytest.approx(20 / record["prefill_s"])
    assert record["prefill_floor_tokens_per_s"] == pytest.approx(20 / (hand / 1e11))
    assert record["bandwidth_gib_s"] == pytest.approx(1e10 / 2**30)
    assert record["floor_s_per_token"] == pytest.approx(record["weight_bytes_per_token"] / 1e10)


def peak_rss_of_a_step(seq_len, peak_file):
    cmd = [sys.executable, "-m", "terraformer.cli", "bench", "train", "--seq_len", str(seq_len),
           "--n_layers", "1", "--repeats", "1", "--peak_file", str(peak_file)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_gib"]


@pytest.mark.slow
def test_training_step_memory_grows_linearly_to_64k(tmp_path):
    """Peak RSS of a 1-layer LSH training step, each length in a fresh process: doubling the
    length from 32K to 64K at most 2.1x the peak (quadratic memory would be near 4x)."""
    path = fake_peak(tmp_path / "peak.json")
    at_32k = peak_rss_of_a_step(32768, path)
    at_64k = peak_rss_of_a_step(65536, path)
    assert at_64k / at_32k < 2.1, (at_32k, at_64k)


def load_run_script():
    spec = importlib.util.spec_from_file_location("benchmarks_run", ROOT / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_run_table_gives_trax_the_floor_of_the_same_model():
    run = load_run_script()
    model = dict(workload="T-len", seq_len=4096, n_layers=2, params=1000)
    ours = dict(model, impl="terraformer", step_s=2.0, model_flops=8e9, flops_per_s=4e9,
                peak_flops_per_s=1e10, floor_fraction=0.4)
    trax = dict(model, impl="trax-1.4.1", step_s=4.0)
    other = dict(model, impl="trax-1.4.1", step_s=4.0, seq_len=8192)  # no record of ours
    got = run.with_floors([ours, trax, other])
    assert got[0] == ours
    assert got[1]["floor_fraction"] == pytest.approx(8e9 / 4.0 / 1e10)
    assert got[1]["flops_per_s"] == pytest.approx(2e9)
    assert "floor_fraction" not in got[2]
    lines = run.table([ours, trax, other]).splitlines()
    column = lines[0].split().index("floor_fraction")
    assert [line.split()[column] for line in lines[1:]] == ["0.400", "0.200", "-"]


def test_run_prompt_series_runs_bench_decode_per_prompt_length(tmp_path, monkeypatch, capsys):
    run = load_run_script()
    commands = []

    def fake_run_one(cmd, timeout):
        commands.append(cmd)
        prompt = int(cmd[cmd.index("--prompt_len") + 1])
        if prompt > 1024:
            return None  # as a prompt over the time limit: ends this model's series
        return dict(workload="D-lsh", impl="terraformer", prompt_len=prompt, compile_s=1.0,
                    prefill_s=2.0, prefill_floor_s=1.0, first_token_s=2.5, s_per_token=0.1)

    monkeypatch.setattr(run, "run_one", fake_run_one)
    out = tmp_path / "d.jsonl"
    assert run.main(["D-prompt-lsh", "D-prompt-dense", "--lengths", "1024,16384,65536",
                     "--out", str(out)]) == 0
    prompts = [(c[c.index("--model") + 1], c[c.index("--prompt_len") + 1]) for c in commands]
    assert prompts == [("lsh", "1024"), ("lsh", "16384"), ("dense", "1024"), ("dense", "16384")]
    assert all(c[c.index("--new_tokens") + 1] == "32" for c in commands)
    assert len(out.read_text().splitlines()) == 2
    heading = capsys.readouterr().err.splitlines()[-3].split()
    assert {"compile_s", "prefill_floor_s", "first_token_s", "s/token"} <= set(heading)


@pytest.mark.parametrize("argv", [["peak", "--repeats", "0"], ["train", "--peak_file"]])
def test_bench_peak_arguments_are_checked(argv, capsys):
    from terraformer.bench import build_parser

    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 2
    assert argv[1] in capsys.readouterr().err
