"""In-place reversal of a reversible half-residual on long sequences.

`ReversibleHalfResidual.reverse_and_grad` rebuilds `x1 = y1 - F(x2)` and pulls the gradient
`g1` back through `F`. Written as one `jax.vjp` of `F`, its backward pass holds, beside the
four streams `(y1, x2, g1, g2)`, `F`'s whole output, the rebuilt `x1`, `F`'s saved
intermediates (a LayerNorm's output) and the gradient of `x2` before it is added to `g2`:
each a `[batch, length, d_model]` array. At a million tokens those were most of the step's
peak memory. For two residuals of the Reformer this module does the same arithmetic without
them:

- a position-wise `Chunk(layer)` (the chunked feed-forward): a loop over the chunks of
  positions that, per chunk, recomputes the layer, subtracts its output from `y1` in place,
  and adds its input gradient into `g2` in place (`chunked_reverse_and_grad`);
- `LayerNorm, LSHSelfAttention, Dropout` on inputs long enough that the attention runs one
  head at a time (`lsh.by_head_applies`): a loop over heads that, per head, projects the
  normalised input by chunks of positions, attends (its hash rounds one at a time, as
  `lsh.attend_one_head`), subtracts the head's output projection from `y1` in place, adds the
  head's input gradient (through the LayerNorm, recomputed by chunks) into `g2` in place
  (`lsh_reverse_and_grad`). The residual's output is linear in its heads, and its input
  gradient linear in theirs, so summing per head is exact up to float round-off.

So only the four streams and one head's (or one chunk's) working arrays are alive. The
forward pass (`lean_apply`: `lsh_forward`, `chunked_forward`) adds each head's or chunk's
output into `x1`'s buffer the same way, beside only the two streams. The
results equal the `jax.vjp` path's up to float round-off (summation order); the hash
rotations, dropout keys and per-chunk keys are the ones the forward pass drew.
`lean_reverse_and_grad` returns None for any other residual, or when these conditions do not
hold, and the caller takes the `jax.vjp` path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from terraformer.layers.base import split_rng
from terraformer.layers.combinators import Chunk
from terraformer.layers.core import Dropout, LayerNorm
from terraformer.layers.lsh import (
    LSHSelfAttention,
    attend_one_head,
    by_head_applies,
    random_rotations,
    resolve_n_buckets,
)

__all__ = ["POSITION_CHUNK", "chunked_forward", "chunked_reverse_and_grad", "lean_apply",
           "lean_reverse_and_grad", "lsh_forward", "lsh_reverse_and_grad"]

# Positions per chunk of the per-head projections: [batch, POSITION_CHUNK, d_model] arrays.
POSITION_CHUNK = 8192


def _slice(a, start, size):
    return lax.dynamic_slice_in_dim(a, start, size, axis=1)


def _put(a, part, start):
    return lax.dynamic_update_slice_in_dim(a, part.astype(a.dtype), start, axis=1)


def _over_chunks(body, carry, length: int, size: int):
    """`body(carry, start)` for start = 0, size, 2 size, ... < length (a `fori_loop`)."""
    n = length // size
    if n == 1:
        return body(carry, 0)
    return lax.fori_loop(0, n, lambda i, c: body(c, i * size), carry)


def _position_chunk(length: int, target: int = POSITION_CHUNK) -> int:
    size = min(length, target)
    return size if length % size == 0 else length


def _tree_add(a, b):
    return jax.tree.map(lambda x, y: x + y.astype(x.dtype), a, b)


def _zeros_like(tree):
    return jax.tree.map(jnp.zeros_like, tree)


# -- a chunked position-wise residual ----------------------------------------------------------


def chunked_reverse_and_grad(chunk: Chunk, weights, state, rng, y1, x2, g1, g2):
    """For the residual `Chunk(layer)` (one input, one output, length a multiple of its
    chunk size): `(x1, g2 + dF/dx2^T g1, dF/dw^T g1)`, chunk by chunk in place. Chunk i
    gets `split(rng, n_chunks)[i]`, as `Chunk.apply` gives it."""
    layer = chunk.sublayers[0]
    length, size = x2.shape[1], chunk._chunk_size
    rngs = None if rng is None else jax.random.split(rng, length // size)

    def body(carry, start):
        y1, g2, g_w = carry
        r = None if rngs is None else rngs[start // size]

        def f(w, x):
            return layer.apply(x, w, state, r)[0]

        res, vjp = jax.vjp(f, weights, _slice(x2, start, size))
        g_w_c, g_x = vjp(_slice(g1, start, size).astype(res.dtype))
        y1 = _put(y1, _slice(y1, start, size) - res.astype(y1.dtype), start)
        g2 = _put(g2, _slice(g2, start, size) + g_x.astype(g2.dtype), start)
        return y1, g2, _tree_add(g_w, g_w_c)

    return _over_chunks(body, (y1, g2, _zeros_like(weights)), length, size)


def _chunk_applies(residual, x2) -> bool:
    layers = residual.sublayers
    if len(layers) != 1 or not isinstance(layers[0], Chunk):
        return False
    chunk = layers[0]
    size, length = chunk._chunk_size, x2.shape[1]
    return (chunk.n_in == 1 and chunk.n_out == 1 and bool(size) and length > size
            and length % size == 0)


# -- LayerNorm, LSH attention, Dropout ---------------------------------------------------------


def _lsh_applies(residual, x2, rng) -> bool:
    layers = residual.sublayers
    if len(layers) != 3 or rng is None:
        return False
    norm, attn, drop = layers
    if not (isinstance(norm, LayerNorm) and type(attn) is LSHSelfAttention
            and isinstance(drop, Dropout)):
        return False
    batch, length = x2.shape[:2]
    return (attn.mode == "train" and attn.n_in == 1 and attn.output_dropout == 0.0
            and drop._rate == 0.0 and not (attn.hash_per_example and batch > 1)
            and attn._projects_by_head(x2)
            and by_head_applies(batch, attn.n_heads, attn.n_hashes, length))


def _lsh_setup(norm, attn, norm_w, attn_w, norm_s, rng, x2):
    """What both walks share: the per-head weights and rotations (scanned over), one head's
    attention `(q, v, rotations_h, index) -> (out, lse)`, the chunk projection
    `(norm_w, w_qk_h, w_v_h, x_chunk) -> (q, v)` and the chunk size."""
    r_norm, r_attn_layer, _ = split_rng(rng, 3)
    r_hash, r_attn, _ = jax.random.split(r_attn_layer, 3)
    length, d_model = x2.shape[1:]
    h, d_qk, d_v = attn.n_heads, attn.d_qk, attn.d_v
    n_buckets = resolve_n_buckets(attn.n_buckets, length, attn.chunk_len,
                                  attn._bucket_length(length))
    rotations = random_rotations(r_hash, d_qk, n_buckets, attn.n_hashes, h)
    config = dict(n_buckets=n_buckets, chunk_len=attn.chunk_len,
                  n_chunks_before=attn.n_chunks_before, n_chunks_after=attn.n_chunks_after,
                  causal=attn.causal, dropout_rate=float(attn.attention_dropout),
                  chunks_per_block=attn.chunks_per_block, qk_scale=attn.qk_scale)
    dropout_rng = r_attn if attn.attention_dropout > 0.0 else None
    per_head = (attn_w["w_qk"].reshape(d_model, h, d_qk).transpose(1, 0, 2),
                attn_w["w_v"].reshape(d_model, h, d_v).transpose(1, 0, 2),
                attn_w["w_o"].reshape(h, d_v, d_model), rotations,
                jnp.arange(h, dtype=jnp.int32))

    def project(n_w, w_qk, w_v, x):  # x [batch, size, d_model] -> q, v of one head
        xn = norm.apply(x, n_w, norm_s, r_norm)[0]
        return jnp.dot(xn, w_qk.astype(xn.dtype)), jnp.dot(xn, w_v.astype(xn.dtype))

    def one_head(q, v, rotations_h, index):
        return attend_one_head(q, v, None, rotations_h, dropout_rng, index, x2.dtype, config)

    return per_head, one_head, project, _position_chunk(length)


def lsh_forward(norm, attn, weights, state, rng, x1, x2):
    """`x1 + F(x2)` for the residual of `lsh_reverse_and_grad`, head by head into `x1`'s
    buffer: no `[batch, length, d_model]` array beside the two streams (the LayerNorm's
    output only by chunks of positions)."""
    (norm_w, attn_w, _), (norm_s, _, _) = weights, state
    batch, length, _ = x2.shape
    per_head, one_head, project, size = _lsh_setup(norm, attn, norm_w, attn_w, norm_s, rng,
                                                   x2)
    dtype = x2.dtype

    def head(y1, args):
        w_qk, w_v, w_o, rotations_h, index = args

        def project_chunk(qv, start):
            q_c, v_c = project(norm_w, w_qk, w_v, _slice(x2, start, size))
            return _put(qv[0], q_c, start), _put(qv[1], v_c, start)

        qv = (jnp.zeros((batch, length, attn.d_qk), dtype),
              jnp.zeros((batch, length, attn.d_v), dtype))
        q, v = _over_chunks(project_chunk, qv, length, size)
        out, _ = one_head(q, v, rotations_h, index)
        w_o_c = w_o.astype(out.dtype)

        def output_chunk(y1, start):
            o_c = _slice(out, start, size)
            return _put(y1, _slice(y1, start, size) + jnp.dot(o_c, w_o_c).astype(y1.dtype),
                        start)

        return _over_chunks(output_chunk, y1, length, size), None

    y1, _ = lax.scan(head, x1, per_head)
    if "b_o" in attn_w:
        y1 = y1 + lax.broadcast_to_rank(attn_w["b_o"].astype(y1.dtype), y1.ndim)
    return y1


def chunked_forward(chunk: Chunk, weights, state, rng, x1, x2):
    """`x1 + Chunk(layer)(x2)`, chunk by chunk into `x1`'s buffer (the keys as
    `Chunk.apply` gives them)."""
    layer = chunk.sublayers[0]
    length, size = x2.shape[1], chunk._chunk_size
    rngs = None if rng is None else jax.random.split(rng, length // size)

    def body(y1, start):
        r = None if rngs is None else rngs[start // size]
        res = layer.apply(_slice(x2, start, size), weights, state, r)[0]
        return _put(y1, _slice(y1, start, size) + res.astype(y1.dtype), start)

    return _over_chunks(body, x1, length, size)


def lsh_reverse_and_grad(norm, attn, weights, state, rng, y1, x2, g1, g2):
    """For the residual `Serial(LayerNorm, LSHSelfAttention, Dropout(0))` on an input that
    runs one head at a time: `(x1, g2 + dF/dx2^T g1, dF/dw^T g1)`, head by head in place.

    The hash rotations and the attention-dropout key come from `rng` as in
    `LSHSelfAttention.apply` (train mode), and each head is `lsh.attend_one_head`, as in its
    by-head forward pass.
    """
    (norm_w, attn_w, drop_w), (norm_s, _, _) = weights, state
    batch, length, d_model = x2.shape
    h, d_qk, d_v = attn.n_heads, attn.d_qk, attn.d_v
    per_head, one_head, project, size = _lsh_setup(norm, attn, norm_w, attn_w, norm_s, rng,
                                                   x2)
    dtype = x2.dtype

    def head(carry, args):
        y1, g2, g_norm = carry
        w_qk, w_v, w_o, rotations_h, index = args

        def project_chunk(qv, start):
            q_c, v_c = project(norm_w, w_qk, w_v, _slice(x2, start, size))
            return _put(qv[0], q_c, start), _put(qv[1], v_c, start)

        qv = (jnp.zeros((batch, length, d_qk), dtype), jnp.zeros((batch, length, d_v), dtype))
        q, v = _over_chunks(project_chunk, qv, length, size)
        (out, lse), attend_vjp = jax.vjp(
            lambda q_, v_: one_head(q_, v_, rotations_h, index), q, v)
        w_o_c = w_o.astype(out.dtype)

        def output_chunk(carry, start):  # y1 -= out @ w_o; g_out = g1 @ w_o^T; d w_o
            y1, g_out, g_w_o = carry
            o_c, g1_c = _slice(out, start, size), _slice(g1, start, size).astype(out.dtype)
            y1 = _put(y1, _slice(y1, start, size) - jnp.dot(o_c, w_o_c).astype(y1.dtype),
                      start)
            g_out = _put(g_out, jnp.dot(g1_c, w_o_c.T), start)
            g_w_o = g_w_o + jnp.einsum("bld,blm->dm", o_c, g1_c).astype(g_w_o.dtype)
            return y1, g_out, g_w_o

        y1, g_out, g_w_o = _over_chunks(
            output_chunk, (y1, jnp.zeros_like(out), jnp.zeros_like(w_o)), length, size)
        g_q, g_v = attend_vjp((g_out, jnp.zeros_like(lse)))

        def input_chunk(carry, start):  # through the projections and the LayerNorm
            g2, g_norm, g_w_qk, g_w_v = carry
            _, vjp = jax.vjp(project, norm_w, w_qk, w_v, _slice(x2, start, size))
            g_n, g_qk_c, g_v_c, g_x = vjp((_slice(g_q, start, size),
                                           _slice(g_v, start, size)))
            g2 = _put(g2, _slice(g2, start, size) + g_x.astype(g2.dtype), start)
            return (g2, _tree_add(g_norm, g_n), g_w_qk + g_qk_c.astype(g_w_qk.dtype),
                    g_w_v + g_v_c.astype(g_w_v.dtype))

        g2, g_norm, g_w_qk, g_w_v = _over_chunks(
            input_chunk, (g2, g_norm, jnp.zeros_like(w_qk), jnp.zeros_like(w_v)), length, size)
        return (y1, g2, g_norm), (g_w_qk, g_w_v, g_w_o)

    (y1, g2, g_norm), (g_w_qk, g_w_v, g_w_o) = lax.scan(
        head, (y1, g2, _zeros_like(norm_w)), per_head)
    g_attn = {"w_qk": g_w_qk.transpose(1, 0, 2).reshape(d_model, h * d_qk),
              "w_v": g_w_v.transpose(1, 0, 2).reshape(d_model, h * d_v),
              "w_o": g_w_o.reshape(h * d_v, d_model)}
    if "b_o" in attn_w:
        y1 = y1 - lax.broadcast_to_rank(attn_w["b_o"].astype(y1.dtype), y1.ndim)
        g_attn["b_o"] = jnp.sum(g1, axis=(0, 1)).astype(attn_w["b_o"].dtype)
    g_attn = {k: g_attn[k].astype(attn_w[k].dtype) for k in attn_w}
    return y1, g2, (g_norm, g_attn, _zeros_like(drop_w))


# -- dispatch ----------------------------------------------------------------------------------


def lean_apply(residual, weights, state, rng, x1, x2):
    """`x1 + F(x2)` by one of the in-place forward walks for the residual `Serial` of a
    `ReversibleHalfResidual` with one context item `x2`, where `lean_reverse_and_grad` walks
    it backwards; None elsewhere (the caller applies the residual whole)."""
    if residual.n_in != 1 or residual.n_out != 1 or x2.ndim != 3 or x1.shape != x2.shape:
        return None
    if _chunk_applies(residual, x2):
        return chunked_forward(residual.sublayers[0], weights[0], state[0],
                               split_rng(rng, 1)[0], x1, x2)
    if _lsh_applies(residual, x2, rng):
        norm, attn, _ = residual.sublayers
        return lsh_forward(norm, attn, weights, state, rng, x1, x2)
    return None


def lean_reverse_and_grad(residual, weights, state, rng, y1, x2, g1, g2):
    """`(x1, new g2, residual weight gradient)` by one of the in-place walks above for the
    residual `Serial` of a `ReversibleHalfResidual` with one context item `x2`; None when
    neither applies (the caller then differentiates the residual whole)."""
    if residual.n_in != 1 or residual.n_out != 1 or x2.ndim != 3 or y1.shape != x2.shape:
        return None
    if _chunk_applies(residual, x2):
        r = split_rng(rng, 1)[0]
        y1, g2, g_w = chunked_reverse_and_grad(residual.sublayers[0], weights[0], state[0], r,
                                               y1, x2, g1, g2)
        return y1, g2, (g_w,)
    if _lsh_applies(residual, x2, rng):
        norm, attn, _ = residual.sublayers
        return lsh_reverse_and_grad(norm, attn, weights, state, rng, y1, x2, g1, g2)
    return None
