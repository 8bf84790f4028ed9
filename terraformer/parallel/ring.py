"""Ring attention (Liu et al., 2023): one sequence split over the mesh's ``sequence`` axis.

Each device holds a contiguous shard of the queries, keys and values. In ``P`` rounds (``P``
the size of the axis) every device attends its queries to the key/value shard it holds, with
`layers.attention_core.blocked_attention` (exact softmax attention with a recompute-in-
backward gradient, returning each query's log-sum-exp), then passes that key/value shard to
the next device (`lax.ppermute`) and receives the previous one's. The partial results are
merged by their log-sum-exp, so the result is the softmax over the whole sequence::

    lse = logaddexp(lse_a, lse_b);  out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)

No device ever holds more than two shards of keys and values, so the attended context grows
with the number of devices. With ``causal``, a shard of keys wholly after a shard of queries
contributes nothing (its log-sum-exp is MASK_VALUE, its weight exp(-1e9) = 0); the diagonal
shard always has a visible key.

    out = ring_attention(q, k, v, mesh, causal=True)   # q, k, v: [batch, heads, length, d]
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

from terraformer.layers.attention_core import blocked_attention

__all__ = ["ring_attention"]


def _merge(out_a, lse_a, out_b, lse_b):
    lse = jnp.logaddexp(lse_a, lse_b)
    out = out_a * jnp.exp(lse_a - lse)[..., None] + out_b * jnp.exp(lse_b - lse)[..., None]
    return out, lse


def _ring_shard(q, k, v, *, axis: str, causal: bool, scale: float):
    """One device's part: q, k, v ``[batch, heads, length / P, d]``."""
    n_shards = lax.axis_size(axis)
    me = lax.axis_index(axis)
    b, h, s, d = q.shape
    flat = lambda x: x.reshape(b * h, 1, s, x.shape[-1]).astype(jnp.float32)  # noqa: E731
    qf, kf, vf = flat(q), flat(k), flat(v)
    q_pos = jnp.broadcast_to((me * s + jnp.arange(s, dtype=jnp.int32)), (b * h, 1, s))
    k_pos = q_pos
    out = lse = None
    perm = [(i, (i + 1) % n_shards) for i in range(n_shards)]
    for step in range(n_shards):
        o, l = blocked_attention(qf, kf, vf, q_pos, k_pos, offsets=(0,), scale=scale,
                                 causal=causal, wrap=False)
        out, lse = (o, l) if out is None else _merge(out, lse, o, l)
        if step + 1 < n_shards:  # pass the key/value shard on round the ring
            kf, vf, k_pos = (lax.ppermute(x, axis, perm) for x in (kf, vf, k_pos))
    return out.reshape(b, h, s, -1).astype(v.dtype)


def ring_attention(q, k, v, mesh, *, causal: bool = False, axis: str = "sequence",
                   batch_axes=None):
    """Softmax attention of ``q`` on ``k``/``v`` with the length split over ``axis``.

    Args:
      q, k: ``[batch, heads, length, d_qk]``; v: ``[batch, heads, length, d_v]``; length a
        multiple of the axis size.
      mesh: the `jax.sharding.Mesh` holding ``axis``.
      causal: a query sees only keys at or before its position.
      batch_axes: mesh axes the batch is split over (default: ``data`` and ``fsdp`` where
        the mesh has them).
    Returns:
      ``[batch, heads, length, d_v]`` in v's dtype, laid out as ``q``.
    """
    n = mesh.shape[axis]
    if q.shape[2] % n:
        raise ValueError(f"ring_attention: the length ({q.shape[2]}) must be a multiple of "
                         f"the {axis} axis ({n})")
    if batch_axes is None:
        batch_axes = tuple(a for a in ("data", "fsdp") if a in mesh.shape)
    spec = PartitionSpec(batch_axes or None, None, axis, None)
    fn = functools.partial(_ring_shard, axis=axis, causal=causal,
                           scale=1.0 / float(q.shape[-1]) ** 0.5)
    return jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                         check_vma=False)(q, k, v)
