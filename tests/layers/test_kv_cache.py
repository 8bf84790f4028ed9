"""The decoding cache (ring layout, writes, block visits, masks) against direct references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from terraformer.layers import kv_cache


def _normal(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape).astype(np.float32))


@pytest.mark.parametrize("ring,start,n", [(8, 0, 1), (8, 13, 1), (8, 5, 6), (7, 20, 7),
                                          (12, 3, 4)])
def test_ring_write_puts_position_p_in_slot_p_mod_ring(np_rng, ring, start, n):
    cache = np_rng.standard_normal((2, 3, ring, 4)).astype(np.float32)
    new = np_rng.standard_normal((2, 3, n, 4)).astype(np.float32)
    want = cache.copy()
    for i in range(n):
        want[:, :, (start + i) % ring] = new[:, :, i]
    got = kv_cache.ring_write(jnp.asarray(cache), jnp.asarray(new), jnp.int32(start), axis=2)
    np.testing.assert_array_equal(got, want)


def test_write_at_writes_a_linear_buffer(np_rng):
    buffer = np_rng.standard_normal((2, 10, 3)).astype(np.float32)
    new = np_rng.standard_normal((2, 4, 3)).astype(np.float32)
    start = int(np_rng.integers(0, 7))
    want = buffer.copy()
    want[:, start:start + 4] = new
    np.testing.assert_array_equal(kv_cache.write_at(jnp.asarray(buffer), jnp.asarray(new),
                                                    start, axis=1), want)


@pytest.mark.parametrize("ring,hi", [(8, 10), (8, 3), (12, 40), (5, 4)])
def test_key_positions_are_what_the_writes_left(ring, hi):
    held = np.full(ring, -1)
    for p in range(hi + 1):
        held[p % ring] = p
    for slot0, length in ((0, ring), (ring // 2, ring - ring // 2), (1, 1)):
        got = np.asarray(kv_cache.key_positions(jnp.int32(hi), slot0, length, ring))
        want = held[slot0:slot0 + length]
        np.testing.assert_array_equal(got[want >= 0], want[want >= 0])
        assert (got[want < 0] < 0).all()


@pytest.mark.parametrize("mem_len,chunk_len,before", [(None, None, 0), (5, None, 0),
                                                       (12, 4, 1), (None, 3, 2)])
def test_window_mask_against_a_direct_rule(np_rng, mem_len, chunk_len, before):
    q_pos = np.arange(7, 13)
    k_pos = np.concatenate([np_rng.permutation(13), [-1, -3]])
    got = np.asarray(kv_cache.window_mask(jnp.asarray(q_pos), jnp.asarray(k_pos), mem_len,
                                          chunk_len, before))
    for i, q in enumerate(q_pos):
        for j, k in enumerate(k_pos):
            ok = 0 <= k <= q
            if mem_len is not None:
                ok = ok and k > q - mem_len
            if chunk_len is not None:
                ok = ok and q // chunk_len - before <= k // chunk_len <= q // chunk_len
            assert got[i, j] == ok, (q, k)


def _dense_reference(q, keys, values, q_pos, positions, mem_len):
    """softmax over every position q - mem_len < p <= q, keys/values given by position."""
    outs = []
    for i, qp in enumerate(q_pos):
        ok = (positions <= qp) & (positions > qp - mem_len)
        s = jnp.einsum("bhd,bhkd->bhk", q[:, :, i], keys) / np.sqrt(q.shape[-1])
        s = jnp.where(ok, s, -jnp.inf)
        outs.append(jnp.einsum("bhk,bhkd->bhd", jax.nn.softmax(s, axis=-1), values))
    return jnp.stack(outs, axis=2)


@pytest.mark.parametrize("mem_len,block_len,n_past,n_new", [
    (16, 16, 11, 1), (16, 4, 11, 1), (16, 4, 30, 1), (16, 4, 9, 3), (18, 4, 33, 2),
    (8, 4, 2, 1)])
def test_cached_attention_equals_attention_over_the_positions_it_holds(
        np_rng, monkeypatch, mem_len, block_len, n_past, n_new):
    """Write n_past positions, then attend with n_new more: the softmax over exactly the keys
    of the last mem_len positions, for block visits and the whole-ring read alike."""
    monkeypatch.setattr(kv_cache, "PREDICT_BLOCK_LEN", block_len)
    monkeypatch.setattr(kv_cache, "DECODING_BLOCK_KEYS", 2 * block_len)
    batch, heads, d = 2, 3, 5
    total = n_past + n_new
    keys, values, q = (_normal(np_rng, batch, heads, total, d) for _ in range(3))
    ring_len, blk = kv_cache.ring_layout(mem_len)
    k_cache = kv_cache.new_ring(batch, heads, mem_len, d, jnp.float32)
    v_cache = kv_cache.new_ring(batch, heads, mem_len, d, jnp.float32)
    assert k_cache.shape == (batch, heads, ring_len, d)
    for p in range(n_past):
        k_cache = kv_cache.ring_write(k_cache, keys[:, :, p:p + 1], jnp.int32(p), axis=2)
        v_cache = kv_cache.ring_write(v_cache, values[:, :, p:p + 1], jnp.int32(p), axis=2)
    q_pos = jnp.arange(n_past, total, dtype=jnp.int32)

    def key_mask(k_pos, slot0, length):
        return kv_cache.window_mask(q_pos, k_pos, mem_len)[None, None]

    lo = jnp.maximum(q_pos[0] - mem_len + 1, 0)
    out, k_after, _ = kv_cache.cached_attention(
        q[:, :, n_past:], q_pos, keys[:, :, n_past:], values[:, :, n_past:], k_cache,
        v_cache, key_mask, lo, blk)
    want = _dense_reference(q[:, :, n_past:], keys, values, np.arange(n_past, total),
                            np.arange(total), mem_len)
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)
    for p in range(max(0, total - ring_len), total):
        np.testing.assert_array_equal(k_after[:, :, p % ring_len], keys[:, :, p])


@pytest.mark.parametrize("mem_len,want", [(1, (1, 1)), (256, (256, 256)), (264, (264, 264)),
                                           (512, (512, 512)), (513, (768, 256)),
                                           (1000, (1024, 256)), (16384, (16384, 256))])
def test_ring_layout_small_rings_are_one_block_of_exactly_mem_len(mem_len, want):
    """Up to two PREDICT_BLOCK_LENs the ring is one block of mem_len slots (read whole by
    a decoding step); beyond, whole blocks of PREDICT_BLOCK_LEN that hold mem_len."""
    assert kv_cache.PREDICT_BLOCK_LEN == 256
    assert kv_cache.ring_layout(mem_len) == want


@pytest.mark.parametrize("ring,block_len", [(512, 256), (256, 256), (1024, 256), (16384, 256),
                                             (65536, 256), (24, 4), (8192, 256)])
def test_decoding_blocks_divide_the_ring_and_skip_unwritten_slots(ring, block_len):
    """One-token decoding visits the ring in blocks that tile it, of at most a quarter of it
    (so a ring still mostly empty is not read whole) and at most DECODING_BLOCK_KEYS."""
    got = kv_cache.decoding_block_len(ring, block_len)
    assert got % block_len == 0 and ring % got == 0
    cap = min(kv_cache.DECODING_BLOCK_KEYS, ring // 4)
    assert got <= max(block_len, cap)
    # the largest such block: the next multiple of block_len that tiles the ring is too big
    bigger = [m * block_len for m in range(got // block_len + 1, ring // block_len + 1)
              if ring % (m * block_len) == 0]
    assert not bigger or bigger[0] > max(block_len, cap)
