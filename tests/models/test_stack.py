"""The models' shared stack builder: chunked feed-forward, repeat-or-serial, stream merge,
and the Terraformer's sparse choices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from terraformer import layers as tl
from terraformer.layers.attention import SelfAttention
from terraformer.layers.feedforward import FeedForward
from terraformer.layers.reversible import ReversibleRepeat, ReversibleSerial
from terraformer.layers.sparsity import MultiplicativeConvCausalAttention, SparseFF
from terraformer.models.reformer import ReformerLM
from terraformer.models.stack import feed_forward_builder, merge_streams, reversible_stack
from terraformer.models.terraformer import sparse_layers


def _chunked_feed_forward(d_ff, ff_chunk_size, activation=tl.FastGelu, mode="train"):
    """The dense feed-forward as the models build it, chunked over `ff_chunk_size` positions."""
    return feed_forward_builder(d_ff, dropout=0.0, activation=activation,
                                ff_chunk_size=ff_chunk_size)(mode)


@pytest.mark.parametrize("length,chunk", [(24, 8), (29, 8), (5, 8)])
def test_chunked_equals_unchunked(length, chunk, seed):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(2, length, 16)), jnp.float32)
    cotangent = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    whole = FeedForward(32, activation=tl.Relu, mode="eval")
    chunked = _chunked_feed_forward(32, ff_chunk_size=chunk, activation=tl.Relu, mode="eval")
    weights, state = whole.init(tl.signature(x), jax.random.PRNGKey(seed))
    w_chunked, _ = chunked.init(tl.signature(x), jax.random.PRNGKey(seed))
    assert jax.tree.structure(w_chunked) == jax.tree.structure(weights)

    y_whole, _ = whole.apply(x, weights, state, None)
    y_chunked, _ = chunked.apply(x, weights, state, None)
    np.testing.assert_allclose(y_chunked, y_whole, rtol=1e-6, atol=1e-6, err_msg=f"seed {seed}")

    def loss(layer):
        return lambda w, x_: jnp.sum(layer.apply(x_, w, state, None)[0] * cotangent)

    g_whole = jax.grad(loss(whole), argnums=(0, 1))(weights, x)
    g_chunked = jax.grad(loss(chunked), argnums=(0, 1))(weights, x)
    for a, b in zip(jax.tree.leaves(g_chunked), jax.tree.leaves(g_whole), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=f"seed {seed}")


def test_chunk_size_zero_is_the_plain_block():
    block = _chunked_feed_forward(8, ff_chunk_size=0)
    assert block.name == "FeedForward"
    assert _chunked_feed_forward(8, ff_chunk_size=4).name == "Chunk"
    with pytest.raises(ValueError, match="ff_chunk_size"):
        _chunked_feed_forward(8, ff_chunk_size=-1)


def test_chunking_bounds_hidden_memory():
    """The [batch, length, d_ff] hidden activation is only ever [batch, chunk, d_ff]."""
    d_model, d_ff, length, chunk = 16, 256, 4096, 256
    sig = tl.ShapeDtype((1, length, d_model))

    def temp_bytes(layer):
        w, s = layer.init_weights_and_state(sig, jax.random.PRNGKey(0))
        grad = jax.jit(jax.grad(lambda w_, x: jnp.sum(jnp.sin(layer.apply(x, w_, s, None)[0]))))
        compiled = grad.lower(w, jnp.zeros(sig.shape)).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    hidden_bytes = length * d_ff * 4  # 4 MiB
    whole = temp_bytes(FeedForward(d_ff, activation=tl.Relu, mode="eval"))
    chunked = temp_bytes(_chunked_feed_forward(d_ff, chunk, activation=tl.Relu, mode="eval"))
    assert whole >= hidden_bytes, whole
    assert chunked < whole / 2, (chunked, whole)


def test_custom_feed_forward_type_is_called_and_chunked():
    calls = []

    def custom(d_ff, dropout=0.0, mode="train"):
        calls.append((d_ff, dropout, mode))
        return FeedForward(d_ff, dropout=dropout, mode=mode)

    make = feed_forward_builder(12, dropout=0.25, ff_chunk_size=4, feed_forward_type=custom)
    layer = make("eval")
    assert calls == [(12, 0.25, "eval")]
    assert layer.name == "Chunk" and layer.sublayers[0].name == "FeedForward"


def _block(attention_type):
    """A reversible block whose only trace of its attention type is a Dense's width."""
    return ReversibleSerial(tl.ReversibleHalfResidual(tl.Dense(attention_type.width)),
                            tl.ReversibleSwap())


class _Width:
    def __init__(self, width):
        self.width = width


def test_reversible_stack_repeats_one_constructor_else_serial():
    a, b = _Width(4), _Width(4)
    assert reversible_stack(_block, a, 0, "eval") == []
    for types, n_layers in ((a, 3), ([a], 3), ([a, a], 3), ([a, b], 1)):
        stack = reversible_stack(_block, types, n_layers, "eval")
        assert isinstance(stack, ReversibleRepeat) and stack.n_layers == n_layers, types
    # Equal-looking but distinct constructors are different layers: no weight sharing of body.
    stack = reversible_stack(_block, [a, b], 3, "eval")
    assert isinstance(stack, ReversibleSerial) and len(stack.sublayers) == 3
    with pytest.raises(ValueError, match="n_layers"):
        reversible_stack(_block, a, -1, "eval")
    with pytest.raises(ValueError, match="attention_type"):
        reversible_stack(_block, [], 2, "eval")


def test_reversible_stack_weights_per_layer(seed):
    """Repeat stacks the block's weights on a layer axis; Serial keeps a tuple per layer."""
    x = tl.ShapeDtype((2, 3, 4))
    repeat = reversible_stack(_block, _Width(4), 3, "eval")
    w, _ = repeat.init((x, x), jax.random.PRNGKey(seed))
    # (HalfResidual: (Dense,), Swap: ()), each leaf with a leading axis of 3 layers.
    assert jax.tree.map(lambda a: a.shape, w) == ((({"w": (3, 4, 4), "b": (3, 4)},),), ())
    serial = reversible_stack(_block, [_Width(4), _Width(4)], 3, "eval")
    w, _ = serial.init((x, x), jax.random.PRNGKey(seed))
    assert len(w) == 3 and all(wi[0][0][0]["w"].shape == (4, 4) for wi in w)


def test_merge_streams(np_rng):
    x1, x2 = (jnp.asarray(np_rng.normal(size=(2, 3, 4)), jnp.float32) for _ in range(2))
    avg, _ = merge_streams("average").apply((x1, x2), (), (), None)
    np.testing.assert_allclose(avg, (np.asarray(x1) + np.asarray(x2)) / 2, rtol=1e-6)
    cat, _ = merge_streams("concatenate").apply((x1, x2), (), (), None)
    np.testing.assert_array_equal(cat, np.concatenate([x1, x2], -1))
    with pytest.raises(ValueError, match="output_merge"):
        merge_streams("sum")


def test_reformer_lm_with_a_list_of_one_type_repeats():
    local = functools.partial(SelfAttention, chunk_len=4, n_chunks_before=1)
    model = ReformerLM(11, d_model=8, d_ff=16, n_layers=2, n_heads=1, d_attention_key=4,
                       d_attention_value=4, attention_type=[local], mode="eval")
    assert any(isinstance(layer, ReversibleRepeat) for layer in model.sublayers)


def test_terraformer_sparse_layers_choose_what_chunks():
    kw = dict(attention_sparsity=4, length_kernel_size=3, d_lowrank=4, temperature=0.1,
              quant_prob=0.3, ff_chunk_size=6)
    local = functools.partial(SelfAttention, chunk_len=4)
    dense = sparse_layers(local, ff_sparsity=0, **kw)
    assert dense == dict(attention_type=local, feed_forward_type=None, ff_chunk_size=6)
    sparse = sparse_layers(None, ff_sparsity=8, **kw)
    assert sparse["ff_chunk_size"] == 0  # the sparse block chunks itself
    assert sparse["attention_type"].func is MultiplicativeConvCausalAttention
    assert sparse["attention_type"].keywords["sparsity"] == 4
    block = sparse["feed_forward_type"](16, dropout=0.0, mode="eval")
    assert block.name == "SparseFeedForward" and isinstance(block.sublayers[1], SparseFF)
