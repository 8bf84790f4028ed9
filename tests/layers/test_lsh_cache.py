"""The bucket index of predict-mode LSH attention against a plain per-bucket list."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from terraformer.layers import lsh_cache


def _plain(buckets, positions, keep, n_buckets, capacity):
    """Per (batch, head, round, bucket) the list of inserted positions, newest last."""
    b, h, r, _ = buckets.shape
    lists = {}
    for idx in np.ndindex(b, h, r):
        for t, p in enumerate(positions):
            if keep[idx[0], t]:
                lists.setdefault((*idx, int(buckets[(*idx, t)])), []).append(int(p))
    return lists


def test_insert_and_lookup_keep_the_last_capacity_positions_of_each_bucket(np_rng):
    b, h, r, n_buckets, capacity, length = 2, 2, 2, 3, 4, 23
    buckets = np_rng.integers(0, n_buckets, (b, h, r, length)).astype(np.int32)
    keep = np_rng.random((b, length)) > 0.2
    positions = np.arange(length, dtype=np.int32) + 5
    # Three calls of several tokens, then one token at a time: the same rings.
    index = lsh_cache.new_index(b, h, r, n_buckets, capacity)
    for lo, hi in ((0, 9), (9, 10), (10, 21)):
        index = lsh_cache.insert(index, jnp.asarray(buckets[..., lo:hi]),
                                 jnp.asarray(positions[lo:hi]), jnp.asarray(keep[:, lo:hi]))
    one = lsh_cache.new_index(b, h, r, n_buckets, capacity)
    for t in range(21):
        one = lsh_cache.insert(one, jnp.asarray(buckets[..., t : t + 1]),
                               jnp.asarray(positions[t : t + 1]), jnp.asarray(keep[:, t : t + 1]))
    for name in (lsh_cache.INDEX, lsh_cache.COUNT):
        np.testing.assert_array_equal(index[name], one[name])
    lists = _plain(buckets[..., :21], positions[:21], keep[:, :21], n_buckets, capacity)
    base, mem_len = 9, 40  # positions before 9 have left the cache
    for q in range(n_buckets):
        slots, live = lsh_cache.lookup(index, jnp.full((b, h, r), q, jnp.int32), base, mem_len)
        for idx in np.ndindex(b, h, r):
            want = [p for p in lists.get((*idx, q), [])[-capacity:] if p >= base]
            got = np.asarray(slots[idx])[np.asarray(live[idx])] + base
            assert sorted(got.tolist()) == want
