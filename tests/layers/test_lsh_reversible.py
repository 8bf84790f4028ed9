"""LSH attention in a reversible stack: the backward pass reuses the forward's sort order.

Reference: the same blocks run as an ordinary (non-reversible) computation, differentiated by
JAX, which hashes each layer's true input once.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from terraformer import layers as tl
from terraformer.layers.lsh import LSHSelfAttention
from terraformer.layers.reversible import (
    ReversibleHalfResidual,
    ReversibleRepeat,
    ReversibleSerial,
    ReversibleSwap,
)

D_MODEL, LENGTH = 16, 64


def _block(mask: bool = False):
    attention = LSHSelfAttention(n_heads=2, d_qk=8, d_v=8, causal=True, chunk_len=8,
                                 n_hashes=2, n_buckets=4, use_mask=mask)
    residual = [tl.LayerNorm(), attention]
    feed_forward = [tl.LayerNorm(), tl.Dense(32), tl.Relu(), tl.Dense(D_MODEL)]
    return ReversibleSerial(ReversibleHalfResidual(*residual), ReversibleSwap(),
                            ReversibleHalfResidual(*feed_forward), ReversibleSwap())


def _count(jaxpr, name: str) -> int:
    """How many `name` equations a jaxpr holds, sub-jaxprs included (each counted once)."""
    total = 0
    for eqn in jaxpr.eqns:
        total += eqn.primitive.name == name
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += _count(inner, name)
    return total


def _loss(apply):
    def loss(weights, x):
        y1, y2 = apply((x, x), weights)[:2]
        return jnp.sum(jnp.sin(y1) * y2)

    return loss


@pytest.mark.parametrize("stack", ["repeat", "serial"])
def test_gradients_equal_plain_backprop_and_backward_does_not_sort(seed, stack):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jax.random.normal(keys[0], (1, LENGTH, D_MODEL), jnp.float32)
    if stack == "repeat":
        block = _block()
        rev = ReversibleRepeat(block, 2)
        weights, state = rev.init_weights_and_state(tl.signature((x, x)), keys[1])

        def plain(items, w):
            rngs = jax.random.split(keys[2], 2)
            for i in range(2):
                w_i, s_i = (jax.tree.map(lambda a, i=i: a[i], t) for t in (w, state))
                items = block._forward(items, w_i, s_i, rngs[i])[0]
            return items
    else:
        rev = ReversibleSerial(_block(), _block())
        weights, state = rev.init_weights_and_state(tl.signature((x, x)), keys[1])

        def plain(items, w):
            return rev._forward(items, w, state, keys[2])[0]

    def reversible(items, w):
        return rev.apply(items, w, state, keys[2])[0]

    # Compiled: one program each costs less than dispatching every small op eagerly.
    g_rev = jax.jit(jax.grad(_loss(reversible), argnums=(0, 1)))(weights, x)
    g_ref = jax.jit(jax.grad(_loss(plain), argnums=(0, 1)))(weights, x)
    for a, b in zip(jax.tree.leaves(g_rev), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4, err_msg=f"seed {seed}")

    # Sorts in the whole gradient program: the forward pass's only (one per layer traced;
    # a scanned stack traces its block once). Recomputing would add as many again.
    jaxpr = jax.make_jaxpr(jax.grad(_loss(reversible)))(weights, x).jaxpr
    assert _count(jaxpr, "sort") == (1 if stack == "repeat" else 2)


def test_saved_order_is_the_hash_order_and_masks_apply(seed):
    """`apply_with_saved` on `apply_and_save`'s order equals `apply`, with a mask; and a
    saved order is what a fresh hash gives."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    layer = LSHSelfAttention(n_heads=2, d_qk=8, d_v=8, causal=True, chunk_len=8, n_hashes=2,
                             n_buckets=4, use_mask=True)
    x = jax.random.normal(keys[0], (1, LENGTH - 4, D_MODEL), jnp.float32)  # padded inside
    mask = jax.random.bernoulli(keys[1], 0.8, (1, LENGTH - 4))
    weights, state = layer.init_weights_and_state(tl.signature((x, mask)), keys[2])
    y, _ = layer.apply((x, mask), weights, state, keys[3])
    y_saved, _, perm = layer.apply_and_save((x, mask), weights, state, keys[3])
    assert perm.shape == (1, 2, 2, LENGTH) and perm.dtype == jnp.int32
    np.testing.assert_array_equal(jnp.sort(perm, axis=-1),
                                  jnp.broadcast_to(jnp.arange(LENGTH), perm.shape))
    y_reused, _ = layer.apply_with_saved((x, mask), weights, state, keys[3], perm)
    np.testing.assert_allclose(y_saved, y, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(y_reused, y_saved)
    # Masked positions and the padding sort last in every round.
    n_real = int(mask.sum())
    assert bool(jnp.all(jnp.isin(perm[..., :n_real], jnp.flatnonzero(mask[0]))))
