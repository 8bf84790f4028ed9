"""Performer attention (Choromanski et al., 2021): FAVOR+, softmax attention estimated with
positive orthogonal random features.

For `x' = x / d^(1/4)` and `m` random rows `w_i` with Gaussian marginals,

    phi(x) = exp(W x' - |x'|² / 2) / sqrt(m)   satisfies   E[phi(q) · phi(k)] = exp(q·k / sqrt(d)),

the softmax kernel, with every feature positive (so the estimated normaliser is too). Attention
is then linear attention with `phi` (the prefix-sum core of `linear.py`): the estimate
approaches softmax attention as `m` grows, its error shrinking like 1/sqrt(m); orthogonal rows
(blocks of `d` mutually orthogonal directions with chi-distributed norms) lower the variance
against independent ones.

Numerical safety without looking ahead: a query's features are divided by their largest
(a factor that cancels between numerator and normaliser); every key's by one constant of the
projection (`exp(max_i |w_i|² / 2 - KEY_LOG_BOUND)` when positive: `w·x' - |x'|²/2 <=
|w|²/2` for any key, so no key feature exceeds `exp(KEY_LOG_BOUND)`), which cancels too and,
unlike the usual maximum over the sequence's keys, depends on no key, future or past.

- `random_features(rng, n_features, d, orthogonal)`: the projection `[n_features, d]`.
- `favor_features(x, projection, is_query)`: `phi` of queries or keys.
- `PerformerAttention`: the layer.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from terraformer.checks import check_int
from terraformer.layers.efficient.linear import LinearAttention

# Largest log of a key feature (see the module docstring): e^60 ~ 1e26 leaves float32 room
# for sums over millions of keys, and keeps keys away from underflow.
KEY_LOG_BOUND = 60.0


def orthonormal_rows(a):
    """Gram-Schmidt on the rows of `a` `[..., d, d]` (each row orthogonalised twice against
    the ones before it, which keeps float32 orthogonal to ~1e-6): the Q of a QR decomposition
    whose R has a positive diagonal, so Haar-distributed when `a` is Gaussian.

    Written with matmuls rather than `jnp.linalg.qr`: XLA:CPU's LAPACK calls, several in one
    training step (a redraw per layer), hung the whole step in jax 0.10.2.
    """
    d = a.shape[-1]

    def one_row(i, q):
        row = lax.dynamic_index_in_dim(a, i, axis=-2, keepdims=False)        # [..., d]
        for _ in range(2):   # rows from i on are still zero, so only earlier ones count
            row = row - jnp.einsum("...k,...kd->...d", jnp.einsum("...kd,...d->...k", q, row), q)
        row = row / jnp.linalg.norm(row, axis=-1, keepdims=True)
        return lax.dynamic_update_index_in_dim(q, row, i, axis=-2)

    return lax.fori_loop(0, d, one_row, jnp.zeros_like(a))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def random_features(rng, n_features: int, d: int, orthogonal: bool = True):
    """The FAVOR+ projection: `[n_features, d]` float32, each row marginally N(0, I_d).

    `orthogonal`: rows in blocks of `d` mutually orthogonal directions (Haar-distributed: the
    Gram-Schmidt orthonormalisation of a Gaussian matrix), each scaled by the norm of an
    independent Gaussian vector so its length is chi-distributed as a Gaussian row's; else
    i.i.d. Gaussian rows. Compiled as one program (drawn eagerly at init, it would be a dozen).
    """
    if not orthogonal:
        return jax.random.normal(rng, (n_features, d), jnp.float32)
    r_dirs, r_norms = jax.random.split(rng)
    n_blocks = -(-n_features // d)
    q = orthonormal_rows(jax.random.normal(r_dirs, (n_blocks, d, d), jnp.float32))
    directions = q.reshape(n_blocks * d, d)[:n_features]
    norms = jnp.linalg.norm(jax.random.normal(r_norms, (n_features, d), jnp.float32), axis=-1)
    return directions * norms[:, None]


def favor_features(x, projection, is_query: bool):
    """Positive random features of queries or keys, scaled for numerical safety.

    Args:
      x: [..., length, d] queries or keys.
      projection: [m, d] (`random_features`).
      is_query: queries are divided by their own largest feature, keys by one constant of
        the projection (both cancel in attention; see the module docstring).
    Returns:
      [..., length, m] float32, every entry > 0 (up to underflow).
    """
    d, m = x.shape[-1], projection.shape[0]
    x = x.astype(jnp.float32) * (d ** -0.25)
    projection = lax.stop_gradient(projection.astype(jnp.float32))
    wx = jnp.einsum("...ld,md->...lm", x, projection)
    log_phi = wx - 0.5 * jnp.sum(x * x, axis=-1, keepdims=True)
    if is_query:
        shift = lax.stop_gradient(jnp.max(log_phi, axis=-1, keepdims=True))
    else:
        shift = jnp.maximum(0.5 * jnp.max(jnp.sum(projection * projection, axis=-1))
                            - KEY_LOG_BOUND, 0.0)
    return jnp.exp(log_phi - shift) / math.sqrt(m)


class PerformerAttention(LinearAttention):
    """Performer (FAVOR+) self-attention: (batch, length, d_model) -> same.

    Softmax attention estimated with `n_features` positive orthogonal random features per
    head width (see the module docstring): time O(L m (d_qk + d_v)) and memory
    O(L (m + d_v) + m d_v) per head for m = n_features, against softmax attention's O(L²).
    Causal through the prefix sums of `LinearAttention` (chunked: memory O(L (m + d_v +
    chunk_len)) plus one m x d_v state per chunk for the gradient). Decodes causally with a
    constant-size state, `{'s': [batch, n_heads, m, d_v], 'z': [batch, n_heads, m]}`, each
    token costing O(m (d_qk + d_v)) whatever the length.

    The features: in `train` mode (with `redraw_features`) a fresh projection is drawn from
    the call's rng every step, as the paper redraws; in `eval` and `predict` the fixed
    projection `state['projection']` [n_features, d_qk], drawn at init from the init rng (a
    predict layer agrees with an eval layer initialised with the same rng), shared by the
    heads and never trained.

    Args:
      n_heads, d_qk, d_v, causal, masked, output_dropout, use_bias, chunk_len, mode: as
        `LinearAttention`.
      n_features: m, the random features per query/key.
      orthogonal_features: orthogonal random features (FAVOR+) or i.i.d. Gaussian ones.
      redraw_features: draw a fresh projection from the rng at every train step; False keeps
        `state['projection']` in training too.
      eps: added to the normaliser (0: the features are positive; a query that sees no key
        gets 0).
    Weights: as `SelfAttention`'s. State: `{'projection'}` (+ 's', 'z' in predict mode).
    """

    def __init__(self, n_heads: int = 1, d_qk: int = 64, d_v: int = 64, causal: bool = False,
                 masked: bool = False, output_dropout: float = 0.0, use_bias: bool = False,
                 n_features: int = 256, orthogonal_features: bool = True,
                 redraw_features: bool = True, chunk_len: int = 64, eps: float = 0.0,
                 mode: str = "train"):
        super().__init__(n_heads=n_heads, d_qk=d_qk, d_v=d_v, causal=causal, masked=masked,
                         output_dropout=output_dropout, use_bias=use_bias,
                         chunk_len=chunk_len, eps=eps, mode=mode)
        self._n_features = check_int("n_features", n_features, 1, self.name)
        self._orthogonal = bool(orthogonal_features)
        self._redraw = bool(redraw_features)

    def n_features(self) -> int:
        return self._n_features

    def init_features(self, rng) -> dict:
        return {"projection": random_features(rng, self._n_features, self._d_qk,
                                              self._orthogonal)}

    def features(self, q, k, state, rng):
        if self._mode == "train" and self._redraw:
            if rng is None:
                raise ValueError(f"{self.name} in train mode redraws its features from the rng; "
                                 "pass rng= to apply (or redraw_features=False)")
            projection = random_features(rng, self._n_features, self._d_qk, self._orthogonal)
        else:
            projection = state["projection"]
        return favor_features(q, projection, True), favor_features(k, projection, False)


__all__ = ["KEY_LOG_BOUND", "PerformerAttention", "favor_features", "random_features"]
