"""Ring attention (Liu et al., 2023): one sequence split over the mesh's ``sequence`` axis.

Each device holds a contiguous shard of the queries, keys and values. In ``P`` rounds (``P``
the size of the axis) every device attends its queries to the key/value shard it holds, with
`layers.attention_core.blocked_attention` (exact softmax attention with a recompute-in-
backward gradient, returning each query's log-sum-exp), then passes that key/value shard to
the next device (`lax.ppermute`) and receives the previous one's. The partial results are
merged by their log-sum-exp, so the result is the softmax over the whole sequence::

    lse = logaddexp(lse_a, lse_b);  out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)

No device ever holds more than two shards of keys and values, so the attended context grows
with the number of devices. Within a round the shard is cut in chunks of ``chunk_len``
queries, each over the whole key shard (a window of every key chunk, taken modulo the shard),
so a round's scores exist a block of chunks at a time, never shard x shard. With ``causal``,
a key after a query (by global position) is masked; a shard of keys wholly after a shard of
queries contributes nothing (its log-sum-exp is MASK_VALUE, its weight exp(-1e9) = 0), and the
diagonal shard always has a visible key.

    out = ring_attention(q, k, v, mesh, causal=True)   # q, k, v: [batch, heads, length, d]

`RingSelfAttention` is the layer (``attention_type='ring'``): `SelfAttention`'s full
attention, computed by `ring_attention` when the mesh in effect (``jax.set_mesh``, which the
train and eval steps enter on a mesh) has a ``sequence`` axis of several devices.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

from terraformer.layers.attention import SelfAttention
from terraformer.layers.attention_core import blocked_attention

__all__ = ["RING_CHUNK_LEN", "RingSelfAttention", "ring_attention", "sequence_shards"]

# Queries per chunk within a round: a chunk's scores over a whole key shard are chunk x shard.
RING_CHUNK_LEN = 256


def _merge(out_a, lse_a, out_b, lse_b):
    lse = jnp.logaddexp(lse_a, lse_b)
    out = out_a * jnp.exp(lse_a - lse)[..., None] + out_b * jnp.exp(lse_b - lse)[..., None]
    return out, lse


def _ring_shard(q, k, v, key_mask, *, axis: str, causal: bool, scale: float, chunk_len: int):
    """One device's part: q, k, v ``[batch, heads, length / P, d]``, key_mask ``[batch,
    length / P]`` or None."""
    n_shards = lax.axis_size(axis)
    me = lax.axis_index(axis)
    b, h, s, _ = q.shape
    c = chunk_len if s % chunk_len == 0 else s
    shape = (b * h, s // c, c)
    chunks = lambda x: x.reshape(*shape, x.shape[-1]).astype(jnp.float32)  # noqa: E731
    qf, kf, vf = chunks(q), chunks(k), chunks(v)
    positions = me * s + jnp.arange(s, dtype=jnp.int32)
    q_pos = jnp.broadcast_to(positions.reshape(1, *shape[1:]), shape)
    if key_mask is None:
        k_pos = q_pos
    else:  # a padding key's position is -1: never attended to
        k_pos = jnp.where(key_mask.astype(bool), positions, -1)
        k_pos = jnp.broadcast_to(k_pos[:, None], (b, h, s)).reshape(shape)
    out = lse = None
    perm = [(i, (i + 1) % n_shards) for i in range(n_shards)]
    for step in range(n_shards):
        o, l = blocked_attention(qf, kf, vf, q_pos, k_pos, offsets=range(s // c),
                                 scale=scale, causal=causal, wrap=True)
        out, lse = (o, l) if out is None else _merge(out, lse, o, l)
        if step + 1 < n_shards:  # pass the key/value shard on round the ring
            kf, vf, k_pos = (lax.ppermute(x, axis, perm) for x in (kf, vf, k_pos))
    return out.reshape(b, h, s, -1).astype(v.dtype)


def ring_attention(q, k, v, mesh, *, causal: bool = False, axis: str = "sequence",
                   batch_axes=None, key_mask=None, chunk_len: int = RING_CHUNK_LEN):
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
    Returns:
      ``[batch, heads, length, d_v]`` in v's dtype, laid out as ``q``.
    """
    n = mesh.shape[axis]
    if q.shape[2] % n:
        raise ValueError(f"ring_attention: the length ({q.shape[2]}) must be a multiple of "
                         f"the {axis} axis ({n})")
    if batch_axes is None:
        batch_axes = tuple(a for a in ("data", "fsdp") if a in mesh.shape)
    heads = "model" if mesh.shape.get("model", 1) > 1 and \
        q.shape[1] % mesh.shape["model"] == 0 else None
    spec = PartitionSpec(batch_axes or None, heads, axis, None)
    mask_spec = PartitionSpec(batch_axes or None, axis)
    fn = functools.partial(_ring_shard, axis=axis, causal=causal,
                           scale=1.0 / float(q.shape[-1]) ** 0.5, chunk_len=int(chunk_len))
    if key_mask is None:
        return jax.shard_map(lambda q, k, v: fn(q, k, v, None), mesh=mesh,
                             in_specs=(spec, spec, spec), out_specs=spec,
                             check_vma=False)(q, k, v)
    return jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, spec, mask_spec),
                         out_specs=spec, check_vma=False)(q, k, v, key_mask)


def sequence_shards(axis: str = "sequence") -> int:
    """The size of ``axis`` in the mesh in effect (``jax.set_mesh``); 1 without one."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else int(dict(mesh.shape).get(axis, 1))


class RingSelfAttention(SelfAttention):
    """Full multi-head self-attention that splits one long sequence over the devices of the
    mesh's ``sequence`` axis: (batch, length, d_model) -> same.

    Where the mesh in effect has a ``sequence`` axis of several devices (train and eval on
    such a mesh), train and eval modes attend by `ring_attention`: each device keeps its
    shard of the positions, the projections and everything else in the model stay local to
    it, and only keys and values travel. Without one (one device, decoding) it is
    `SelfAttention`'s full attention, with the same weights and the same result.

    Args: as `SelfAttention` (no chunking), plus ``chunk_len`` (queries per chunk within a
    ring round). Attention dropout is refused on a sequence axis (the ring draws no masks).
    """

    def __init__(self, n_heads: int = 2, d_qk: int = 64, d_v: int = 64, causal: bool = False,
                 masked: bool = False, attention_dropout: float = 0.0,
                 output_dropout: float = 0.0, use_bias: bool = False, mode: str = "train",
                 predict_mem_len: int = 2048, chunk_len: int = RING_CHUNK_LEN):
        super().__init__(n_heads=n_heads, d_qk=d_qk, d_v=d_v, causal=causal, masked=masked,
                         attention_dropout=attention_dropout, output_dropout=output_dropout,
                         use_bias=use_bias, mode=mode, predict_mem_len=predict_mem_len)
        if chunk_len < 1:
            raise ValueError(f"RingSelfAttention: chunk_len must be >= 1, got {chunk_len}")
        self._ring_chunk_len = chunk_len

    def _attend(self, q, k, v, mask, rng):
        if sequence_shards() == 1:
            return super()._attend(q, k, v, mask, rng)
        if self._mode == "train" and self._attention_dropout > 0.0:
            raise ValueError(
                f"{self.name}: attention_dropout={self._attention_dropout} is not supported "
                "over a sequence axis (ring attention draws no dropout masks); set it to 0")
        return ring_attention(q, k, v, jax.sharding.get_abstract_mesh(), causal=self._causal,
                              key_mask=mask, chunk_len=self._ring_chunk_len)
