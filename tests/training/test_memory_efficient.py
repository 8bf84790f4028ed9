"""The memory-efficient trainer: same updates as the plain step, stack state in host memory."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax_cache_helper import persistent_compilation_cache

from terraformer.data.streams import copy_task
from terraformer.memory.placement import host_memory_kind, offload_reason, to_device
from terraformer.models.reformer import LocalAttention, ReformerLM
from terraformer.models.transformer import TransformerLM
from terraformer.shapes import ShapeDtype
from terraformer.training.loop import train
from terraformer.training.memory_efficient import (
    HEAD_HIDDEN,
    MemoryEfficientOptState,
    MemoryEfficientTrainer,
    check_separable,
)
from terraformer.training.optimizers import SGD, Adam
from terraformer.training.optimizers import current_learning_rate as lr_of
from terraformer.training.step import make_train_step

VOCAB, LEN, BATCH = 16, 32, 2
MODEL = functools.partial(ReformerLM, VOCAB, d_model=16, d_ff=32, n_layers=2, n_heads=2,
                          d_attention_key=8, d_attention_value=8, dropout=0.0, max_len=LEN,
                          attention_type=LocalAttention(8, 1))
HOST = host_memory_kind()


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
    """Identical computations (the same model built twice) compile once."""
    with persistent_compilation_cache(tmp_path_factory.mktemp("jax_cache")):
        yield


def _batches(seed, n):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = jnp.asarray(rng.integers(1, VOCAB, size=(BATCH, LEN)), jnp.int32)
        out.append((x, x, jnp.asarray(rng.integers(0, 2, size=(BATCH, LEN)), jnp.float32)))
    return out


def _run(step, weights, state, opt_state, batches, seed):
    metrics = []
    for i, batch in enumerate(batches):
        rng = jax.random.fold_in(jax.random.PRNGKey(seed), i)
        weights, state, opt_state, m = step(weights, state, opt_state, batch, rng)
        metrics.append(jax.device_get(m))
    return weights, state, opt_state, metrics


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30)


def _compare(model, optimizer, seed, trainer_kwargs=(), plain_optimizer=None, steps=3):
    weights, state = model.init(ShapeDtype((BATCH, LEN), jnp.int32), jax.random.PRNGKey(seed))
    batches = _batches(seed, steps)
    plain_opt = plain_optimizer or optimizer
    plain = _run(make_train_step(model, plain_opt), weights, state,
                 jax.jit(plain_opt.init)(weights), batches, seed)
    trainer = MemoryEfficientTrainer(model, optimizer, loss_chunk_len=8, **dict(trainer_kwargs))
    ours = _run(trainer.step, weights, state, trainer.init_opt_state(weights), batches, seed)
    return weights, plain, ours, trainer


def _check_same(weights0, plain, ours):
    w_plain, s_plain, _, m_plain = plain
    w_ours, s_ours, _, m_ours = ours
    w_ours = to_device(w_ours)
    assert jax.tree.structure(w_plain) == jax.tree.structure(w_ours)
    for a, b, w0 in zip(jax.tree.leaves(w_plain), jax.tree.leaves(w_ours),
                        jax.tree.leaves(weights0), strict=True):
        assert _rel(a, b) < 1e-5
        # the updates themselves (a much smaller quantity) agree to float32 round-off
        assert _rel(np.asarray(a) - np.asarray(w0), np.asarray(b) - np.asarray(w0)) < 2e-3
    assert jax.tree.structure(s_plain) == jax.tree.structure(s_ours)
    for a, b in zip(jax.tree.leaves(s_plain), jax.tree.leaves(s_ours), strict=True):
        np.testing.assert_array_equal(a, b)
    for mp, mo in zip(m_plain, m_ours, strict=True):
        for key in ("loss", "accuracy", "grad_norm", "lr"):
            np.testing.assert_allclose(mo[key], mp[key], rtol=1e-5, err_msg=key)


@pytest.fixture(scope="module")
def repeat_run():
    seed = int(np.random.SeedSequence().entropy % 2**31)
    print(f"seed={seed}")
    model = MODEL(mode="train")
    return _compare(model, Adam(learning_rate=0.01), seed)


def test_same_updates_as_plain_trainer(repeat_run):
    weights0, plain, ours, _ = repeat_run
    _check_same(weights0, plain, ours)


@pytest.mark.skipif(HOST is None, reason=offload_reason())
def test_stack_weights_and_slots_live_in_host_memory(repeat_run):
    _, _, (weights, _, opt_state, _), trainer = repeat_run
    assert isinstance(opt_state, MemoryEfficientOptState)
    stack = jax.tree.leaves(weights[trainer.k])
    assert stack and all(a.sharding.memory_kind == "pinned_host" for a in stack)
    slots = jax.tree.leaves(opt_state.stack)
    assert slots and all(a.sharding.memory_kind == "pinned_host" for a in slots)
    outer = jax.tree.leaves(weights[: trainer.k] + weights[trainer.k + 1:])
    assert all(a.sharding.memory_kind == "device" for a in outer)
    assert all(a.sharding.memory_kind == "device" for a in jax.tree.leaves(opt_state.outer))
    assert float(lr_of(opt_state)) == pytest.approx(0.01)


def _head_jaxpr(trainer, weights, state):
    k = trainer.k
    items = (jnp.zeros((BATCH, LEN, 16)),) * 2
    return str(jax.make_jaxpr(trainer._head)(
        to_device(weights[k + 1:]), items, state[k + 1:], None,
        jnp.zeros((BATCH, LEN), jnp.int32), jnp.ones((BATCH, LEN))))


@pytest.mark.skipif(HOST is None, reason=offload_reason())
def test_head_activations_chunked_or_offloaded(repeat_run):
    """ReformerLM's merge + LayerNorm run inside the loss's chunks (no [length, d] activation
    saved); with chunk_head=False their output is saved in host memory between the passes.

    (On CPU, XLA lowers the transfer to nothing, host and device being one RAM; the request
    is in the program, which is what a GPU run executes.)
    """
    _, _, (weights, state, _, _), trainer = repeat_run
    chunked = _head_jaxpr(trainer, weights, state)
    assert HEAD_HIDDEN not in chunked and "MemorySpace.Host" not in chunked
    whole = MemoryEfficientTrainer(trainer.model, Adam(), chunk_head=False)
    jaxpr = _head_jaxpr(whole, weights, state)
    assert f"name[name={HEAD_HIDDEN}]" in jaxpr
    assert "MemorySpace.Host" in jaxpr and "<host>" in jaxpr


def test_errors():
    with pytest.raises(ValueError, match="own gradient"):
        MemoryEfficientTrainer(MODEL(mode="train"), Adam(clip_grad_norm=1.0))
    with pytest.raises(ValueError, match="exactly one"):
        MemoryEfficientTrainer(TransformerLM(VOCAB, d_model=8, d_ff=8, n_layers=1, n_heads=1),
                               Adam())
    with pytest.raises(TypeError, match="Serial"):
        MemoryEfficientTrainer(MODEL(mode="train").sublayers[5], Adam())
    with pytest.raises(ValueError, match="clip_grad_norm"):
        MemoryEfficientTrainer(MODEL(mode="train"), Adam(), clip_grad_norm=0.0)
    check_separable(SGD())  # per-weight optimizers pass


def test_train_option_matches_plain_loop(tmp_path):
    """`train(memory_efficient=True)`: same losses and eval as the plain loop, and resumes."""
    common = dict(model=functools.partial(MODEL, dropout=0.0), eval_steps=1, eval_frequency=2,
                  inputs=lambda: copy_task(BATCH, LEN, VOCAB, seed=3),
                  eval_inputs=lambda: copy_task(BATCH, LEN, VOCAB, seed=4),
                  optimizer=functools.partial(Adam, learning_rate=0.01), progress=False,
                  tensorboard=False, async_checkpoints=False)
    plain = train(tmp_path / "plain", steps=2, **common)
    ours = train(tmp_path / "ours", steps=2, memory_efficient=True, **common)
    np.testing.assert_allclose(list(ours.losses.values()), list(plain.losses.values()),
                               rtol=1e-5)
    np.testing.assert_allclose(ours.eval_metrics[2]["loss"], plain.eval_metrics[2]["loss"],
                               rtol=1e-5)
    resumed = train(tmp_path / "ours", steps=3, memory_efficient=True, **common)
    assert list(resumed.losses) == [3]


@pytest.mark.slow
def test_reversible_serial_and_clipping(seed):
    """A ReversibleSerial stack (mixed attention), dropout (the same masks in the rebuilt
    forward pass) and a global-norm clip (two backward walks)."""
    model = MODEL(attention_type=[LocalAttention(8, 1), LocalAttention(4, 1)], dropout=0.1,
                  mode="train")
    weights0, plain, ours, _ = _compare(model, Adam(learning_rate=0.01), seed,
                                        trainer_kwargs={"clip_grad_norm": 0.05},
                                        plain_optimizer=Adam(learning_rate=0.01,
                                                             clip_grad_norm=0.05))
    assert plain[3][0]["grad_norm"] > 0.05  # the clip acts
    _check_same(weights0, plain, ours)


def test_train_step_builder_keeps_trainer():
    step = make_train_step(MODEL(mode="train"), Adam(), memory_efficient=True)
    assert isinstance(step.trainer, MemoryEfficientTrainer)
