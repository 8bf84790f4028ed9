"""Writes the trax 1.4.1 parity fixtures of tests/interop/fixtures/ (run once, with trax).

Each case builds one trax layer or model with a fixed seed at a small shape (float32, eval
mode), and saves into `<case>.npz`:
  - `w/<tree path>`: trax's weights, one array per leaf, keyed by their path in trax's tree
    (`w/5/1/0`), in trax's flattening order (`order` lists the keys in that order);
  - `in/<i>`, `out/<i>`: the inputs and trax's outputs;
  - `meta`: a JSON string with the constructor arguments and anything the test needs;
  - for whole models also `predict_logits` (predict mode, fed one token at a time) and
    `greedy` (greedy tokens continuing `prompt`);
  - for LSH attention `rotations`: the random rotations trax drew in that call, per head.
It also writes `checkpoints/`: a tiny ReformerLM as trax's `training.Loop` saves it
(`model.pkl.gz` + `model.weights.npy.gz`), ReformerLM and TransformerLM through
`Layer.save_to_file`, and the gin configs that build the same models in terraformer.

The Terraformer case (`--only terraformer`, also part of a full run) is trax's decoder-only
Terraformer: ReformerLM with the sparse feed-forward (`ff_sparsity`) and sparse-QKV attention
(`MultiplicativeConvCausalAttention`), as `terraformer_lm.npz` and as a `Layer.save_to_file`
checkpoint with the gin config building our TerraformerLM.

trax is not a dependency of terraformer: run this with a separate environment,
    TF_CPP_MIN_LOG_LEVEL=3 /tmp/trax-venv/bin/python benchmarks/trax_fixtures.py [--out DIR]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import trax  # noqa: E402
from trax import layers as tl  # noqa: E402
from trax import shapes  # noqa: E402
from trax.layers.research import sparsity  # noqa: E402


def install_jax_shims() -> None:
    """Two jax 0.10.2 incompatibilities of trax 1.4.1's predict mode. It calls `lax.cond` with
    the old keyword form (true_operand=, true_fun=, false_operand=, false_fun=), which jax no
    longer accepts: translate it. It passes a Python int length through `stop_gradient`, which
    now returns an array, later traced where trax needs a static length: keep ints as they are."""
    from trax.fastmath.jax import JAX_BACKEND

    new_cond = jax.lax.cond

    def cond(pred, *args, true_operand=None, true_fun=None, false_operand=None,
             false_fun=None, **kwargs):
        if true_fun is None:
            return new_cond(pred, *args, **kwargs)
        return new_cond(pred, lambda ops: true_fun(ops[0]), lambda ops: false_fun(ops[1]),
                        (true_operand, false_operand))

    JAX_BACKEND["cond"] = cond
    stop_gradient = JAX_BACKEND["stop_gradient"]
    JAX_BACKEND["stop_gradient"] = lambda x: x if isinstance(x, int) else stop_gradient(x)


DEFAULT_OUT = Path(__file__).resolve().parent.parent / "tests" / "interop" / "fixtures"


def path_key(path) -> str:
    parts = []
    for p in path:
        parts.append(str(getattr(p, "idx", getattr(p, "key", p))))
    return "/".join(parts)


def flat_weights(weights) -> dict:
    """{'w/<path>': array} in trax's leaf order."""
    leaves = jax.tree_util.tree_flatten_with_path(weights)[0]
    return {"w/" + path_key(p): np.asarray(leaf) for p, leaf in leaves}


def perturb(weights, seed: int, scale: float = 0.1):
    """Adds noise to every leaf, so that LayerNorm scales and zero biases take part too."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda a: (np.asarray(a) + scale * rng.standard_normal(np.shape(a))).astype(np.float32),
        weights)


def save(out: Path, name: str, weights, inputs, outputs, meta: dict, **extra) -> None:
    arrays = flat_weights(weights)
    order = list(arrays)
    inputs = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    arrays.update({f"in/{i}": np.asarray(x) for i, x in enumerate(inputs)})
    arrays.update({f"out/{i}": np.asarray(y) for i, y in enumerate(outputs)})
    arrays.update({k: np.asarray(v) for k, v in extra.items()})
    meta = dict(meta, order=order, trax_version=trax.__version__ if hasattr(trax, "__version__")
                else "1.4.1")
    np.savez_compressed(out / f"{name}.npz", meta=np.array(json.dumps(meta)), **arrays)
    print(f"{name}: {len(order)} weights, {(out / f'{name}.npz').stat().st_size} bytes")


def run_layer(layer, inputs, seed: int, noise: float = 0.1, rng_seed: int = 0):
    """Initialises `layer` for `inputs`, perturbs its weights, returns (weights, outputs)."""
    layer.init(shapes.signature(inputs), rng=jax.random.PRNGKey(seed))
    if noise:
        layer.weights = perturb(layer.weights, seed, noise)
    # jax arrays throughout: trax's attention indexes its inputs with traced loop counters.
    layer.weights = jax.tree_util.tree_map(jnp.asarray, layer.weights)
    y = layer(jax.tree_util.tree_map(jnp.asarray, inputs), rng=jax.random.PRNGKey(rng_seed))
    return layer.weights, y


def floats(seed: int, *shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def ints(seed: int, vocab: int, *shape):
    return np.random.default_rng(seed).integers(1, vocab, shape).astype(np.int32)


# -- single layers -------------------------------------------------------------------------------
def layer_cases(out: Path) -> None:
    x = floats(1, 2, 5, 4)
    w, y = run_layer(tl.Dense(6), x, seed=1)
    save(out, "dense", w, x, y, {"n_units": 6})

    x = floats(2, 2, 5, 8)
    w, y = run_layer(tl.LayerNorm(), x, seed=2)
    save(out, "layer_norm", w, x, y, {"epsilon": 1e-6})

    ids = ints(3, 10, 2, 5)
    w, y = run_layer(tl.Embedding(10, 4), ids, seed=3)
    save(out, "embedding", w, ids, y, {"vocab_size": 10, "d_feature": 4})

    x = floats(4, 2, 5, 8)
    ff = trax.models.transformer._FeedForwardBlock(
        8, 16, dropout=0.0, dropout_shared_axes=None, mode="eval", activation=tl.Relu)
    # LayerNorm then the block, as trax's TransformerLM applies it inside its residual.
    w, y = run_layer(tl.Serial(tl.LayerNorm(), ff), x, seed=4)
    save(out, "feed_forward", w, x, y, {"d_model": 8, "d_ff": 16, "activation": "Relu"})

    x = floats(5, 2, 16, 8)
    w, y = run_layer(tl.AxialPositionalEncoding(shape=(4, 4), d_embs=(4, 4), dropout=0.0,
                                                mode="eval"), x, seed=5)
    save(out, "axial_positional_encoding", w, x, y, {"shape": [4, 4], "d_embs": [4, 4]})

    x = floats(6, 2, 6, 8)
    w, y = run_layer(tl.CausalAttention(8, n_heads=2, mode="eval"), x, seed=6)
    save(out, "causal_attention", w, x, y, {"d_feature": 8, "n_heads": 2})

    chunked = dict(n_heads=2, d_qk=4, d_v=4, chunk_len=4, n_chunks_before=1, mode="eval")
    x = floats(7, 2, 16, 8)
    w, y = run_layer(tl.SelfAttention(causal=True, **chunked), x, seed=7)
    save(out, "self_attention_causal", w, x, y, dict(chunked, causal=True))

    # Padding at the end only: trax cannot mask positions 0 and 1 (their signed positions are
    # +-0 and the sign carries the mask).
    mask = np.ones((2, 16), bool)
    mask[1, 11:] = False
    w, y = run_layer(tl.SelfAttention(causal=True, masked=True, **chunked), (x, mask), seed=8)
    save(out, "self_attention_causal_masked", w, (x, mask), y,
         dict(chunked, causal=True, masked=True))

    non_causal = dict(chunked, n_chunks_after=1)
    w, y = run_layer(tl.SelfAttention(causal=False, **non_causal), x, seed=9)
    save(out, "self_attention_bidirectional", w, x, y, dict(non_causal, causal=False))

    # One hash round, and two: with two, trax's look-back crosses from one round into the other.
    lsh_case(out, "lsh_self_attention", n_hashes=1)
    lsh_case(out, "lsh_self_attention_2_hashes", n_hashes=2)
    sparse_cases(out)


def lsh_case(out: Path, name: str, n_hashes: int) -> None:
    """LSH attention. trax hashes with rotations drawn from a key kept in the state, one per
    (example, head), and advances that key on every call: the rotations of this call are
    recomputed here from the state as trax draws them, and saved for the test to reuse."""
    cfg = dict(n_heads=2, d_qk=4, d_v=4, causal=True, chunk_len=4, n_chunks_before=1,
               n_chunks_after=0, n_hashes=n_hashes, n_buckets=4)
    x = floats(10, 1, 16, 8)
    layer = tl.LSHSelfAttention(mode="eval", **cfg)
    layer.init(shapes.signature(x), rng=jax.random.PRNGKey(10))
    layer.weights = jax.tree_util.tree_map(jnp.asarray, perturb(layer.weights, 10))
    keys = layer.state[1]  # [batch * n_heads] keys, example-major
    rotations = np.stack([
        np.asarray(jax.random.normal(jax.random.split(k)[1],
                                     (cfg["d_qk"], cfg["n_hashes"], cfg["n_buckets"] // 2)))
        for k in keys]).astype(np.float32)  # [batch * n_heads, d_qk, n_hashes, n_buckets/2]
    y = layer(jnp.asarray(x), rng=jax.random.PRNGKey(0))
    # A second call with the same weights draws new rotations (the state key advanced).
    y2 = layer(jnp.asarray(x), rng=jax.random.PRNGKey(0))
    save(out, name, layer.weights, x, y, dict(cfg, batch=1),
         rotations=rotations, second_call=np.asarray(y2))


def sparse_cases(out: Path) -> None:
    x = floats(11, 2, 6, 8)
    # 6 blocks of 4 units: unequal axes, so that a transposed block layout cannot pass.
    w, y = run_layer(sparsity.SparseFF(24, n_elements_in_block=4, d_lowrank=4, mode="eval"), x,
                     seed=11)
    save(out, "sparse_ff", w, x, y, {"d_ff": 24, "n_elements_in_block": 4, "d_lowrank": 4})

    x = floats(12, 2, 6, 8)
    w, y = run_layer(sparsity.LocallyConvDense(2, 3, mode="eval", kernel_size=1,
                                               length_kernel_size=3), x, seed=12)
    save(out, "locally_conv_dense", w, x, y,
         {"n_modules": 2, "n_units": 3, "kernel_size": 1, "length_kernel_size": 3})

    # One module: trax builds a plain Dense, whatever the kernel sizes.
    w, y = run_layer(sparsity.LocallyConvDense(1, 5, mode="eval", kernel_size=1,
                                               length_kernel_size=3), x, seed=15)
    save(out, "locally_conv_dense_1_module", w, x, y,
         {"n_modules": 1, "n_units": 5, "kernel_size": 1, "length_kernel_size": 3})

    x = floats(13, 2, 6, 8)
    w, y = run_layer(sparsity.FactoredDense(2, 8, 8), x, seed=13)
    save(out, "factored_dense", w, x, y, {"n_modules": 2, "d_in": 8, "d_out": 8})

    # The per-module kernel kmod [2, 4, 4] after the multiplicative dense (FactoredDense has none).
    x = floats(16, 2, 6, 8)
    w, y = run_layer(sparsity.MultiplicativeModularSparseDense(2, 8), x, seed=16)
    save(out, "multiplicative_modular_sparse_dense", w, x, y, {"sparsity": 2, "d_feature": 8})

    x = floats(14, 2, 6, 8)
    w, y = run_layer(sparsity.MultiplicativeConvCausalAttention(
        8, n_heads=2, sparsity=2, length_kernel_size=3, mode="eval"), x, seed=14)
    save(out, "multiplicative_conv_causal_attention", w, x, y,
         {"d_feature": 8, "n_heads": 2, "sparsity": 2, "length_kernel_size": 3})


# -- whole models --------------------------------------------------------------------------------
REFORMER = dict(vocab_size=16, d_model=8, d_ff=16, d_attention_key=4, d_attention_value=4,
                n_layers=2, n_heads=2, max_len=16, dropout=0.0, pos_type="axial",
                pos_axial_shape=(4, 4), pos_d_axial_embs=(4, 4), ff_activation=tl.FastGelu)
LOCAL = dict(chunk_len=4, n_chunks_before=1, n_chunks_after=0)
LSH = dict(chunk_len=4, n_chunks_before=1, n_chunks_after=0, n_hashes=2, n_buckets=4)
TRANSFORMER = dict(vocab_size=16, d_model=8, d_ff=16, n_layers=2, n_heads=2, max_len=32,
                   dropout=0.0, ff_activation=tl.Relu)


def reformer(mode: str, attention: str):
    if attention == "local":
        attn = functools.partial(tl.SelfAttention, predict_mem_len=16, predict_drop_len=4, **LOCAL)
    else:
        attn = functools.partial(tl.LSHSelfAttention, predict_mem_len=16, predict_drop_len=4,
                                 **LSH)
    return trax.models.ReformerLM(attention_type=attn, mode=mode, **REFORMER)


def transformer(mode: str):
    return trax.models.TransformerLM(mode=mode, **TRANSFORMER)


def predict_run(make, weights, tokens, prompt, n_new):
    """Feeds `[0] + tokens[:-1]` one at a time (the logits equal eval's on `tokens`), then
    greedy decoding after `prompt`."""
    model = make("predict")
    model.init(shapes.ShapeDtype((1, 1), np.int32))
    model.weights = weights
    start = model.state
    feed = np.concatenate([[0], tokens[:-1]]).astype(np.int32)
    logits = [np.asarray(model(feed[None, i:i + 1]))[0, 0] for i in range(len(feed))]
    model.state = start
    greedy = []
    for t in np.concatenate([[0], prompt]).astype(np.int32)[:-1]:
        model(np.array([[t]], np.int32))
    tok = np.array([[prompt[-1]]], np.int32)
    for _ in range(n_new):
        nxt = int(np.argmax(np.asarray(model(tok))[0, -1]))
        greedy.append(nxt)
        tok = np.array([[nxt]], np.int32)
    return np.stack(logits), np.array(greedy, np.int32)


def greedy_eval(model, prompt, n_new: int, length: int = 16):
    """Greedy tokens after `prompt` from the eval model's full forward (no predict cache): the
    model shifts its input right, so position i's logits predict token i."""
    seq = list(prompt)
    for _ in range(n_new):
        x = np.zeros((1, length), np.int32)
        x[0, :len(seq)] = seq
        logits = np.asarray(model(x))
        seq.append(int(np.argmax(logits[0, len(seq)])))
    return np.array(seq[len(prompt):], np.int32)


def model_case(out: Path, name: str, make, cfg: dict, seed: int, noise: float = 0.0,
               predict: bool = True) -> None:
    tokens = ints(seed, cfg["vocab_size"], 2, 16)
    model = make("eval")
    model.init(shapes.signature(tokens), rng=jax.random.PRNGKey(seed))
    if noise:  # away from the near-uniform outputs of a fresh model, so greedy tokens vary
        model.weights = jax.tree_util.tree_map(jnp.asarray, perturb(model.weights, seed, noise))
    logits = model(tokens, rng=jax.random.PRNGKey(0))
    prompt = tokens[0, :5]
    extra = {}
    meta = {k: (v.__name__ if callable(v) else v) for k, v in cfg.items()}
    try:
        if predict:
            p_logits, greedy = predict_run(make, model.weights, tokens[0], prompt, n_new=6)
            extra = dict(predict_logits=p_logits, greedy=greedy, prompt=prompt)
            extra["greedy_eval"] = greedy_eval(model, prompt, 6)
    except Exception as e:  # noqa: BLE001 - recorded in the fixture, for the test to report
        meta["predict_error"] = f"{type(e).__name__}: {e}"[:300]
        print(f"{name}: predict mode failed under trax: {meta['predict_error']}")
    save(out, name, model.weights, tokens, logits, meta, **extra)


def position_cases(out: Path) -> None:
    """ReformerLM with trax's other pos_type values: None (a trainable table initialised with
    interleaved sinusoids), 'fixed-base' (FixedBasePositionalEncoding) and 'sin-cos'
    (SinCosPositionalEncoding); eval, and predict with a memory covering the sequence."""
    for pos_type, name in ((None, "reformer_lm_pos_none"), ("fixed-base", "reformer_lm_pos_fixed"),
                           ("sin-cos", "reformer_lm_pos_sin_cos")):
        cfg = dict(REFORMER, pos_type=pos_type, pos_axial_shape=None, pos_d_axial_embs=None)

        def make(mode, cfg=cfg):
            attn = functools.partial(tl.SelfAttention, predict_mem_len=16, predict_drop_len=4,
                                     **LOCAL)
            return trax.models.ReformerLM(attention_type=attn, mode=mode, **cfg)

        # fixed-base starts from vectors of 1e-4: noise makes its positions matter.
        model_case(out, name, make, dict(cfg, attention="local", **LOCAL), seed=23,
                   noise=0.5 if pos_type == "fixed-base" else 0.0)


def model_cases(out: Path) -> None:
    model_case(out, "reformer_lm_local", lambda mode: reformer(mode, "local"),
               dict(REFORMER, attention="local", **LOCAL), seed=20, noise=0.5)
    model_case(out, "reformer_lm_lsh", lambda mode: reformer(mode, "lsh"),
               dict(REFORMER, attention="lsh", **LSH), seed=21, noise=0.5)
    model_case(out, "transformer_lm", transformer, TRANSFORMER, seed=22)


# -- checkpoint files ----------------------------------------------------------------------------
def _run_bindings(model: str) -> str:
    """The inputs and training bindings both fixture checkpoints' configs share."""
    return f"""
copy_task.batch_size = 2
copy_task.seq_len = 16
copy_task.vocab_size = 16
copy_task.seed = 0
eval/copy_task.seed = 1
tokenizer.name_or_path = 'ids'
tokenizer.vocab_size = 16

train.model = @{model}
train.inputs = @copy_task
train.eval_inputs = @eval/copy_task
train.steps = 2
"""


REFORMER_GIN = """\
# A tiny ReformerLM with chunked local attention and axial positions, as the trax fixture
# checkpoint was built (trax's ReformerLM arguments).
ReformerLM.vocab_size = 16
ReformerLM.d_model = 8
ReformerLM.d_ff = 16
ReformerLM.d_attention_key = 4
ReformerLM.d_attention_value = 4
ReformerLM.n_layers = 2
ReformerLM.n_heads = 2
ReformerLM.max_len = 16
ReformerLM.dropout = 0.0
ReformerLM.pos_type = 'axial'
ReformerLM.pos_axial_shape = (4, 4)
ReformerLM.pos_d_axial_embs = (4, 4)
ReformerLM.ff_activation = @FastGelu
ReformerLM.attention_type = @SelfAttention
SelfAttention.chunk_len = 4
SelfAttention.n_chunks_before = 1
SelfAttention.predict_mem_len = 16
""" + _run_bindings("ReformerLM")

TRANSFORMER_GIN = """\
# A tiny TransformerLM, as the trax fixture checkpoint was built.
TransformerLM.vocab_size = 16
TransformerLM.d_model = 8
TransformerLM.d_ff = 16
TransformerLM.n_layers = 2
TransformerLM.n_heads = 2
TransformerLM.max_len = 32
TransformerLM.dropout = 0.0
""" + _run_bindings("TransformerLM")


# -- the decoder-only Terraformer ----------------------------------------------------------------
# trax's ReformerLM with the Terraformer's sparse layers: SparseFF (blocks of `ff_sparsity` units,
# d_lowrank = d_ff / ff_sparsity) and MultiplicativeConvCausalAttention (FactoredDense shared by
# Q, K, V, then a causal convolution each); FixedBasePositionalEncoding, the Terraformer's
# positions. 6 blocks of 4 units: unequal axes, so that a transposed block layout cannot pass.
TERRAFORMER = dict(vocab_size=16, d_model=8, d_ff=24, d_attention_key=4, d_attention_value=4,
                   n_layers=2, n_heads=2, max_len=16, dropout=0.0, pos_type="fixed-base",
                   ff_sparsity=4)
TERRAFORMER_ATTENTION = dict(sparsity=2, length_kernel_size=3)

TERRAFORMER_GIN = """\
# A tiny decoder-only Terraformer, as the trax fixture checkpoint was built: trax's ReformerLM
# with ff_sparsity = 4 (SparseFF, d_lowrank = d_ff / 4) and MultiplicativeConvCausalAttention
# (sparsity 2, length_kernel_size 3); its two streams concatenated before the output layer.
TerraformerLM.vocab_size = 16
TerraformerLM.d_model = 8
TerraformerLM.d_ff = 24
TerraformerLM.d_attention_key = 4
TerraformerLM.d_attention_value = 4
TerraformerLM.n_layers = 2
TerraformerLM.n_heads = 2
TerraformerLM.max_len = 16
TerraformerLM.dropout = 0.0
TerraformerLM.pos_type = 'fixed-base'
TerraformerLM.attention_sparsity = 2
TerraformerLM.length_kernel_size = 3
TerraformerLM.ff_sparsity = 4
TerraformerLM.d_lowrank = 6
TerraformerLM.output_merge = 'concatenate'
""" + _run_bindings("TerraformerLM")


def terraformer(mode: str):
    attn = functools.partial(sparsity.MultiplicativeConvCausalAttention, **TERRAFORMER_ATTENTION)
    return trax.models.ReformerLM(attention_type=attn, mode=mode, **TERRAFORMER)


def varied_seed(make, first: int, noise: float, tries: int = 50) -> int:
    """The first seed from `first` whose perturbed model (as `model_case` builds it) continues
    its prompt greedily with at least 3 different tokens: random models tend to repeat one
    token, which would let a decoder that ignores its context pass."""
    model = make("eval")
    for seed in range(first, first + tries):
        tokens = ints(seed, 16, 2, 16)
        model.init(shapes.signature(tokens), rng=jax.random.PRNGKey(seed))
        weights = jax.tree_util.tree_map(jnp.asarray, perturb(model.weights, seed, noise))
        state = model.state
        forward = jax.jit(lambda x, w, s=state: model.pure_fn(x, w, s, jax.random.PRNGKey(0))[0])
        seq = list(tokens[0, :5])
        for _ in range(6):
            x = np.zeros((1, 16), np.int32)
            x[0, :len(seq)] = seq
            seq.append(int(np.argmax(np.asarray(forward(x, weights))[0, len(seq)])))
        if len(set(seq[5:])) >= 3:
            return seed
    raise RuntimeError(f"no seed in [{first}, {first + tries}) gives varied greedy tokens")


def terraformer_cases(out: Path) -> None:
    """Eval, predict and greedy tokens (`terraformer_lm.npz`), and a `Layer.save_to_file`
    checkpoint of other weights with its outputs and the gin config building our model."""
    # noise: the fixed-base digit vectors start at 1e-4 and the controller near uniform
    seed = varied_seed(terraformer, 24, noise=1.0)
    model_case(out, "terraformer_lm", terraformer,
               dict(TERRAFORMER, attention="MultiplicativeConvCausalAttention",
                    **TERRAFORMER_ATTENTION), seed=seed, noise=1.0)
    ckpt = out / "checkpoints"
    ckpt.mkdir(exist_ok=True)
    (ckpt / "terraformer_lm.gin").write_text(TERRAFORMER_GIN)
    seed = varied_seed(terraformer, seed + 1, noise=1.0)
    model = terraformer("eval")
    tokens = ints(seed, 16, 2, 16)
    model.init(shapes.signature(tokens), rng=jax.random.PRNGKey(seed))
    model.weights = jax.tree_util.tree_map(jnp.asarray, perturb(model.weights, seed, 1.0))
    model.save_to_file(str(ckpt / "terraformer_saved.pkl.gz"),
                       input_signature=shapes.signature(tokens))
    prompt = tokens[0, :5]
    _, greedy = predict_run(terraformer, model.weights, tokens[0], prompt, n_new=6)
    np.savez_compressed(ckpt / "terraformer_saved_outputs.npz", tokens=tokens,
                        logits=np.asarray(model(tokens)), prompt=prompt,
                        greedy_eval=greedy_eval(model, prompt, 6), greedy=greedy)


def terraformer_float64(out: Path) -> None:
    """Adds `out64/0` to `terraformer_lm.npz`: trax's eval logits in float64 on the same weights
    (run alone: it switches jax to 64 bits). The fixture's weights are large (noise 1.0), and
    trax's float32 forward is itself ~3e-4 from this on a few positions; the tests compare ours
    with it."""
    jax.config.update("jax_enable_x64", True)
    path = out / "terraformer_lm.npz"
    with np.load(path) as d:
        arrays = {k: d[k] for k in d.files}
    order = json.loads(str(arrays["meta"]))["order"]
    x = arrays["in/0"]
    model = terraformer("eval")
    model.init(shapes.signature(x), rng=jax.random.PRNGKey(0))
    paths, treedef = jax.tree_util.tree_flatten_with_path(model.weights)
    keys = ["w/" + path_key(p) for p, _ in paths]
    if keys != order:
        raise RuntimeError("terraformer_float64: the model's weight tree is not the fixture's")
    model.weights = jax.tree_util.tree_unflatten(
        treedef, [jnp.asarray(arrays[k], jnp.float64) for k in keys])
    model.state = jax.tree_util.tree_map(
        lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(jnp.asarray(a).dtype,
                                                                jnp.floating) else a,
        model.state)
    arrays["out64/0"] = np.asarray(model(jnp.asarray(x)), np.float64)
    np.savez_compressed(path, **arrays)


def checkpoint_cases(out: Path) -> None:
    ckpt = out / "checkpoints"
    ckpt.mkdir(exist_ok=True)
    (ckpt / "reformer_lm.gin").write_text(REFORMER_GIN)
    (ckpt / "transformer_lm.gin").write_text(TRANSFORMER_GIN)

    # training.Loop: two Adam steps on random batches, then its model.pkl.gz.
    rng = np.random.default_rng(30)

    def batches():
        while True:
            x = rng.integers(1, 16, (2, 16)).astype(np.int32)
            yield x, x, np.ones_like(x, np.float32)

    loop_dir = ckpt / "reformer_loop"
    shutil.rmtree(loop_dir, ignore_errors=True)
    task = trax.supervised.training.TrainTask(
        labeled_data=batches(), loss_layer=tl.WeightedCategoryCrossEntropy(),
        optimizer=trax.optimizers.Adam(0.01), n_steps_per_checkpoint=None)
    loop = trax.supervised.training.Loop(
        reformer("train", "local"), [task], output_dir=str(loop_dir),
        checkpoint_at=lambda step: False, random_seed=30)
    loop.run(2)
    loop.save_checkpoint("model")
    for f in list(loop_dir.iterdir()):
        if f.name not in ("model.pkl.gz", "model.weights.npy.gz"):
            shutil.rmtree(f) if f.is_dir() else f.unlink()
    tokens = ints(31, 16, 2, 16)
    ev = reformer("eval", "local")
    ev.init(shapes.signature(tokens))
    ev.weights = loop.model.weights
    np.savez_compressed(ckpt / "reformer_loop_outputs.npz", tokens=tokens,
                        logits=np.asarray(ev(tokens)))

    # Layer.save_to_file of freshly initialised models.
    for name, make, seed in (("reformer_saved", lambda m: reformer(m, "local"), 32),
                             ("transformer_saved", transformer, 33)):
        model = make("eval")
        tokens = ints(seed, 16, 2, 16)
        model.init(shapes.signature(tokens), rng=jax.random.PRNGKey(seed))
        if name.startswith("reformer"):  # varied greedy tokens (see model_case)
            model.weights = jax.tree_util.tree_map(jnp.asarray, perturb(model.weights, seed, 0.5))
        model.save_to_file(str(ckpt / f"{name}.pkl.gz"),
                           input_signature=shapes.signature(tokens))
        np.savez_compressed(ckpt / f"{name}_outputs.npz", tokens=tokens,
                            logits=np.asarray(model(tokens)), prompt=tokens[0, :5],
                            greedy_eval=greedy_eval(model, tokens[0, :5], 6))
    # A trained TransformerLM: its positional table has moved away from the sinusoids.
    tr = transformer("eval")
    tokens = ints(34, 16, 2, 16)
    tr.init(shapes.signature(tokens), rng=jax.random.PRNGKey(34))
    w = list(tr.weights)
    w[3] = np.asarray(w[3]) + 0.01
    tr.weights = tuple(w)
    tr.save_to_file(str(ckpt / "transformer_trained_positions.pkl.gz"),
                    input_signature=shapes.signature(tokens))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--only", choices=["layers", "sparse", "models", "positions", "checkpoints",
                                       "terraformer", "terraformer_float64"],
                   default=None)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_default_matmul_precision", "highest")
    install_jax_shims()
    if args.only in (None, "layers"):
        layer_cases(args.out)
    if args.only == "sparse":
        sparse_cases(args.out)
    if args.only in (None, "models"):
        model_cases(args.out)
    if args.only in (None, "positions"):
        position_cases(args.out)
    if args.only in (None, "checkpoints"):
        checkpoint_cases(args.out)
    if args.only in (None, "terraformer"):
        terraformer_cases(args.out)
    if args.only == "terraformer_float64":
        terraformer_float64(args.out)
    total = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"total fixture size: {total} bytes")


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    main()
