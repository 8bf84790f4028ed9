"""The plain step with offload=True: weights and slots in pinned_host memory between steps,
the same losses and updates as without (on CPU host and device memory are one RAM, so the
placement is what differs; a GPU runs the same program with real transfers)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from terraformer.memory.placement import host_memory_kind, offload_reason
from terraformer.models.reformer import LocalAttention, ReformerLM
from terraformer.shapes import ShapeDtype
from terraformer.training.optimizers import Adam
from terraformer.training.step import make_train_step

VOCAB, LEN, BATCH = 16, 16, 2
MODEL = functools.partial(ReformerLM, VOCAB, d_model=16, d_ff=32, n_layers=2, n_heads=2,
                          d_attention_key=8, d_attention_value=8, dropout=0.0, max_len=LEN,
                          attention_type=LocalAttention(8, 1), mode="train")


def _kinds(tree):
    return {a.sharding.memory_kind for a in jax.tree.leaves(tree)}


@pytest.mark.skipif(host_memory_kind() is None, reason=offload_reason())
def test_plain_step_offload_same_losses_weights_and_slots_on_host():
    seed = int(np.random.SeedSequence().entropy % 2**31)
    model = MODEL()
    weights, state = model.init(ShapeDtype((BATCH, LEN), jnp.int32), jax.random.PRNGKey(seed))
    data = np.random.default_rng(seed)
    batches = [(x, x, jnp.ones((BATCH, LEN))) for x in (
        jnp.asarray(data.integers(1, VOCAB, size=(BATCH, LEN)), jnp.int32) for _ in range(2))]
    runs = {}
    for offload in (False, True):
        step = make_train_step(model, Adam(learning_rate=0.01), offload=offload)
        assert step.offload is offload
        w, s, o = step.place(weights, state, step.init_opt_state(weights))
        if offload:
            assert _kinds(w) == _kinds(o) == {"pinned_host"}
        losses = []
        for i, batch in enumerate(batches):
            w, s, o, m = step(w, s, o, batch, jax.random.PRNGKey(i))
            losses.append(float(m["loss"]))
        runs[offload] = (w, o, losses)
        assert _kinds(step.eval_weights(w)) == {"device"}
    (w0, o0, loss0), (w1, o1, loss1) = runs[False], runs[True]
    assert _kinds(w0) == _kinds(o0) == {"device"}
    assert _kinds(w1) == _kinds(o1) == {"pinned_host"}
    np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(w0), jax.tree.leaves(w1), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)


def test_plain_step_offload_rejects_other_memory_options():
    with pytest.raises(TypeError, match="memory_efficient=True"):
        make_train_step(MODEL(), Adam(), offload=True, loss_chunk_len=8)
