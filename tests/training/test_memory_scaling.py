"""The memory of a training step grows linearly in the length (issue 22).

Measured as XLA's memory analysis of the compiled plain step (its temporary buffers, the
activations, plus its arguments): a small ReformerLM of the T workloads' structure (LSH
attention, axial positions, a reversible stack, the chunked head) at 32K and 64K tokens. A
quadratic term (scores of length x length, hashing against L / chunk_len buckets unfactored)
would double the ratio.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

from terraformer.bench import axial_shape, lsh_n_buckets
from terraformer.layers.lsh import LSHSelfAttention
from terraformer.models.reformer import ReformerLM
from terraformer.shapes import ShapeDtype
from terraformer.training.optimizers import Adam
from terraformer.training.step import make_train_step


def _step_bytes(length: int) -> int:
    attn = functools.partial(LSHSelfAttention, chunk_len=128, n_hashes=2,
                             n_buckets=lsh_n_buckets(length), n_chunks_before=1)
    model = ReformerLM(vocab_size=32, d_model=32, d_ff=64, d_attention_key=16,
                       d_attention_value=16, n_layers=1, n_heads=2, dropout=0.0,
                       max_len=length, attention_type=attn, pos_type="axial",
                       pos_axial_shape=axial_shape(length), pos_d_axial_embs=(16, 16))
    weights, state = jax.eval_shape(
        lambda: model.init(ShapeDtype((1, length), jnp.int32), jax.random.PRNGKey(0)))
    optimizer = Adam()
    step = make_train_step(model, optimizer, donate=True)
    opt_state = jax.eval_shape(optimizer.init, weights)
    batch = tuple(jax.ShapeDtypeStruct((1, length), t) for t in (jnp.int32, jnp.int32,
                                                                   jnp.float32))
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
    analysis = step.lower(weights, state, opt_state, batch, rng).compile().memory_analysis()
    if analysis is None:
        pytest.skip("memory_analysis is not available on this backend")
    return analysis.temp_size_in_bytes + analysis.argument_size_in_bytes


@pytest.mark.slow
def test_training_step_memory_is_linear_in_length():
    small, large = _step_bytes(32768), _step_bytes(65536)
    # each token costs at least its embedding and stream activations, so the 64K step is
    # well above the 32K one; below 2.1x: no superlinear term
    assert 1.5 < large / small < 2.1, (small, large)
