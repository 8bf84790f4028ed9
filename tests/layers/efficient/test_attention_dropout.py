"""Attention dropout of the block-sparse family, routing and Sinkhorn: none in eval, none at
rate 0, a fresh mask per rng (the same for the same rng), and the eval output on average."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from terraformer.layers.efficient.bigbird import BigBirdAttention
from terraformer.layers.efficient.longformer import LongformerAttention
from terraformer.layers.efficient.routing import RoutingAttention
from terraformer.layers.efficient.sinkhorn import SinkhornAttention
from terraformer.layers.efficient.sparse_transformer import SparseTransformerAttention
from terraformer.shapes import ShapeDtype

COMMON = dict(n_heads=2, d_qk=4, d_v=3)
MECHANISMS = {
    "sparse_transformer": (SparseTransformerAttention, dict(block_len=4, pattern="strided",
                                                            n_summary=2)),
    "sparse_transformer_fixed_causal": (SparseTransformerAttention,
                                        dict(block_len=4, pattern="fixed", n_summary=2,
                                             causal=True)),
    "longformer": (LongformerAttention, dict(block_len=4, window=4, n_global=3)),
    "bigbird": (BigBirdAttention, dict(block_len=4, n_random_blocks=1)),
    "routing": (RoutingAttention, dict(n_clusters=2, chunk_len=4)),
    "sinkhorn": (SinkhornAttention, dict(block_len=4, max_length=32)),
    "sinkhorn_causal": (SinkhornAttention, dict(block_len=4, max_length=32, causal=True)),
}
N_SAMPLES = 96


def _check_dropout(np_rng, name):
    cls, knobs = MECHANISMS[name]
    rate = 0.3
    evaluate = cls(mode="eval", **COMMON, **knobs)
    plain = cls(mode="train", attention_dropout=0.0, **COMMON, **knobs)
    dropping = cls(mode="train", attention_dropout=rate, **COMMON, **knobs)
    x = jnp.asarray(np_rng.normal(size=(1, 16, 8)), jnp.float32)
    w, s = evaluate.init(ShapeDtype(x.shape), jax.random.PRNGKey(int(np_rng.integers(1 << 30))))
    keys = jax.random.split(jax.random.PRNGKey(int(np_rng.integers(1 << 30))), N_SAMPLES)
    keys = keys.at[1].set(keys[0])  # the same rng twice: the same result

    @jax.jit
    def run(x, w, keys):  # one compile per mechanism
        y_eval = evaluate.apply(x, w, s, None)[0]
        y_plain = plain.apply(x, w, s, keys[0])[0]
        ys = jax.vmap(lambda key: dropping.apply(x, w, s, key)[0])(keys)
        return y_eval, y_plain, ys

    y_eval, y_plain, ys = run(x, w, keys)
    np.testing.assert_allclose(y_plain, y_eval, atol=1e-6)  # rate 0: no dropout
    np.testing.assert_array_equal(ys[1], ys[0])
    single = float(jnp.mean(jnp.abs(ys - y_eval)))
    assert single > 1e-2, single  # the rate > 0 does drop
    assert float(jnp.max(jnp.abs(ys[2] - ys[0]))) > 1e-3  # another rng, another mask
    # Kept weights are scaled by 1 / (1 - rate): the mean over many masks approaches the eval
    # output, its error falling about as 1 / sqrt(N_SAMPLES) (~0.1) of one sample's. Without
    # the rescaling (or with the streams' normalisers dropped too) it stays biased.
    mean = float(jnp.mean(jnp.abs(jnp.mean(ys, axis=0) - y_eval)))
    assert mean < 0.3 * single, (mean, single)
    with pytest.raises(ValueError, match="attention_dropout in train mode needs an rng"):
        dropping.apply(x, w, s, None)


@pytest.mark.parametrize("name", [
    "sparse_transformer",
    pytest.param("longformer", marks=pytest.mark.slow),
    pytest.param("sinkhorn_causal", marks=pytest.mark.slow),
    pytest.param("sparse_transformer_fixed_causal", marks=pytest.mark.slow),
    pytest.param("bigbird", marks=pytest.mark.slow),
    pytest.param("routing", marks=pytest.mark.slow),
    pytest.param("sinkhorn", marks=pytest.mark.slow),
])
def test_attention_dropout(np_rng, name):
    _check_dropout(np_rng, name)


def test_attention_dropout_is_a_checked_rate():
    for cls, knobs in MECHANISMS.values():
        with pytest.raises(ValueError, match=r"attention_dropout must be in \[0.0, 1.0\)"):
            cls(attention_dropout=1.0, **COMMON, **knobs)
