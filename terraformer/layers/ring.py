"""Attention over a sequence split across the mesh's ``sequence`` axis (shard_map + ppermute).

Each device holds a contiguous shard of ``length / P`` positions of every sequence (``P`` the
size of the axis) and keeps its queries; only keys and values travel, passed to the next
device with `lax.ppermute`. Two kernels, both on `attention_core.blocked_attention` (exact
softmax attention with a recompute-in-backward gradient, returning each query's
log-sum-exp):

- `ring_attention` (Liu et al., 2023): full attention. In ``P`` rounds every device attends
  its queries to the key/value shard it holds, then passes that shard round the ring and
  receives the previous one's. The partial results are merged by their log-sum-exp, so the
  result is the softmax over the whole sequence::

      lse = logaddexp(lse_a, lse_b);  out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)

  No device ever holds more than two shards of keys and values, so the attended context grows
  with the number of devices. Within a round the shard is cut in chunks of ``chunk_len``
  queries, each over the whole key shard, so a round's scores exist a block of chunks at a
  time, never shard x shard (the blockwise algorithm within the shard). With ``causal``, a key
  after a query (by global position) is masked; a shard of keys wholly after a shard of
  queries contributes nothing (its log-sum-exp is MASK_VALUE, its weight exp(-1e9) = 0), and
  the diagonal shard always has a visible key.
- `halo_attention`: chunked local attention (`attention.local_attention`: queries of chunk c
  see chunks c - n_chunks_before ... c + n_chunks_after). A full ring would pass every shard
  to every device for nothing: each device needs only the last ``n_chunks_before`` chunks of
  keys and values of the previous device and the first ``n_chunks_after`` of the next (a halo
  exchange, one ppermute each way). As on one device, the sequence wraps (the first shard's
  halo is the last shard's tail; causal masking hides it).

Both give the one-device result in value and gradient (the gradient of ppermute is the
reverse ppermute); attention dropout draws its masks per device (and per ring round) from the
layer's rng, so they differ from one device's masks but have the same distribution.

    out = ring_attention(q, k, v, mesh, causal=True)   # q, k, v: [batch, heads, length, d]
    out = halo_attention(q, k, v, mesh, chunk_len=128, n_chunks_before=1, causal=True)

`attention.SelfAttention` (and so ``attention_type`` 'full', 'blockwise', 'local' and 'ring')
calls these in train and eval modes when the mesh in effect (``jax.set_mesh``, which the
train and eval steps enter on a mesh) has a ``sequence`` axis of several devices.

LSH attention has no sequence-parallel form here. Its chunks are cut from the sequence sorted
by hash bucket, an order that mixes positions from every shard and changes with every input
and hash round. An exact distributed version needs a global sort per hash round (each element's
rank from all devices' bucket histograms, then the elements moved to the device that holds their
rank: either an all-to-all whose buffers must allow one device receiving the whole sequence, or
P rounds of ppermute, each device passing every shard round the ring as ring attention does)
and the same again to undo it, for queries/keys, values and their gradients. That moves
2 x n_hashes times the bytes ring attention moves, for attention that is local after the sort,
and is not built. `layers.lsh.LSHSelfAttention` on a ``sequence`` axis of several devices is
left to XLA's SPMD partitioner: it trains with the one-device losses; a sort along a sharded
axis is expected to be gathered whole, so expect little memory saved per device (not yet
measured). With LSH, split the batch and weights over ``data``, ``fsdp`` and ``model`` instead
(the memory-efficient trainer takes a 1M-token sequence on one device), or make the layer
sequence-parallel by choosing 'local', 'blockwise' or 'ring' attention.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

from terraformer.layers.attention_core import blocked_attention

__all__ = ["RING_CHUNK_LEN", "halo_attention", "ring_attention", "sequence_shards"]

# Queries per chunk within a round: a chunk's scores over a whole key shard are chunk x shard.
RING_CHUNK_LEN = 256


def sequence_shards(axis: str = "sequence") -> int:
    """The size of ``axis`` in the mesh in effect (``jax.set_mesh``); 1 without one."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else int(dict(mesh.shape).get(axis, 1))


def _merge(out_a, lse_a, out_b, lse_b):
    lse = jnp.logaddexp(lse_a, lse_b)
    out = out_a * jnp.exp(lse_a - lse)[..., None] + out_b * jnp.exp(lse_b - lse)[..., None]
    return out, lse


def _in_chunks(q, k, v, key_mask, me, c: int):
    """One device's shard in chunks: q, k, v ``(b*h, s/c, c, d)`` float32 and the global
    positions of its queries and keys ``(b*h, s/c, c)`` (a padding key's is -1)."""
    b, h, s, _ = q.shape
    shape = (b * h, s // c, c)
    chunks = lambda x: x.reshape(*shape, x.shape[-1]).astype(jnp.float32)  # noqa: E731
    positions = me * s + jnp.arange(s, dtype=jnp.int32)
    q_pos = jnp.broadcast_to(positions.reshape(1, *shape[1:]), shape)
    if key_mask is None:
        k_pos = q_pos
    else:  # a padding key's position is -1: never attended to
        k_pos = jnp.where(key_mask.astype(bool), positions, -1)
        k_pos = jnp.broadcast_to(k_pos[:, None], (b, h, s)).reshape(shape)
    return chunks(q), chunks(k), chunks(v), q_pos, k_pos


def _ring_shard(q, k, v, key_mask, rng, *, axis: str, causal: bool, scale: float,
                chunk_len: int, dropout_rate: float):
    """One device's part of `ring_attention`: q, k, v ``[batch, heads, length / P, d]``,
    key_mask ``[batch, length / P]`` or None."""
    n_shards = lax.axis_size(axis)
    me = lax.axis_index(axis)
    b, h, s, _ = q.shape
    c = chunk_len if s % chunk_len == 0 else s
    qf, kf, vf, q_pos, k_pos = _in_chunks(q, k, v, key_mask, me, c)
    out = lse = None
    perm = [(i, (i + 1) % n_shards) for i in range(n_shards)]
    for step in range(n_shards):
        drop = {} if rng is None else dict(
            dropout_rate=dropout_rate,
            dropout_rng=jax.random.fold_in(jax.random.fold_in(rng, me), step))
        o, l = blocked_attention(qf, kf, vf, q_pos, k_pos, offsets=range(s // c),
                                 scale=scale, causal=causal, wrap=True, **drop)
        out, lse = (o, l) if out is None else _merge(out, lse, o, l)
        if step + 1 < n_shards:  # pass the key/value shard on round the ring
            kf, vf, k_pos = (lax.ppermute(x, axis, perm) for x in (kf, vf, k_pos))
    return out.reshape(b, h, s, -1).astype(v.dtype)


def _halo_shard(q, k, v, key_mask, rng, *, axis: str, causal: bool, scale: float,
                chunk_len: int, before: int, after: int, dropout_rate: float):
    """One device's part of `halo_attention` (shapes as `_ring_shard`)."""
    n_shards = lax.axis_size(axis)
    me = lax.axis_index(axis)
    b, h, s, _ = q.shape
    m = s // chunk_len
    qf, kf, vf, q_pos, k_pos = _in_chunks(q, k, v, key_mask, me, chunk_len)
    keys = [kf, vf, k_pos]
    parts = [keys]
    if before:  # my last chunks are the next device's look-back (the last's: the first's)
        to_next = [(i, (i + 1) % n_shards) for i in range(n_shards)]
        parts.insert(0, [lax.ppermute(x[:, m - before:], axis, to_next) for x in keys])
    if after:  # my first chunks are the previous device's look-ahead
        to_prev = [(i, (i - 1) % n_shards) for i in range(n_shards)]
        parts.append([lax.ppermute(x[:, :after], axis, to_prev) for x in keys])
    k_ext, v_ext, kp_ext = (jnp.concatenate(xs, axis=1) for xs in zip(*parts))
    # Query chunk j's window is chunks j ... j + before + after of the extended keys.
    drop = {} if rng is None else dict(dropout_rate=dropout_rate,
                                       dropout_rng=jax.random.fold_in(rng, me))
    out, _ = blocked_attention(qf, k_ext, v_ext, q_pos, kp_ext,
                               offsets=range(before + after + 1), scale=scale, causal=causal,
                               wrap=True, **drop)
    return out.reshape(b, h, s, -1).astype(v.dtype)


def _over_sequence(fn, who, q, k, v, mesh, axis, batch_axes, key_mask, dropout_rate,
                   dropout_rng):
    """``fn(q, k, v, key_mask, rng)`` on each device's shard: batch over ``batch_axes``,
    heads over ``model`` where it divides them, length over ``axis``."""
    n = mesh.shape[axis]
    if q.shape[2] % n:
        raise ValueError(f"{who}: the length ({q.shape[2]}) must be a multiple of the {axis} "
                         f"axis ({n})")
    if dropout_rate > 0.0 and dropout_rng is None:
        raise ValueError(f"{who}: dropout_rate > 0 needs a dropout_rng")
    if batch_axes is None:
        batch_axes = tuple(a for a in ("data", "fsdp") if a in mesh.shape)
    heads = "model" if mesh.shape.get("model", 1) > 1 and \
        q.shape[1] % mesh.shape["model"] == 0 else None
    spec = PartitionSpec(batch_axes or None, heads, axis, None)
    args, specs = [q, k, v], [spec, spec, spec]
    if key_mask is not None:
        args.append(key_mask)
        specs.append(PartitionSpec(batch_axes or None, axis))
    rng = dropout_rng if dropout_rate > 0.0 else None
    if rng is not None:
        args.append(rng)
        specs.append(PartitionSpec())

    def body(q, k, v, *rest):
        rest = list(rest)
        mask = rest.pop(0) if key_mask is not None else None
        return fn(q, k, v, mask, rest.pop(0) if rng is not None else None)

    return jax.shard_map(body, mesh=mesh, in_specs=tuple(specs), out_specs=spec,
                         check_vma=False)(*args)


def ring_attention(q, k, v, mesh, *, causal: bool = False, axis: str = "sequence",
                   batch_axes=None, key_mask=None, chunk_len: int = RING_CHUNK_LEN,
                   dropout_rate: float = 0.0, dropout_rng=None):
    """Softmax attention of ``q`` on ``k``/``v`` with the length split over ``axis``.

    Args:
      q, k: ``[batch, heads, length, d_qk]``; v: ``[batch, heads, length, d_v]``; length a
        multiple of the axis size.
      mesh: the `jax.sharding.Mesh` (or `AbstractMesh`) holding ``axis``.
      causal: a query sees only keys at or before its position.
      batch_axes: mesh axes the batch is split over (default: ``data`` and ``fsdp`` where
        the mesh has them). Heads go over ``model`` where the mesh has it and it divides them.
      key_mask: bool ``[batch, length]`` (True = a real token) or None.
      chunk_len: queries per chunk within a round (the whole shard when it does not divide it).
      dropout_rate, dropout_rng: dropout on the attention weights when the rate is > 0.
    Returns:
      ``[batch, heads, length, d_v]`` in v's dtype, laid out as ``q``.
    """
    fn = functools.partial(_ring_shard, axis=axis, causal=causal,
                           scale=1.0 / float(q.shape[-1]) ** 0.5, chunk_len=int(chunk_len),
                           dropout_rate=float(dropout_rate))
    return _over_sequence(fn, "ring_attention", q, k, v, mesh, axis, batch_axes, key_mask,
                          dropout_rate, dropout_rng)


def halo_attention(q, k, v, mesh, *, chunk_len: int, n_chunks_before: int = 0,
                   n_chunks_after: int = 0, causal: bool = False, axis: str = "sequence",
                   batch_axes=None, key_mask=None, dropout_rate: float = 0.0,
                   dropout_rng=None):
    """`attention.local_attention` (wrapping, as `SelfAttention` runs it) with the length
    split over ``axis``: each device exchanges only its edge chunks with its neighbours.

    Args:
      q, k: ``[batch, heads, length, d_qk]``; v: ``[batch, heads, length, d_v]``; each
        device's shard (length / axis size) a multiple of ``chunk_len``.
      chunk_len, n_chunks_before, n_chunks_after: the window of `local_attention`; each of
        n_chunks_before and n_chunks_after at most the chunks of one shard.
      mesh, causal, axis, batch_axes, key_mask, dropout_rate, dropout_rng: as
        `ring_attention`.
    Returns:
      ``[batch, heads, length, d_v]`` in v's dtype, laid out as ``q``.
    """
    n = mesh.shape[axis]
    shard, c = q.shape[2] // n, int(chunk_len)
    if q.shape[2] % n == 0 and shard % c:
        raise ValueError(f"halo_attention: each {axis} shard ({q.shape[2]} positions / {n} = "
                         f"{shard}) must be a multiple of chunk_len ({c})")
    if q.shape[2] % n == 0 and max(n_chunks_before, n_chunks_after) > shard // c:
        raise ValueError(f"halo_attention: n_chunks_before ({n_chunks_before}) and "
                         f"n_chunks_after ({n_chunks_after}) must be at most the chunks of one "
                         f"{axis} shard ({shard // c}); use fewer {axis} devices or ring "
                         "attention")
    fn = functools.partial(_halo_shard, axis=axis, causal=causal,
                           scale=1.0 / float(q.shape[-1]) ** 0.5, chunk_len=c,
                           before=int(n_chunks_before), after=int(n_chunks_after),
                           dropout_rate=float(dropout_rate))
    return _over_sequence(fn, "halo_attention", q, k, v, mesh, axis, batch_axes, key_mask,
                          dropout_rate, dropout_rng)
