"""LSH self-attention (Reformer): hash, sort, chunk, attend, undo the sort, merge the rounds.

The pieces, each usable on its own:

- `random_rotations(rng, d, n_buckets, n_hashes, n_heads)`: the random projections of the hash.
- `hash_vectors(vecs, n_buckets, rng, n_hashes, rotations=...)`: angular LSH buckets,
  `(..., length, d) -> (..., n_hashes, length)` int32.
- `lsh_attention(qk, v, rng, ...)`: the attention itself on per-head arrays,
  `qk: (batch, heads, length, d_qk)`, `v: (batch, heads, length, d_v)` ->
  `(out: (batch, heads, length, d_v), lse: (batch, heads, length))`.
- `LSHSelfAttention`: the layer, `(batch, length, d_model) -> (batch, length, d_model)`, with
  shared-QK and V projections, an output projection and a `predict`-mode decoding cache.

Conventions (those of Trax's LSHSelfAttention, re-derived from the Reformer paper):

- Shared QK: queries are the projections `qk`; keys are `qk` normalised to unit length
  (`length_normalized`); a score is `qk_scale * q . k`, and `qk_scale = 1` is Trax's (its keys
  have RMS 1 and are then divided by sqrt(d_qk), which makes them unit vectors too). A smaller
  `qk_scale` (e.g. `1/sqrt(d_qk)`) starts training with softer attention: see the argument.
- A query never attends to itself unless nothing else is allowed: its self-score is replaced by
  `SELF_ATTENTION_VALUE` (-1e5), while masked scores become `MASK_VALUE` (-1e9).
- Buckets do not mask: a query sees every key of its chunk window (its chunk plus
  `n_chunks_before` previous and `n_chunks_after` following chunks of the same hash round, wrapping
  around the round's sorted sequence; chunks that would appear twice in a window appear once).
- The rounds are merged as `out = sum_r exp(lse_r - logsumexp_r(lse_r)) * out_r`.
- Padding positions (beyond the length, or False in `mask`) get an extra bucket past the last one,
  so they sort to the end of every round: they never take a real token's place in a chunk, are
  never attended to, and their values cannot change which keys a real token sees.

Memory: the sorted queries, keys and values take O(n_hashes * length * d) memory; the scores
are computed a cache-sized block of chunks at a time (`attention_core.blocked_attention`,
whose hand-written backward rebuilds each block's probabilities from the saved log-sum-exp),
so no more than one block of `chunk_len x window` score matrices is alive, forward or
backward. Hashing projects at most a block of positions at a time, and a factored
`n_buckets=(a, b)` projects on a/2 + b/2 directions instead of a*b/2. The sort and its undoing
are gathers whose gradients are gathers too (`gather_rows`).

Causal LSH attention masks every key at a later position, but, as in the Reformer paper, *which*
earlier keys share a query's chunk depends on the buckets of all tokens, later ones included
(sorting places later tokens between earlier ones). Values never leak; the hash pattern can.

On a mesh's ``sequence`` axis LSH attention is not sequence-parallel: the sort mixes the
positions of every shard, and XLA's partitioner gathers them (the one-device result, without
the memory saving). `layers/ring.py` says why no distributed sort is built and what to run
instead.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from terraformer.checks import ArgumentError, check_int, check_rate
from terraformer.layers import initializers as init_lib
from terraformer.layers import kv_cache, lsh_cache
from terraformer.layers.attention_core import MASK_VALUE, blocked_attention
from terraformer.layers.base import Layer, as_items, check_mode
from terraformer.layers.core import dropout as dropout_fn

SELF_ATTENTION_VALUE = -1e5
NORM_EPSILON = 1e-6
# Above this many buckets, `n_buckets='chunks'` factors the hash into a pair (a, b).
MAX_UNFACTORED_BUCKETS = 512
# Above this many, `n_buckets=None` factors it (Trax's threshold).
TRAX_UNFACTORED_BUCKETS = 128
# `n_buckets` for one bucket per chunk (see `resolve_n_buckets`).
PER_CHUNK = "chunks"
# Elements of one block of rotated vectors (hashing) or of chunk scores (attention).
_HASH_BLOCK_ELEMENTS = 1 << 18
# Scores per block of new queries in predict mode (`_predict_attention`).
_PREDICT_BLOCK_SCORES = 1 << 23
# Above this many (batch x head x round x position) rows, heads are attended one at a time.
_HEAD_LOOP_ROWS = 1 << 19


# -- buckets ----------------------------------------------------------------------------------
def _check_factor(n, who: str) -> int:
    n = check_int("n_buckets entries", n, 1, who)
    if n > 1 and n % 2:
        raise ArgumentError(f"{who}: n_buckets entries must be 1 or a positive even int, "
                            f"got {n}")
    return n


def check_n_buckets(n_buckets, who: str = "LSH"):
    """Validates `n_buckets`: None or 'chunks' (see `resolve_n_buckets`), an int (1 or even),
    or a pair of them (factored hashing)."""
    if n_buckets is None or n_buckets == PER_CHUNK:
        return n_buckets
    if isinstance(n_buckets, (tuple, list)):
        if len(n_buckets) != 2:
            raise ValueError(f"{who}: factored n_buckets must be a pair (a, b), got {n_buckets!r}")
        return tuple(_check_factor(n, who) for n in n_buckets)
    return _check_factor(n_buckets, who)


def total_buckets(n_buckets) -> int:
    """How many distinct buckets `n_buckets` (an int or a pair (a, b)) gives: n, or a*b."""
    if isinstance(n_buckets, tuple):
        return n_buckets[0] * n_buckets[1]
    return n_buckets


def resolve_n_buckets(n_buckets, length: int, chunk_len: int, max_length_for_buckets=None):
    """The bucket count to use for sequences of `length`.

    An explicit `n_buckets` is returned as is (validated). With `L = max_length_for_buckets or
    length`, the two rules that choose it from the length are:

    - None (Trax's): about two buckets a chunk, `n = 2 * max(1, L // chunk_len)`; above
      `TRAX_UNFACTORED_BUCKETS` factored as Trax does, `(a, 2 * (n // (2 * a)))` with `a` the
      power of two at or above `sqrt(n)`.
    - 'chunks': one bucket a chunk, `ceil(L / chunk_len)` rounded up to a power of two `2^k`;
      above `MAX_UNFACTORED_BUCKETS` factored as `(2^(k//2), 2^(k - k//2))`.

    Factoring makes hashing cost O(sqrt(n_buckets)) per token.
    """
    n_buckets = check_n_buckets(n_buckets)
    if n_buckets is not None and n_buckets != PER_CHUNK:
        return n_buckets
    target = max_length_for_buckets or length
    if n_buckets is None:
        n = 2 * max(1, int(target) // int(chunk_len))
        if n <= TRAX_UNFACTORED_BUCKETS:
            return n
        a = 2 ** math.ceil(math.log2(math.sqrt(n)))
        return (a, 2 * (n // (2 * a)))
    n_chunks = max(1, -(-int(target) // int(chunk_len)))
    k = (n_chunks - 1).bit_length()
    if 2**k <= MAX_UNFACTORED_BUCKETS:
        return 2**k
    return (2 ** (k // 2), 2 ** (k - k // 2))


def random_rotations(rng, d: int, n_buckets, n_hashes: int = 1, n_heads: int | None = None):
    """Random projections for `hash_vectors`: a tuple with one array per bucket factor.

    For a factor of size f the array is `(n_heads, n_hashes, d, f // 2)` (or `(n_hashes, d, f//2)`
    when `n_heads` is None: shared by all leading axes); a factor of size 1 needs no directions
    and gets a `(..., d, 0)` array.
    """
    factors = check_n_buckets(n_buckets)
    if factors is None:
        raise ValueError("random_rotations: resolve n_buckets=None first (resolve_n_buckets)")
    factors = factors if isinstance(factors, tuple) else (factors,)
    lead = (n_hashes,) if n_heads is None else (n_heads, n_hashes)
    rngs = jax.random.split(rng, len(factors))
    return tuple(
        jax.random.normal(r, (*lead, d, f // 2), jnp.float32) for r, f in zip(rngs, factors)
    )


def _argmax_pm(rotated, axis: int = -1):
    """argmax over [r; -r] along `axis`, without building the concatenation.

    The winner is the largest |r_i| (i, or half + i when r_i < 0); written as a max and a min
    reduction, which vectorise on CPU, where XLA's argmax (a value-and-index reduction) does
    not. Ties go to the lowest index of [r; -r], as argmax would.
    """
    axis = axis % rotated.ndim
    half = rotated.shape[axis]
    magnitude = jnp.abs(rotated)
    top = jnp.max(magnitude, axis=axis, keepdims=True)
    index = lax.broadcasted_iota(jnp.int32, rotated.shape, axis)
    code = index + half * (rotated < 0).astype(index.dtype)
    return jnp.min(jnp.where(magnitude == top, code, 2 * half), axis=axis)


def _directions(rotations):
    """Per factor, the rotations `(..., n_hashes, d, f/2)` as `(..., n_hashes * f/2, d)`."""
    return tuple(jnp.swapaxes(r, -1, -2).reshape(*r.shape[:-3], -1, r.shape[-2])
                 for r in rotations)


def _hash_block(vecs, directions, factors, n_rounds):
    """Buckets of vecs (..., l, d) -> (..., n_rounds, l), given `_directions(rotations)`."""
    bucket = None
    for rows, f in zip(directions, factors):
        if f == 1:
            part = jnp.zeros(vecs.shape[:-2] + (n_rounds, vecs.shape[-2]), jnp.int32)
        else:
            # Directions on the major axis, positions on the minor one: one (rounds * f/2, d) x
            # (d, l) product per head, and the argmax over directions becomes elementwise
            # max/min across rows, which vectorises (several times faster on CPU than reducing
            # the minor axis of the (l, rounds * f/2) product).
            spec = "kd,...ld->...kl" if rows.ndim == 2 else "hkd,...hld->...hkl"
            rotated = jnp.einsum(spec, rows, vecs)
            rotated = rotated.reshape(*rotated.shape[:-2], n_rounds, f // 2, rotated.shape[-1])
            part = _argmax_pm(rotated, axis=-2)
        bucket = part if bucket is None else bucket * f + part
    return bucket


def hash_vectors(
    vecs, n_buckets, rng=None, n_hashes: int = 1, *, rotations=None, block_len: int | None = None
):
    """Angular LSH: the bucket of each vector in each of `n_hashes` rounds.

    For a factor of f buckets the vector is projected on f/2 random directions R and its bucket is
    `argmax([R x; -R x])`; a pair `(a, b)` hashes twice independently and gives `i * b + j`, in
    `[0, a*b)`, at the cost of a/2 + b/2 projections. `n_buckets=1` puts everything in bucket 0.
    The bucket does not change when x is scaled by a positive constant.

    Args:
      vecs: `(..., length, d)`; with per-head rotations, `(..., n_heads, length, d)`.
      n_buckets: an int (1 or even) or a pair of them.
      rng: draws the rotations (shared by all leading axes) when `rotations` is None.
      n_hashes: how many rounds.
      rotations: the output of `random_rotations` (overrides rng and n_hashes).
      block_len: hash this many positions at a time (a loop over the length), so that at most
        `block_len x n_buckets/2` projections per round are alive; default: automatic.

    Returns:
      int32 buckets, `(..., n_hashes, length)`.
    """
    factors = check_n_buckets(n_buckets, "hash_vectors")
    if factors is None:
        raise ValueError("hash_vectors: resolve n_buckets=None first (resolve_n_buckets)")
    factors = factors if isinstance(factors, tuple) else (factors,)
    d = vecs.shape[-1]
    if rotations is None:
        if rng is None:
            raise ValueError("hash_vectors: pass rng or rotations")
        rotations = random_rotations(rng, d, n_buckets, n_hashes)
    rotations = tuple(rotations)
    if len(rotations) != len(factors):
        raise ValueError(
            f"hash_vectors: {len(factors)} bucket factors need as many rotation arrays, "
            f"got {len(rotations)}"
        )
    for rot, f in zip(rotations, factors):
        if rot.shape[-2:] != (d, f // 2):
            raise ValueError(
                f"hash_vectors: rotations for {f} buckets must end in ({d}, {f // 2}), "
                f"got shape {tuple(rot.shape)}"
            )
    n_rounds = rotations[0].shape[-3]
    if block_len is None:
        per_position = max(1, math.prod(vecs.shape[:-2]) * n_rounds * sum(factors) // 2)
        block_len = max(1, _HASH_BLOCK_ELEMENTS // per_position)
    return _hash_vectors(vecs, rotations, factors=factors, block_len=int(block_len))


def _flatten_positions(vecs, per_head: bool):
    """`(..., [H,] L, d)` -> `([H,] N * L, d)`, N the product of the other leading axes: every
    position in one row block, so that the hashing product has no batch axis of its own."""
    head_axes = 1 if per_head else 0
    lead = vecs.shape[:vecs.ndim - 2 - head_axes]
    n = math.prod(lead)
    x = vecs.reshape(n, *vecs.shape[vecs.ndim - 2 - head_axes:])
    if per_head:
        x = jnp.moveaxis(x, 0, 1)  # (H, N, L, d): a copy only when N > 1
    return x.reshape(*x.shape[:-3], n * vecs.shape[-2], vecs.shape[-1]), lead


def _unflatten_positions(buckets, lead, length: int, per_head: bool):
    """`([H,] R, N * L)` -> `(..., [H,] R, L)`."""
    n = math.prod(lead)
    b = buckets.reshape(*buckets.shape[:-1], n, length)  # ([H,] R, N, L)
    b = jnp.moveaxis(b, -2, 0)  # (N, [H,] R, L)
    return b.reshape(*lead, *b.shape[1:])


@functools.partial(jax.jit, static_argnames=("factors", "block_len"))
def _hash_vectors(vecs, rotations, *, factors, block_len):
    per_head = rotations[0].ndim == 4
    length = vecs.shape[-2]
    vecs, lead = _flatten_positions(lax.stop_gradient(vecs).astype(jnp.float32), per_head)
    n_rounds = rotations[0].shape[-3]
    directions = _directions(tuple(lax.stop_gradient(r) for r in rotations))
    return _unflatten_positions(
        _hash_rows(vecs, directions, factors, n_rounds, block_len), lead, length, per_head)


def _hash_rows(vecs, directions, factors, n_rounds, block_len):
    """`([H,] n, d)` -> `([H,] n_rounds, n)`: `_hash_block` over blocks of `block_len` rows."""
    length = vecs.shape[-2]
    if length <= block_len:
        return _hash_block(vecs, directions, factors, n_rounds)
    n_blocks = -(-length // block_len)
    one = jax.eval_shape(lambda x: _hash_block(x, directions, factors, n_rounds),
                         vecs[..., :1, :])
    out = jnp.zeros(one.shape[:-1] + (length,), jnp.int32)

    def body(b, out):
        # The last block starts early instead of being padded: hashing is per position, so
        # the positions it computes twice get the same buckets.
        start = jnp.minimum(b * block_len, length - block_len)
        block = lax.dynamic_slice_in_dim(vecs, start, block_len, axis=vecs.ndim - 2)
        return lax.dynamic_update_slice_in_dim(
            out, _hash_block(block, directions, factors, n_rounds), start, axis=out.ndim - 1)

    return lax.fori_loop(0, n_blocks, body, out)


# -- attention --------------------------------------------------------------------------------
def length_normalized(x, epsilon: float = NORM_EPSILON):
    """`x / sqrt(sum(x^2) + epsilon)` over the last axis: the shared-QK keys."""
    x32 = x.astype(jnp.float32)
    return (x32 * lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + epsilon)).astype(x.dtype)


def window_offsets(n_chunks: int, n_chunks_before: int, n_chunks_after: int) -> list[int]:
    """Chunk offsets a chunk looks at, `-before..after`, without wrapped-around duplicates."""
    seen, offsets = set(), []
    for o in range(-n_chunks_before, n_chunks_after + 1):
        if o % n_chunks not in seen:
            seen.add(o % n_chunks)
            offsets.append(o)
    return offsets


def check_qk_scale(qk_scale, who: str) -> float:
    """`qk_scale` as a positive finite float, or a one-line error naming it."""
    if isinstance(qk_scale, bool) or not isinstance(qk_scale, (int, float)) or not (
            0 < qk_scale < math.inf):
        raise ArgumentError(f"{who}: qk_scale must be a positive number (1.0 is Trax's scores, "
                            f"1/sqrt(d_qk) softer ones), got {qk_scale!r}")
    return float(qk_scale)


def _check_lsh_args(chunk_len, n_chunks_before, n_chunks_after, n_hashes, who):
    check_int("chunk_len", chunk_len, 1, who)
    check_int("n_chunks_before", n_chunks_before, 0, who)
    check_int("n_chunks_after", n_chunks_after, 0, who)
    check_int("n_hashes", n_hashes, 1, who)


def lsh_attention(
    qk,
    v,
    rng=None,
    *,
    n_hashes: int = 1,
    n_buckets=2,
    chunk_len: int = 128,
    n_chunks_before: int = 1,
    n_chunks_after: int = 0,
    causal: bool = False,
    mask=None,
    rotations=None,
    dropout_rate: float = 0.0,
    dropout_rng=None,
    max_length_for_buckets: int | None = None,
    chunks_per_block: int | None = None,
    qk_scale: float = 1.0,
):
    """LSH attention with shared QK on per-head arrays.

    Args:
      qk: `(batch, heads, length, d_qk)`: the queries; the keys are their unit-length versions.
      v: `(batch, heads, length, d_v)`.
      rng: draws the hash rotations (one set per head, shared across the batch) unless
        `rotations` is given.
      n_hashes: hash rounds, merged by their log-sum-exp.
      n_buckets: an int (1 or even), a pair (a, b) for factored hashing, or None (see
        `resolve_n_buckets`; uses `max_length_for_buckets` when given).
      chunk_len: queries per chunk. A length that is not a multiple is padded internally to the
        next one (the padding is masked and cut from the output); a length shorter than
        `chunk_len` is one chunk of that length.
      n_chunks_before / n_chunks_after: how many neighbouring chunks (in sorted order, wrapping
        around within the round) each chunk also attends to.
      causal: mask keys at later (original) positions.
      mask: optional `(batch, length)` bool/0-1, True for real tokens; others are never attended.
      rotations: `random_rotations(rng, d_qk, n_buckets, n_hashes, n_heads=heads)`, or arrays
        of those shapes; their n_hashes axis then sets the number of rounds.
      dropout_rate / dropout_rng: dropout on the attention probabilities (when rate > 0).
      chunks_per_block: chunks attended to per block (a divisor of the chunk count; default:
        about `attention_core.BLOCK_SCORES` scores a block). Blocks are recomputed in the
        backward pass, so memory is linear in the length.
      qk_scale: the factor of every score `q . k` (keys are unit vectors); 1 is Trax's.

    Returns:
      `(out, lse)`: `(batch, heads, length, d_v)` in v's dtype and `(batch, heads, length)`
      float32, the log-sum-exp of each query's scores over the rounds.
    """
    _check_lsh_args(chunk_len, n_chunks_before, n_chunks_after, n_hashes, "lsh_attention")
    if qk.ndim != 4 or v.ndim != 4 or qk.shape[:3] != v.shape[:3]:
        raise ValueError(
            "lsh_attention: qk and v must be (batch, heads, length, d) with equal leading axes, "
            f"got qk {tuple(qk.shape)} and v {tuple(v.shape)}"
        )
    check_rate("dropout_rate", dropout_rate, "lsh_attention")
    if dropout_rate > 0.0 and dropout_rng is None:
        raise ValueError("lsh_attention: dropout_rate > 0 needs a dropout_rng")
    batch, _, length, _ = qk.shape
    if mask is not None and tuple(mask.shape) != (batch, length):
        raise ValueError(
            f"lsh_attention: mask must be (batch, length) = {(batch, length)}, "
            f"got {tuple(mask.shape)}"
        )
    if chunks_per_block is not None:
        chunks_per_block = check_int("chunks_per_block", chunks_per_block, 1, "lsh_attention")
    qk_scale = check_qk_scale(qk_scale, "lsh_attention")
    n_buckets = resolve_n_buckets(n_buckets, length, chunk_len, max_length_for_buckets)
    if rotations is None and rng is None:
        raise ValueError("lsh_attention: pass rng (to draw the hash rotations) or rotations")
    if rotations is not None:
        rotations = tuple(rotations)
        # Validates the rotations' shapes against n_buckets (abstractly: no computation).
        jax.eval_shape(lambda q, r: hash_vectors(q, n_buckets, rotations=r), qk, rotations)
    return _lsh_attention(
        qk,
        v,
        mask,
        rng,
        rotations,
        dropout_rng,
        n_hashes=int(n_hashes),
        n_buckets=n_buckets,
        chunk_len=int(chunk_len),
        n_chunks_before=int(n_chunks_before),
        n_chunks_after=int(n_chunks_after),
        causal=bool(causal),
        dropout_rate=float(dropout_rate),
        chunks_per_block=chunks_per_block,
        qk_scale=qk_scale,
    )


@functools.partial(
    jax.jit,
    static_argnames=(
        "n_hashes",
        "n_buckets",
        "chunk_len",
        "n_chunks_before",
        "n_chunks_after",
        "causal",
        "dropout_rate",
        "chunks_per_block",
        "qk_scale",
    ),
)
def _lsh_attention(
    qk,
    v,
    mask,
    rng,
    rotations,
    dropout_rng,
    *,
    n_hashes,
    n_buckets,
    chunk_len,
    n_chunks_before,
    n_chunks_after,
    causal,
    dropout_rate,
    chunks_per_block,
    qk_scale,
):
    """`lsh_attention` after validation, compiled once per configuration and shape.

    Long inputs run one head at a time (a `lax.map` over heads) and, within a head, one hash
    round at a time, each rematerialised in the backward pass: the sorted copies of only one
    round of one head are alive at once.
    """
    batch, n_heads, length, d_qk = qk.shape
    if rotations is None:
        rotations = random_rotations(rng, d_qk, n_buckets, n_hashes, n_heads)
    config = dict(n_buckets=n_buckets, chunk_len=chunk_len, n_chunks_before=n_chunks_before,
                  n_chunks_after=n_chunks_after, causal=causal, dropout_rate=dropout_rate,
                  chunks_per_block=chunks_per_block, qk_scale=qk_scale)
    n_rounds = rotations[0].shape[-3]
    if n_heads == 1 or batch * n_heads * n_rounds * length <= _HEAD_LOOP_ROWS:
        return _lsh_attention_heads(qk, v, mask, rotations, dropout_rng, **config)

    def one_head(args):
        qk_h, v_h, rotations_h, index = args
        return attend_one_head(qk_h, v_h, mask, rotations_h, dropout_rng, index, v.dtype, config)

    out, lse = lax.map(
        jax.checkpoint(one_head, prevent_cse=False),
        (jnp.moveaxis(qk, 1, 0), jnp.moveaxis(v, 1, 0), rotations,
         jnp.arange(n_heads, dtype=jnp.int32)))
    return jnp.moveaxis(out, 0, 1), jnp.moveaxis(lse, 0, 1)


def attend_one_head(qk_h, v_h, mask, rotations_h, dropout_rng, index, dtype, config):
    """LSH attention of one head, `qk_h (B, L, d_qk)`, `v_h (B, L, d_v)`, rotations
    `(R, d_qk, f/2)` per factor -> `(out (B, L, d_v) in dtype, lse (B, L))`.

    The hash rounds run one after the other (a `lax.scan`, so that no scheduler overlaps
    them) and are merged as they come (a running log-sum-exp), so no `(R, B, L, d_v)` stack
    of round outputs exists. The gradient (`_rounds_bwd`) walks the rounds again, rebuilding
    and differentiating one round at a time: only that round's sorted copies are alive.
    Round r of head `index` draws its attention dropout from
    `fold_in(dropout_rng, index * R + r)`.
    """
    key = jax.random.PRNGKey(0) if dropout_rng is None else dropout_rng
    out, lse = _rounds(_RoundsConfig(tuple(sorted(config.items())), dropout_rng is not None),
                       qk_h, v_h, mask, rotations_h, key, index)
    return out.astype(dtype), lse


class _RoundsConfig(NamedTuple):
    """Static settings of `_rounds`: `_lsh_attention_heads`' keywords, and whether the
    rounds draw dropout."""

    items: tuple
    has_rng: bool


def _round(config, qk, v, mask, rotations_h, rng, index, r):
    """Round `r` of one head: `(out (B, L, d_v) float32, lse (B, L))`."""
    n_rounds = rotations_h[0].shape[0]
    round_rng = jax.random.fold_in(rng, index * n_rounds + r) if config.has_rng else None
    rot = tuple(lax.dynamic_index_in_dim(a, r, keepdims=False)[None, None] for a in rotations_h)
    out, lse = _lsh_attention_heads(qk[:, None], v[:, None], mask, rot, round_rng, merge=False,
                                    **dict(config.items))
    return out[:, 0, 0].astype(jnp.float32), lse[:, 0, 0]


def _rounds_forward(config, qk, v, mask, rotations_h, rng, index):
    """The rounds merged as they come: out = sum_r softmax_r(lse_r) * out_r; also every
    round's lse `(R, B, L)` (for the gradient) and the merged lse."""
    n_rounds = rotations_h[0].shape[0]
    batch, length = qk.shape[:2]

    def step(carry, r):
        top, total, acc = carry
        out_r, lse_r = _round(config, qk, v, mask, rotations_h, rng, index, r)
        new_top = jnp.maximum(top, lse_r)
        old, this = jnp.exp(top - new_top), jnp.exp(lse_r - new_top)
        acc = acc * old[..., None] + out_r * this[..., None]
        return (new_top, total * old + this, acc), lse_r

    init = (jnp.full((batch, length), -jnp.inf, jnp.float32),
            jnp.zeros((batch, length), jnp.float32),
            jnp.zeros((batch, length, v.shape[-1]), jnp.float32))
    (top, total, acc), lses = lax.scan(step, init, jnp.arange(n_rounds, dtype=jnp.int32))
    return acc / total[..., None], top + jnp.log(total), lses


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _rounds(config, qk, v, mask, rotations_h, rng, index):
    out, lse, _ = _rounds_forward(config, qk, v, mask, rotations_h, rng, index)
    return out, lse


def _rounds_fwd(config, qk, v, mask, rotations_h, rng, index):
    out, lse, lses = _rounds_forward(config, qk, v, mask, rotations_h, rng, index)
    return (out, lse), (qk, v, mask, rotations_h, rng, index, out, lse, lses)


def _rounds_bwd(config, residuals, cotangents):
    """Round by round: rebuild the round, and pull back d out_r = w_r d_out and
    d lse_r = w_r (d_out . (out_r - out) + d_lse), w_r = softmax_r(lse_r) its merge weight."""
    qk, v, mask, rotations_h, rng, index, out, _, lses = residuals
    d_out, d_lse = cotangents
    d_out = d_out.astype(jnp.float32)
    delta = jnp.sum(d_out * out, axis=-1)

    def step(carry, r_and_w):
        d_qk, d_v = carry
        r, w = r_and_w
        (out_r, _), vjp = jax.vjp(
            lambda q_, v_: _round(config, q_, v_, mask, rotations_h, rng, index, r), qk, v)
        d_lse_r = w * (jnp.sum(d_out * out_r, axis=-1) - delta + d_lse)
        g_qk, g_v = vjp((w[..., None] * d_out, d_lse_r))
        return (d_qk + g_qk.astype(jnp.float32), d_v + g_v.astype(jnp.float32)), None

    zeros = (jnp.zeros(qk.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    # softmax, not exp(lse_r - lse): lse can be about -1e5 (self-only queries), where its
    # float32 rounding would leave weights that do not sum to one.
    weights = jax.nn.softmax(lses, axis=0)
    (d_qk, d_v), _ = lax.scan(step, zeros, (jnp.arange(lses.shape[0], dtype=jnp.int32), weights))
    return (d_qk.astype(qk.dtype), d_v.astype(v.dtype), _no_grad(mask), _no_grad(rotations_h),
            _no_grad(rng), _no_grad(index))


def _no_grad(tree):
    """Zero cotangents of inputs that are not differentiated (masks, rotations, keys)."""
    def zero(a):
        if jnp.issubdtype(a.dtype, jnp.inexact):
            return jnp.zeros_like(a)
        return np.zeros(a.shape, dtype=jax.dtypes.float0)

    return jax.tree.map(zero, tree)


_rounds.defvjp(_rounds_fwd, _rounds_bwd)


def by_head_applies(batch: int, n_heads: int, n_rounds: int, length: int) -> bool:
    """Whether inputs of this size run one head at a time (`_HEAD_LOOP_ROWS`)."""
    return n_heads > 1 and batch * n_heads * n_rounds * length > _HEAD_LOOP_ROWS


def _lsh_attention_heads(qk, v, mask, rotations, dropout_rng, *, n_buckets, chunk_len,
                         n_chunks_before, n_chunks_after, causal, dropout_rate,
                         chunks_per_block, qk_scale, merge=True):
    """The LSH attention of all heads of `qk`, `v` at once, given per-head rotations.

    Returns the rounds merged, `(B, H, L, d_v), (B, H, L)`, or with `merge=False` each round's
    `(B, H, R, L, d_v)` output and `(B, H, R, L)` log-sum-exp.
    """
    perm = sort_order(qk, mask, rotations, n_buckets=n_buckets, chunk_len=chunk_len)
    return _attend_sorted(qk, v, mask, perm, dropout_rng, chunk_len=chunk_len,
                          n_chunks_before=n_chunks_before, n_chunks_after=n_chunks_after,
                          causal=causal, dropout_rate=dropout_rate,
                          chunks_per_block=chunks_per_block, qk_scale=qk_scale, merge=merge)


def sort_order(qk, mask, rotations, *, n_buckets, chunk_len):
    """Each hash round's order of the positions: `qk (B, H, L, d_qk)` -> `perm (B, H, R, Lp)`
    int32, `Lp` the length padded to a multiple of the chunk (`min(chunk_len, L)`).

    Sorted by (bucket, position); padding and masked positions (mask `(B, L)`, False) take
    the bucket past the last, so they come last. A function of `qk`'s hash buckets only, so
    a recomputation of the same forward pass may reuse it (`LSHSelfAttention`'s
    `apply_and_save`).
    """
    length = qk.shape[2]
    buckets = hash_vectors(qk, n_buckets, rotations=rotations)  # (B, H, R, L)
    c = min(chunk_len, length)
    pad = -(-length // c) * c - length
    pad_bucket = total_buckets(n_buckets)
    if mask is not None:
        buckets = jnp.where(mask.astype(bool)[:, None, None, :], buckets, pad_bucket)
    if pad:
        buckets = jnp.pad(buckets, [(0, 0)] * 3 + [(0, pad)], constant_values=pad_bucket)
    return lax.stop_gradient(_sort_by_bucket(buckets, pad_bucket)[0])


def _attend_sorted(qk, v, mask, perm, dropout_rng, *, chunk_len, n_chunks_before,
                   n_chunks_after, causal, dropout_rate, chunks_per_block, qk_scale,
                   merge=True):
    """`_lsh_attention_heads` given the rounds' order `perm` (`sort_order`'s): sort, chunk,
    attend, undo the sort, merge the rounds (unless `merge=False`)."""
    batch, n_heads, length, d_qk = qk.shape
    n_rounds, padded_len = perm.shape[2:]
    c = min(chunk_len, length)
    n_chunks = padded_len // c
    pad = padded_len - length
    if pad:
        qk = jnp.pad(qk, [(0, 0), (0, 0), (0, pad), (0, 0)])
        v = jnp.pad(v, [(0, 0), (0, 0), (0, pad), (0, 0)])

    inverse = inverse_permutation(perm)
    groups, shape = batch * n_heads, (batch * n_heads * n_rounds, n_chunks, c)
    by_round = (groups, n_rounds, padded_len)
    perm_g, inverse_g = perm.reshape(by_round), inverse.reshape(by_round)

    def sort(a):  # (B, H, Lp, d) -> (B*H*R, n_chunks, c, d) in each round's sorted order
        return gather_rows(a.reshape(groups, padded_len, -1), perm_g, inverse_g).reshape(
            *shape, a.shape[-1])

    sq, sv = sort(qk), sort(v)
    spos = perm.reshape(shape)
    # Keys' positions, with -1 for padding and masked positions (sorted last, see
    # `sort_order`): never equal to, nor after, a query position.
    valid = spos < length
    if mask is not None:
        keep = jnp.broadcast_to(mask.astype(bool)[:, None, None, :],
                                (batch, n_heads, n_rounds, length))
        keep = jnp.pad(keep, [(0, 0)] * 3 + [(0, pad)])
        valid = valid & jnp.take_along_axis(keep, perm, axis=-1).reshape(shape)
    skpos = jnp.where(valid, spos, -1)
    out, lse = blocked_attention(
        sq, length_normalized(sq), sv, spos, skpos,
        offsets=window_offsets(n_chunks, n_chunks_before, n_chunks_after),
        scale=qk_scale, causal=causal, self_value=SELF_ATTENTION_VALUE,
        dropout_rate=dropout_rate, dropout_rng=dropout_rng, chunks_per_block=chunks_per_block)

    # Undo the sort, cut the padding, merge the rounds.
    flat = (groups * n_rounds, 1, padded_len)
    inverse_f, perm_f = inverse.reshape(flat), perm.reshape(flat)

    def unsort(a):  # (B*H*R, n_chunks, c, d) -> (B, H, R, L, d) in position order
        a = gather_rows(a.reshape(groups * n_rounds, padded_len, -1), inverse_f, perm_f)
        return a.reshape(batch, n_heads, n_rounds, padded_len, -1)[:, :, :, :length]

    out, lse = unsort(out), unsort(lse[..., None])[..., 0]
    if not merge:
        return out, lse
    return _merge_rounds(out, lse, v.dtype)


def _sort_by_bucket(buckets, pad_bucket):
    """Sorts each round by (bucket, position): `(perm, sorted_buckets)`, both like `buckets`.

    One int32 key `bucket * length + position` when it fits (a one-operand sort is several
    times faster on CPU than a two-key sort), else a two-key sort.
    """
    length = buckets.shape[-1]
    positions = lax.broadcasted_iota(jnp.int32, buckets.shape, buckets.ndim - 1)
    if (pad_bucket + 1) * length < 2**31:
        key = lax.sort(buckets * length + positions, dimension=buckets.ndim - 1)
        return key % length, key // length
    sorted_buckets, perm = lax.sort((buckets, positions), dimension=buckets.ndim - 1, num_keys=2)
    return perm, sorted_buckets


def _merge_rounds(o, lse, dtype):
    """(B, H, R, L, d), (B, H, R, L) -> (B, H, L, d), (B, H, L)."""
    # softmax (not exp(lse - total)): lse can be about -1e5 (self-only queries), where the
    # rounding of `total` in float32 would leave weights that do not sum to one.
    weights = jax.nn.softmax(lse, axis=2)
    out = jnp.sum(weights[..., None] * o, axis=2)
    return out.astype(dtype), jax.nn.logsumexp(lse, axis=2)


# -- the layer --------------------------------------------------------------------------------
class LSHSelfAttention(Layer):
    """LSH self-attention with shared QK (Reformer): `(batch, length, d_model) -> same`.

    With `use_mask=True` the layer takes `(x, mask)`, mask `(batch, length)` bool/0-1 with True
    for real tokens; masked positions are never attended to. Output is `(batch, length, d_model)`.

    Weights: `{'w_qk': [d_model, n_heads*d_qk], 'w_v': [d_model, n_heads*d_v],
    'w_o': [n_heads*d_v, d_model]}` (+ `'b_o': [d_model]` when `use_bias`). A subclass may replace
    the projections by overriding `init_projections`, `project_qk_v` and `project_output`.

    State: `{'hash_rng': key}`, a key drawn at init from the init rng. In `train` mode the hash
    rotations are drawn afresh from the call's rng (required); in `eval` and `predict` they are
    derived from `state['hash_rng']`, so the same weights and state give the same output. A
    `predict` layer agrees with an `eval` layer when both were initialised with the same rng (or
    given the same state key).

    Lengths that are not a multiple of `chunk_len` are padded internally (masked, then cut).

    Args:
      n_heads, d_qk, d_v: heads and their query-key and value sizes.
      causal: mask keys at later positions (needed for `predict` decoding).
      chunk_len, n_chunks_before, n_chunks_after, n_hashes, n_buckets: as in `lsh_attention`.
        `n_buckets` is an int (1 or even), a pair (a, b) for factored hashing, or chosen from
        the length (`resolve_n_buckets`): None (the default, Trax's rule: about two buckets a
        chunk) or 'chunks' (one a chunk); from `max_length_for_buckets` when given, and in
        causal `predict` mode from `predict_mem_len` unless `max_length_for_buckets` is given
        (set it so that eval and predict hash alike).
      attention_dropout: dropout on attention probabilities, `train` mode only.
      output_dropout: dropout on the layer's output, `train` mode only.
      mode: 'train', 'eval' or 'predict'.
      predict_mem_len, predict_drop_len: the decoding cache (see below).
      use_mask: take `(x, mask)` instead of `x`.
      use_bias: add an output bias `b_o` (Trax's LSH layer has none by default).
      chunks_per_block: chunks per block of the attention (default: automatic).
      qk_scale: the factor of every score `q . k` (keys are unit vectors). 1.0 (the default)
        is Trax's function, which learns text quickly; a short task that needs its attention
        found by search early, such as the copy task, learns sooner with softer scores
        (`gin/reformer_copy.gin` sets `1/sqrt(d_qk)`). `benchmarks/learning_parity.py` and
        `benchmarks/RESULTS.md` hold the runs behind this choice.
      hash_per_example: in `train` mode, hash each batch element with its own rotations (and
        dropout draws), as Trax does; False shares one set per head across the batch. `eval`
        and `predict` always use the one set derived from `state['hash_rng']`.

    `predict` mode (causal only; a non-causal layer in predict mode runs the full eval forward on
    each input and keeps no cache): the state also holds preallocated buffers in the layout of
    `kv_cache`, `k_mem [batch, n_heads, predict_mem_len, d_qk]` (unit-length keys),
    `v_mem [..., d_v]`, `buckets [batch, n_heads, n_hashes, predict_mem_len]`,
    `valid [batch, predict_mem_len]`, `fill` (cached positions) and `pos` (the next absolute
    position), and the bucket index of `lsh_cache` (`bucket_index [batch, n_heads, n_hashes,
    n_buckets, predict_bucket_capacity]`, `bucket_count`): per bucket, the positions of its
    last `predict_bucket_capacity` tokens. Each call writes its new tokens at `fill`
    (`kv_cache.write_at`: a linear buffer, not a ring, since old positions leave it in blocks)
    and adds them to the index. The same rotations as eval hash them. What the new queries see:

    - A call of several tokens on an empty cache (`fill == 0`: a prompt) is the eval forward
      pass on those tokens (`lsh_attention`, causal: hash, sort, chunk, O(T log T)), and fills
      the cache and the index from them. Feed a long prompt in one call: `decoding.Decoder`
      does, as `prefill_in_one_call()` says.
    - Every later query ("own bucket") attends, in each hash round, to the cached and new keys
      at earlier-or-equal positions that fall in its own bucket, and the rounds are merged as
      in eval. One token reads only its buckets' index entries, `n_hashes *
      predict_bucket_capacity` cached keys whatever the cache length; several tokens on a
      non-empty cache scan the whole cache (O(T * predict_mem_len) per head and round). The two
      agree while no bucket holds more than `predict_bucket_capacity` cached positions; beyond,
      a one-token query forgets its bucket's oldest ones.

    The prompt's outputs thus equal the eval forward's, and later tokens equal it whenever each
    query's chunk window in eval holds exactly its bucket's earlier keys, e.g. `n_buckets=1` and
    `chunk_len >= length`; with a single bucket feeding tokens one at a time equals any split
    into calls. When the new tokens do not fit, the oldest positions are dropped in multiples
    of `predict_drop_len` (clipped to `predict_mem_len`), as few as make room;
    `predict_drop_len=0` drops none, and an overflowing call then raises a ValueError (or, when
    the state is traced under jit, returns NaN outputs). One call may feed at most
    `predict_mem_len` tokens, else a ValueError. `predict_bucket_capacity` (default
    `4 * chunk_len`, at most `predict_mem_len`) sizes the index: buckets hold about
    `chunk_len` tokens each when `n_buckets` follows the length (`resolve_n_buckets`).
    """

    def __init__(
        self,
        n_heads: int = 2,
        d_qk: int = 64,
        d_v: int = 64,
        causal: bool = False,
        chunk_len: int = 128,
        n_chunks_before: int = 1,
        n_chunks_after: int = 0,
        n_hashes: int = 1,
        n_buckets=None,
        attention_dropout: float = 0.0,
        output_dropout: float = 0.0,
        mode: str = "train",
        predict_mem_len: int = 2048,
        predict_drop_len: int = 256,
        use_mask: bool = False,
        max_length_for_buckets: int | None = None,
        use_bias: bool = False,
        chunks_per_block: int | None = None,
        qk_scale: float = 1.0,
        hash_per_example: bool = True,
        predict_bucket_capacity: int | None = None,
    ):
        who = "LSHSelfAttention"
        for name, value in (
            ("n_heads", n_heads),
            ("d_qk", d_qk),
            ("d_v", d_v),
            ("predict_mem_len", predict_mem_len),
        ):
            check_int(name, value, 1, who)
        check_int("predict_drop_len", predict_drop_len, 0, who)
        if predict_bucket_capacity is not None:
            check_int("predict_bucket_capacity", predict_bucket_capacity, 1, who)
        _check_lsh_args(chunk_len, n_chunks_before, n_chunks_after, n_hashes, who)
        check_rate("attention_dropout", attention_dropout, who)
        check_rate("output_dropout", output_dropout, who)
        super().__init__(n_in=2 if use_mask else 1, n_out=1, name=who)
        self.n_heads, self.d_qk, self.d_v = int(n_heads), int(d_qk), int(d_v)
        self.causal = bool(causal)
        self.chunk_len = int(chunk_len)
        self.n_chunks_before, self.n_chunks_after = int(n_chunks_before), int(n_chunks_after)
        self.n_hashes = int(n_hashes)
        self.n_buckets = check_n_buckets(n_buckets, who)
        self.attention_dropout, self.output_dropout = attention_dropout, output_dropout
        self.mode = check_mode(mode)
        self.predict_mem_len = int(predict_mem_len)
        self.predict_drop_len = min(int(predict_drop_len), self.predict_mem_len)
        self.use_mask = bool(use_mask)
        self.max_length_for_buckets = max_length_for_buckets
        self.use_bias = bool(use_bias)
        self.chunks_per_block = chunks_per_block
        self.qk_scale = check_qk_scale(qk_scale, who)
        self.hash_per_example = bool(hash_per_example)
        self.predict_bucket_capacity = min(
            self.predict_mem_len,
            4 * self.chunk_len if predict_bucket_capacity is None
            else int(predict_bucket_capacity))

    # -- projections (override to use other layers) ------------------------------------------
    def init_projections(self, d_model: int, rng) -> dict:
        """The projection weights for inputs with `d_model` features."""
        r_qk, r_v, r_o = jax.random.split(rng, 3)
        weights = {
            "w_qk": init_lib.glorot_uniform(r_qk, (d_model, self.n_heads * self.d_qk)),
            "w_v": init_lib.glorot_uniform(r_v, (d_model, self.n_heads * self.d_v)),
            "w_o": init_lib.glorot_uniform(r_o, (self.n_heads * self.d_v, d_model)),
        }
        if self.use_bias:
            weights["b_o"] = jnp.zeros((d_model,), jnp.float32)
        return weights

    def _split_heads(self, y, d):
        return y.reshape(*y.shape[:-1], self.n_heads, d).transpose(0, 2, 1, 3)

    def project_qk_v(self, x, weights):
        """`x (batch, length, d_model)` -> `(qk (batch, heads, length, d_qk), v (..., d_v))`."""
        if x.shape[-1] != weights["w_qk"].shape[0]:
            raise ValueError(
                f"{self.name}: expected inputs with last axis {weights['w_qk'].shape[0]}, "
                f"got shape {tuple(x.shape)}"
            )
        # One product for both: the backward pass then also makes one [length, d_model]
        # gradient of x (no second product and sum) and one weight gradient.
        w = jnp.concatenate([weights["w_qk"], weights["w_v"]], axis=1).astype(x.dtype)
        qk, v = jnp.split(jnp.dot(x, w), [weights["w_qk"].shape[1]], axis=-1)
        return self._split_heads(qk, self.d_qk), self._split_heads(v, self.d_v)

    def project_output(self, o, weights):
        """`o (batch, heads, length, d_v)` -> `(batch, length, d_model)`."""
        o = o.transpose(0, 2, 1, 3).reshape(o.shape[0], o.shape[2], -1)
        y = jnp.dot(o, weights["w_o"].astype(o.dtype))
        if "b_o" in weights:
            y = y + lax.broadcast_to_rank(weights["b_o"].astype(o.dtype), y.ndim)
        return y

    # -- init ----------------------------------------------------------------------------------
    def init_weights_and_state(self, input_signature, rng):
        items = input_signature if isinstance(input_signature, tuple) else (input_signature,)
        if len(items) != self.n_in:
            raise ValueError(f"{self.name}: takes {self.n_in} inputs, got {len(items)}")
        x_sig = items[0]
        if len(x_sig.shape) != 3:
            raise ValueError(
                f"{self.name}: x must be (batch, length, d_model), got shape {x_sig.shape}"
            )
        r_w, r_hash = jax.random.split(rng)
        weights = self.init_projections(x_sig.shape[-1], r_w)
        state = {"hash_rng": r_hash}
        if self.mode == "predict" and self.causal:
            batch, mem = x_sig.shape[0], self.predict_mem_len
            dtype = x_sig.dtype if jnp.issubdtype(x_sig.dtype, jnp.floating) else jnp.float32
            state.update(
                k_mem=jnp.zeros((batch, self.n_heads, mem, self.d_qk), dtype),
                v_mem=jnp.zeros((batch, self.n_heads, mem, self.d_v), dtype),
                buckets=jnp.zeros((batch, self.n_heads, self.n_hashes, mem), jnp.int32),
                valid=jnp.zeros((batch, mem), bool),
                fill=jnp.zeros((), jnp.int32),
                pos=jnp.zeros((), jnp.int32),
                **lsh_cache.new_index(batch, self.n_heads, self.n_hashes,
                                      total_buckets(self._predict_n_buckets()),
                                      self.predict_bucket_capacity),
            )
        return weights, state

    def _predict_n_buckets(self):
        """The bucket count of a causal predict-mode layer (from `_bucket_length`, which does not
        depend on a call's length)."""
        return resolve_n_buckets(self.n_buckets, 1, self.chunk_len, self._bucket_length(1))

    def prefill_in_one_call(self) -> bool:
        """True for a causal predict-mode layer: a prompt fed in one call on an empty cache is
        read by the eval forward pass, O(T log T), while a prompt fed in pieces makes every
        piece after the first scan the whole cache."""
        return self.mode == "predict" and self.causal

    def predict_context(self) -> int | None:
        """`predict_mem_len` for a causal predict-mode layer: beyond it the oldest positions
        are dropped."""
        return self.predict_mem_len if self.mode == "predict" and self.causal else None

    # -- apply ---------------------------------------------------------------------------------
    def _inputs(self, x):
        items = as_items(x, self.n_in, self.name)
        x = items[0]
        if x.ndim != 3:
            raise ValueError(f"{self.name}: x must be (batch, length, d_model), got {x.shape}")
        mask = None
        if self.use_mask:
            mask = items[1]
            if tuple(mask.shape) != tuple(x.shape[:2]):
                raise ValueError(
                    f"{self.name}: mask must be (batch, length) = {tuple(x.shape[:2])}, "
                    f"got {tuple(mask.shape)}"
                )
            mask = mask.astype(bool)
        return x, mask

    def _bucket_length(self, length):
        if self.mode == "predict" and self.causal and self.max_length_for_buckets is None:
            return self.predict_mem_len
        return self.max_length_for_buckets or length

    def apply(self, x, weights, state, rng):
        x, mask = self._inputs(x)
        if self.mode == "predict" and self.causal:
            return self._apply_predict(x, mask, weights, state)
        r_hash, r_attn, r_out, n_buckets, attn_rate = self._call_settings(x, state, rng)
        # Trax's training hashes each example with its own rotations; a batch of one needs
        # no vmap for that.
        per_example = self._hashes_per_example(x)
        if self._projects_by_head(x):
            def by_head(x, mask, r_hash, r_attn):
                return self._apply_by_head(x, mask, weights, r_hash, r_attn, n_buckets,
                                           attn_rate)

            y = (_per_example(by_head, (x,), mask, r_hash, r_attn) if per_example
                 else by_head(x, mask, r_hash, r_attn))
            return dropout_fn(y, self.output_dropout, r_out, self.mode), state

        def attend(qk, v, mask, r_hash, r_attn):
            # The rotations, random_rotations(r_hash, d_qk, n_buckets, n_hashes, n_heads), are
            # drawn inside lsh_attention's compiled program.
            return lsh_attention(
                qk, v, r_hash, n_hashes=self.n_hashes, n_buckets=n_buckets,
                chunk_len=self.chunk_len, n_chunks_before=self.n_chunks_before,
                n_chunks_after=self.n_chunks_after, causal=self.causal, mask=mask,
                dropout_rate=attn_rate, dropout_rng=r_attn,
                chunks_per_block=self.chunks_per_block, qk_scale=self.qk_scale,
            )[0]

        qk, v = self.project_qk_v(x, weights)
        o = (_per_example(attend, (qk, v), mask, r_hash, r_attn) if per_example
             else attend(qk, v, mask, r_hash, r_attn))
        y = self.project_output(o, weights)
        return dropout_fn(y, self.output_dropout, r_out, self.mode), state

    def apply_and_save(self, x, weights, state, rng):
        """`apply`, saving each hash round's sort order (`sort_order`, `(B, H, R, Lp)`
        int32) for a recomputation of this call (the reversible backward pass), which then
        neither hashes nor sorts. Saved when the heads are attended all at once (inputs
        below `by_head_applies`) in `train` or `eval` mode with one set of rotations for the
        batch; otherwise nothing is saved (`()`) and a recomputation hashes again."""
        if not self._saves_sort_order(x):
            return super().apply_and_save(x, weights, state, rng)
        y, perm = self._apply_sorted(x, weights, state, rng, None)
        return y, state, perm

    def apply_with_saved(self, x, weights, state, rng, saved):
        if not jax.tree.leaves(saved):
            return self.apply(x, weights, state, rng)
        if not self._saves_sort_order(x):
            raise ValueError(f"{self.name}: apply_with_saved got a saved sort order for inputs "
                             "that apply_and_save saves nothing for")
        y, _ = self._apply_sorted(x, weights, state, rng, saved)
        return y, state

    def _saves_sort_order(self, x) -> bool:
        x = as_items(x, self.n_in, self.name)[0]
        return (self.mode in ("train", "eval") and x.ndim == 3
                and not self._hashes_per_example(x)
                and not by_head_applies(x.shape[0], self.n_heads, self.n_hashes, x.shape[1]))

    def _apply_sorted(self, x, weights, state, rng, perm):
        """The all-heads path of `apply` (as `lsh_attention` computes it), sorting by `perm`
        when given, else by the hash: `(y, perm)`."""
        x, mask = self._inputs(x)
        r_hash, r_attn, r_out, n_buckets, attn_rate = self._call_settings(x, state, rng)
        qk, v = self.project_qk_v(x, weights)
        if perm is None:
            rotations = random_rotations(r_hash, self.d_qk, n_buckets, self.n_hashes,
                                         self.n_heads)
            perm = sort_order(qk, mask, rotations, n_buckets=n_buckets,
                              chunk_len=self.chunk_len)
        o, _ = _attend_sorted(
            qk, v, mask, perm, r_attn if attn_rate > 0.0 else None, chunk_len=self.chunk_len,
            n_chunks_before=self.n_chunks_before, n_chunks_after=self.n_chunks_after,
            causal=self.causal, dropout_rate=float(attn_rate),
            chunks_per_block=self.chunks_per_block, qk_scale=self.qk_scale)
        y = self.project_output(o, weights)
        return dropout_fn(y, self.output_dropout, r_out, self.mode), perm

    def _call_settings(self, x, state, rng):
        """`(r_hash, r_attn, r_out, n_buckets, attention dropout rate)` of a train/eval call."""
        if self.mode == "train":
            if rng is None:
                raise ValueError(f"{self.name} in train mode needs an rng; pass rng= to apply")
            r_hash, r_attn, r_out = jax.random.split(rng, 3)
        else:
            r_hash, r_attn, r_out = state["hash_rng"], None, None
        n_buckets = resolve_n_buckets(
            self.n_buckets, x.shape[1], self.chunk_len, self._bucket_length(x.shape[1])
        )
        attn_rate = self.attention_dropout if self.mode == "train" else 0.0
        return r_hash, r_attn, r_out, n_buckets, attn_rate

    def _hashes_per_example(self, x) -> bool:
        """Whether a call hashes each batch element with its own rotations (Trax's training)."""
        return self.mode == "train" and self.hash_per_example and x.shape[0] > 1

    def _projects_by_head(self, x) -> bool:
        """Whether `apply` runs projections and attention one head at a time: for inputs long
        enough that `lsh_attention` would loop over heads anyway (`by_head_applies`), when the
        projections are this class's own (a subclass's may not split by head)."""
        cls = type(self)
        return (cls.project_qk_v is LSHSelfAttention.project_qk_v
                and cls.project_output is LSHSelfAttention.project_output
                and by_head_applies(x.shape[0], self.n_heads, self.n_hashes, x.shape[1]))

    def _apply_by_head(self, x, mask, weights, r_hash, r_attn, n_buckets, attn_rate):
        """`project_output(lsh_attention(*project_qk_v(x)))`, one head at a time.

        A `lax.scan` over heads adds each head's `o_h @ w_o[h]` to the output; its body (the
        head's QK and V projections, its hash rounds one at a time, its output projection)
        is rematerialised in the backward pass. So no `(batch, heads, length, d)` array
        exists in either pass: per head, only `(batch, length, d_qk or d_v)` ones. The hash
        rotations and dropout keys are those of `lsh_attention`'s head loop, so the result
        equals the all-heads path up to float round-off (the output projection is summed
        head by head).
        """
        batch, length, d_model = x.shape
        if d_model != weights["w_qk"].shape[0]:
            raise ValueError(
                f"{self.name}: expected inputs with last axis {weights['w_qk'].shape[0]}, "
                f"got shape {tuple(x.shape)}"
            )
        h = self.n_heads
        rotations = random_rotations(r_hash, self.d_qk, n_buckets, self.n_hashes, h)
        config = dict(n_buckets=n_buckets, chunk_len=self.chunk_len,
                      n_chunks_before=self.n_chunks_before, n_chunks_after=self.n_chunks_after,
                      causal=self.causal, dropout_rate=float(attn_rate),
                      chunks_per_block=self.chunks_per_block, qk_scale=self.qk_scale)
        dropout_rng = r_attn if attn_rate > 0.0 else None
        # Each head's QK and V projections side by side: one product a head.
        w_qkv = jnp.concatenate([weights["w_qk"].reshape(d_model, h, self.d_qk),
                                 weights["w_v"].reshape(d_model, h, self.d_v)], axis=2)
        per_head = (w_qkv.transpose(1, 0, 2), weights["w_o"].reshape(h, self.d_v, d_model),
                    rotations, jnp.arange(h, dtype=jnp.int32))

        @functools.partial(jax.checkpoint, prevent_cse=False)
        def head(y, args):
            w_qkv, w_o, rotations_h, index = args
            qk, v = jnp.split(jnp.dot(x, w_qkv.astype(x.dtype)), [self.d_qk], axis=-1)
            out, _ = attend_one_head(qk, v, mask, rotations_h, dropout_rng, index, x.dtype, config)
            return y + jnp.dot(out, w_o.astype(out.dtype)), None

        y, _ = lax.scan(head, jnp.zeros((batch, length, d_model), x.dtype), per_head)
        if "b_o" in weights:
            y = y + lax.broadcast_to_rank(weights["b_o"].astype(y.dtype), y.ndim)
        return y

    def _apply_predict(self, x, mask, weights, state):
        batch, n_new = x.shape[:2]
        mem_len, drop_len = self.predict_mem_len, self.predict_drop_len
        if n_new > mem_len:
            raise ValueError(
                f"{self.name}: predict mode takes at most predict_mem_len={mem_len} tokens per "
                f"call, got {n_new}; feed the prompt in pieces or raise predict_mem_len"
            )
        if state["k_mem"].shape[0] != batch:
            raise ValueError(
                f"{self.name}: predict state was built for batch {state['k_mem'].shape[0]}, "
                f"got batch {batch}"
            )
        fill, pos = state["fill"], state["pos"]
        if drop_len == 0 and not isinstance(fill, jax.core.Tracer):
            if int(fill) + n_new > mem_len:
                raise ValueError(
                    f"{self.name}: predict memory of {mem_len} positions is full ({int(fill)} "
                    f"cached, {n_new} new) and predict_drop_len=0 drops none"
                )

        qk, v = self.project_qk_v(x, weights)  # (B, H, T, d)
        n_buckets = self._predict_n_buckets()
        rotations = random_rotations(
            state["hash_rng"], self.d_qk, n_buckets, self.n_hashes, self.n_heads
        )
        q_buckets = hash_vectors(qk, n_buckets, rotations=rotations)  # (B, H, R, T)
        keep = jnp.ones((batch, n_new), bool) if mask is None else mask

        mem = {k: state[k] for k in _MEMORY_POSITION_AXIS}
        overflow = fill + n_new > mem_len
        if drop_len > 0:
            n_drop = jnp.minimum(fill, -(-(fill + n_new - mem_len) // drop_len) * drop_len)
            n_drop = jnp.where(overflow, n_drop, 0)

            def shift(m):
                src = jnp.minimum(jnp.arange(mem_len) + n_drop, mem_len - 1)
                out = {k: jnp.take(a, src, axis=_MEMORY_POSITION_AXIS[k]) for k, a in m.items()}
                kept = jnp.arange(mem_len) < mem_len - n_drop
                out["valid"] = out["valid"] & lax.broadcast_to_rank(kept, out["valid"].ndim)
                return out

            mem = lax.cond(n_drop > 0, shift, lambda m: m, mem)
            fill = fill - n_drop
            overflow = fill + n_new > mem_len

        new = {"k_mem": length_normalized(qk), "v_mem": v, "buckets": q_buckets, "valid": keep}
        mem = {name: kv_cache.write_at(mem[name], new[name], fill, _MEMORY_POSITION_AXIS[name])
               for name in mem}
        # The index holds absolute positions: dropping old positions only raises `base`.
        base = pos - fill
        index = lsh_cache.insert({k: state[k] for k in (lsh_cache.INDEX, lsh_cache.COUNT)},
                                 q_buckets, pos + jnp.arange(n_new, dtype=jnp.int32), keep)

        if n_new == 1:
            o = _indexed_attention(qk, q_buckets, fill, base, mem["k_mem"], mem["v_mem"], index,
                                   self.qk_scale)
        else:
            def scan_cache():
                return _predict_attention(
                    qk, q_buckets, fill + jnp.arange(n_new, dtype=jnp.int32), mem["k_mem"],
                    mem["v_mem"], mem["buckets"], mem["valid"], self.qk_scale)

            def eval_forward():  # a prompt on an empty cache
                o, _ = lsh_attention(
                    qk, v, rotations=rotations, n_buckets=n_buckets, chunk_len=self.chunk_len,
                    n_chunks_before=self.n_chunks_before, n_chunks_after=self.n_chunks_after,
                    causal=True, mask=mask, chunks_per_block=self.chunks_per_block,
                    qk_scale=self.qk_scale)
                return o.astype(jnp.float32)

            if isinstance(fill, jax.core.Tracer):
                o = lax.cond(fill == 0, eval_forward, scan_cache)
            else:
                o = eval_forward() if int(fill) == 0 else scan_cache()
        y = self.project_output(o.astype(x.dtype), weights)
        y = jnp.where(overflow, jnp.nan, y)
        new_state = dict(state, **mem, **index, fill=fill + n_new, pos=pos + n_new)
        return y, new_state


def _per_example(fn, arrays, mask, r_hash, r_attn):
    """`fn(*arrays, mask, r_hash, r_attn)` on each batch element (as one vmapped program), each
    with its own hashing and dropout keys: every example is hashed with its own rotations.
    `arrays` have the batch as their first axis; the result is batched the same way."""
    batch = arrays[0].shape[0]

    def one(arrays_b, mask_b, r_hash_b, r_attn_b):
        mask_b = None if mask_b is None else mask_b[None]
        return fn(*(a[None] for a in arrays_b), mask_b, r_hash_b, r_attn_b)[0]

    r_attn = None if r_attn is None else jax.random.split(r_attn, batch)
    return jax.vmap(one, in_axes=(0, None if mask is None else 0, 0,
                                  None if r_attn is None else 0))(
        tuple(arrays), mask, jax.random.split(r_hash, batch), r_attn)


# The position axis of each predict-mode buffer of LSHSelfAttention.
_MEMORY_POSITION_AXIS = {"k_mem": 2, "v_mem": 2, "buckets": 3, "valid": 1}


def _predict_attention(q, q_buckets, q_slots, k_mem, v_mem, k_buckets, valid, qk_scale,
                       block=None):
    """Bucket-masked causal attention of new queries on the memory.

    q: (B, H, T, d); q_buckets: (B, H, R, T); q_slots: (T,) memory slots of the queries;
    k_mem: (B, H, M, d) unit-length keys; v_mem: (B, H, M, dv); k_buckets: (B, H, R, M);
    valid: (B, M); qk_scale: the factor of every score. Returns (B, H, T, dv) float32.
    """
    batch, n_heads, n_new, d = q.shape
    n_rounds, mem_len = k_buckets.shape[2], k_mem.shape[2]
    slots = jnp.arange(mem_len, dtype=jnp.int32)

    def attend(qb, qbk, qs):
        s = jnp.einsum("bhtd,bhmd->bhtm", qb, k_mem, preferred_element_type=jnp.float32) * qk_scale
        s = jnp.where(slots[None, :] == qs[:, None], SELF_ATTENTION_VALUE, s)
        ok = (slots[None, :] <= qs[:, None])[None, None, None] & valid[:, None, None, None, :]
        ok = ok & (qbk[..., :, None] == k_buckets[..., None, :])  # (B, H, R, t, M)
        s = jnp.where(ok, s[:, :, None], MASK_VALUE)
        lse = jax.nn.logsumexp(s, axis=-1)
        p = jnp.exp(s - lse[..., None])
        o = jnp.einsum("bhrtm,bhmd->bhrtd", p, v_mem.astype(jnp.float32))
        out, _ = _merge_rounds(o, lse, jnp.float32)
        return out

    if block is None:
        block = max(1, _PREDICT_BLOCK_SCORES // (batch * n_heads * n_rounds * mem_len))
    if n_new <= block:
        return attend(q, q_buckets, q_slots)
    n_blocks = -(-n_new // block)
    pad = n_blocks * block - n_new
    qp = jnp.pad(q, [(0, 0), (0, 0), (0, pad), (0, 0)]).reshape(batch, n_heads, n_blocks, block, d)
    bp = jnp.pad(q_buckets, [(0, 0)] * 3 + [(0, pad)]).reshape(
        batch, n_heads, n_rounds, n_blocks, block
    )
    sp = jnp.pad(q_slots, (0, pad)).reshape(n_blocks, block)
    out = lax.map(lambda a: attend(*a), (jnp.moveaxis(qp, 2, 0), jnp.moveaxis(bp, 3, 0), sp))
    out = jnp.moveaxis(out, 0, 2)  # (B, H, nb, blk, dv)
    return out.reshape(batch, n_heads, n_blocks * block, -1)[:, :, :n_new]


def _indexed_attention(q, q_buckets, q_slot, base, k_mem, v_mem, index, qk_scale):
    """One decoding query on the cached keys of its own buckets, read through the bucket index.

    q: (B, H, 1, d); q_buckets: (B, H, R, 1); q_slot: int32, the query's memory slot (its own
    entry is in `index` already); base: the absolute position of slot 0; k_mem: (B, H, M, d)
    unit-length keys; v_mem: (B, H, M, dv); index: `lsh_cache`'s. Reads R * capacity cached
    keys and values; returns (B, H, 1, dv) float32, as `_predict_attention` does when no bucket
    holds more than `capacity` cached positions.
    """
    batch, n_heads, _, _ = q.shape
    slots, live = lsh_cache.lookup(index, q_buckets[..., 0], base, k_mem.shape[2])  # (B,H,R,C)
    n_rounds, capacity = slots.shape[2:]
    b = jnp.arange(batch)[:, None, None]
    h = jnp.arange(n_heads)[None, :, None]
    flat = slots.reshape(batch, n_heads, n_rounds * capacity)
    keys = k_mem[b, h, flat].reshape(batch, n_heads, n_rounds, capacity, -1)
    values = v_mem[b, h, flat].reshape(batch, n_heads, n_rounds, capacity, -1)
    s = jnp.einsum("bhd,bhrcd->bhrc", q[:, :, 0], keys,
                   preferred_element_type=jnp.float32) * qk_scale
    s = jnp.where(slots == q_slot, SELF_ATTENTION_VALUE, s)
    s = jnp.where(live, s, MASK_VALUE)
    lse = jax.nn.logsumexp(s, axis=-1)  # (B, H, R)
    p = jnp.exp(s - lse[..., None])
    o = jnp.einsum("bhrc,bhrcd->bhrd", p, values.astype(jnp.float32))
    out, _ = _merge_rounds(o[:, :, :, None], lse[..., None], jnp.float32)
    return out


# -- permutations with gather-only gradients --------------------------------------------------
@jax.custom_vjp
def gather_rows(x, perm, inverse):
    """`out[g, r, i] = x[g, perm[g, r, i]]`: `x (G, n, d)`, `perm, inverse (G, R, n)` -> `(G, R,
    n, d)`. `perm[g, r]` must be a permutation of `range(n)` and `inverse[g, r]` its inverse; the
    gradient is then a gather too (XLA's scatter-add, the generic gradient, is slow on CPU)."""
    return _gather(x, perm)


def _gather(x, perm):
    g, n, d = x.shape
    rows = (jnp.arange(g, dtype=perm.dtype)[:, None, None] * n + perm).reshape(-1)
    return x.reshape(g * n, d).at[rows].get(mode="promise_in_bounds").reshape(
        *perm.shape, d)


def _gather_rows_fwd(x, perm, inverse):
    return _gather(x, perm), (perm, inverse)


def _gather_rows_bwd(residuals, g):
    perm, inverse = residuals
    n_groups, n_rounds, n, d = g.shape
    back = _gather(g.reshape(n_groups * n_rounds, n, d),
                   inverse.reshape(n_groups * n_rounds, 1, n))
    return back.reshape(n_groups, n_rounds, n, d).sum(axis=1), None, None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


def inverse_permutation(perm):
    """`inv` with `inv[..., perm[..., i]] = i`, for permutations along the last axis."""
    n = perm.shape[-1]
    flat = perm.reshape(-1, n)
    iota = jnp.arange(n, dtype=perm.dtype)
    inv = jax.vmap(lambda p: jnp.zeros_like(p).at[p].set(iota, unique_indices=True))(flat)
    return inv.reshape(perm.shape)
