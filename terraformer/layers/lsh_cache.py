"""The bucket index of a predict-mode LSH layer: which cached positions fall in each bucket.

A decoding query of `LSHSelfAttention` attends, per hash round, to the cached keys of its own
bucket. Scanning the whole cache for them costs O(cache length) a token; this index keeps, for
every (batch, head, round, bucket), the absolute positions of the last `capacity` tokens hashed
there, as a ring, so that a token reads `n_rounds * capacity` cached keys whatever the cache
length. State (int32):

- `bucket_index [batch, n_heads, n_rounds, n_buckets, capacity]`: absolute positions; ring slot
  `i` of a bucket holds its `(count - 1 - (count - 1 - i) % capacity)`-th token, i.e. the
  newest insertion is at slot `(count - 1) % capacity` and it overwrites the oldest.
- `bucket_count [batch, n_heads, n_rounds, n_buckets]`: tokens ever inserted in each bucket.

An entry is live when its slot was written (`slot < count`) and its position is still cached
(`position >= base`, the absolute position of cache slot 0: a layer that drops its oldest
positions raises `base` and leaves the index as it is, since it holds absolute positions, not
cache slots). The live entries of a bucket are exactly its cached positions as long as none of
its buckets held more than `capacity` cached positions at once (its cached positions are the
newest ones inserted there, as the oldest leave the cache first); beyond, the oldest of them
are forgotten.

    index = new_index(batch, heads, rounds, n_buckets, capacity)
    index = insert(index, buckets, positions, keep)   # buckets [B, H, R, T], positions [T]
    slots, live = lookup(index, q_buckets, base, mem_len)    # [B, H, R, capacity] each
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

INDEX, COUNT = "bucket_index", "bucket_count"


def new_index(batch: int, n_heads: int, n_rounds: int, n_buckets: int, capacity: int) -> dict:
    """An empty index: `{bucket_index: [B, H, R, n_buckets, capacity], bucket_count: [B, H, R,
    n_buckets]}`, int32 zeros."""
    lead = (batch, n_heads, n_rounds, n_buckets)
    return {INDEX: jnp.zeros((*lead, capacity), jnp.int32), COUNT: jnp.zeros(lead, jnp.int32)}


def insert(index: dict, buckets, positions, keep) -> dict:
    """`index` with T new tokens added, in position order.

    Args:
      index: `{bucket_index, bucket_count}` as `new_index` makes them.
      buckets: int `[B, H, R, T]`, each token's bucket in each round.
      positions: int32 `[T]`, the tokens' absolute positions, increasing.
      keep: bool `[B, T]`; False tokens (padding) are not inserted.

    Cost: one token is a scatter of `B * H * R` entries; T tokens sort each round's buckets
    (O(T log T)) and write only the last `capacity` of each bucket.
    """
    table, count = index[INDEX], index[COUNT]
    batch, n_heads, n_rounds, n_buckets, capacity = table.shape
    n_new = buckets.shape[-1]
    groups = batch * n_heads * n_rounds
    buckets = jnp.where(keep[:, None, None, :], buckets, n_buckets).reshape(groups, n_new)
    flat_count = count.reshape(groups, n_buckets)
    # A bucket past the last stands for the tokens not inserted; its count is read as 0.
    padded_count = jnp.pad(flat_count, [(0, 0), (0, 1)])
    rows = jnp.arange(groups, dtype=jnp.int32)[:, None]
    if n_new == 1:
        order, sorted_buckets = jnp.zeros((groups, 1), jnp.int32), buckets
        rank = jnp.zeros((groups, 1), jnp.int32)
        in_bucket = (sorted_buckets < n_buckets).astype(jnp.int32)
        added = jnp.zeros((groups, n_buckets + 1), jnp.int32).at[rows, sorted_buckets].add(
            in_bucket)[:, :n_buckets]
    else:
        order, sorted_buckets = _sort_by_bucket(buckets, n_buckets)
        # starts[g, b]: where bucket b begins in round g's sorted order (b = 0..n_buckets + 1).
        starts = jax.vmap(lambda s: jnp.searchsorted(
            s, jnp.arange(n_buckets + 2, dtype=s.dtype), side="left"))(sorted_buckets)
        starts = starts.astype(jnp.int32)
        sizes = starts[:, 1:] - starts[:, :-1]  # [G, n_buckets + 1]
        rank = (lax.broadcasted_iota(jnp.int32, sorted_buckets.shape, 1)
                - jnp.take_along_axis(starts, sorted_buckets, axis=1))
        in_bucket = jnp.take_along_axis(sizes, sorted_buckets, axis=1)
        added = sizes[:, :n_buckets]
    # Of a bucket's new tokens only the last `capacity` survive the ring: write only those, so
    # that no two writes meet in one slot.
    written = (sorted_buckets < n_buckets) & (rank >= in_bucket - capacity)
    slot = (jnp.take_along_axis(padded_count, sorted_buckets, axis=1) + rank) % capacity
    target = (rows * n_buckets + sorted_buckets) * capacity + slot
    target = jnp.where(written, target, groups * n_buckets * capacity)  # out of bounds: dropped
    table = table.reshape(-1).at[target.reshape(-1)].set(
        positions.astype(jnp.int32)[order].reshape(-1), mode="drop")
    return {INDEX: table.reshape(batch, n_heads, n_rounds, n_buckets, capacity),
            COUNT: (flat_count + added).reshape(count.shape)}


def lookup(index: dict, q_buckets, base, mem_len: int):
    """The cache slots of a query's bucket, per round.

    Args:
      index: the index (`insert` the query's own token first for it to see itself).
      q_buckets: int `[B, H, R]`, the query's bucket in each round.
      base: int32 scalar, the absolute position of cache slot 0.
      mem_len: the cache length (slots are clipped to it).

    Returns:
      `(slots, live)`: int32 `[B, H, R, capacity]` cache slots and bool `[B, H, R, capacity]`,
      True for entries that hold a cached position of that bucket (`slots` of others are
      arbitrary in-range slots).
    """
    table, count = index[INDEX], index[COUNT]
    capacity = table.shape[-1]
    positions = jnp.take_along_axis(table, q_buckets[..., None, None], axis=3)[..., 0, :]
    n = jnp.take_along_axis(count, q_buckets[..., None], axis=3)  # [B, H, R, 1]
    slot = lax.broadcast_to_rank(jnp.arange(capacity, dtype=jnp.int32), n.ndim)
    live = (slot < n) & (positions >= base)
    return jnp.clip(positions - base, 0, mem_len - 1), live


def _sort_by_bucket(buckets, n_buckets: int):
    """`(order, sorted_buckets)` of each row of `buckets [G, T]`, by (bucket, position)."""
    length = buckets.shape[-1]
    positions = lax.broadcasted_iota(jnp.int32, buckets.shape, 1)
    if (n_buckets + 1) * length < 2**31:  # one int32 key sorts several times faster on CPU
        key = lax.sort(buckets * length + positions, dimension=1)
        return key % length, key // length
    sorted_buckets, order = lax.sort((buckets, positions), dimension=1, num_keys=2)
    return order, sorted_buckets
