"""The projections every layer of the family shares, in `SelfAttention`'s layout.

Weights `{'wq', 'wk': [d_model, n_heads * d_qk], 'wv': [d_model, n_heads * d_v],
'wo': [n_heads * d_v, d_model]}` (glorot uniform), plus `'bq', 'bk', 'bv', 'bo'` with
`use_bias`, so that a checkpoint of one mechanism's projections reads as another's and
`pack_for_decoding` stores the kernels as `PackedKernel`s the way `SelfAttention` does.
A layer without queries or keys (the Synthesizer) asks for the names it has.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from terraformer.layers import initializers as init_lib
from terraformer.layers.attention import merge_heads, split_heads
from terraformer.layers.base import as_items
from terraformer.layers.core import check_feature_dim, matmul, pack_kernel

QKV = ("q", "k", "v")


def init_projections(rng, d_model: int, n_heads: int, d_qk: int, d_v: int, use_bias: bool,
                     names=QKV) -> dict:
    """Glorot-uniform input projections `'w' + name` for `names` and the output `'wo'`."""
    widths = {"q": n_heads * d_qk, "k": n_heads * d_qk, "v": n_heads * d_v}
    keys = jax.random.split(rng, len(names) + 1)
    weights = {"w" + n: init_lib.glorot_uniform(key, (d_model, widths[n]))
               for n, key in zip(names, keys)}
    weights["wo"] = init_lib.glorot_uniform(keys[-1], (n_heads * d_v, d_model))
    if use_bias:
        weights.update({"b" + n: jnp.zeros((widths[n],)) for n in names})
        weights["bo"] = jnp.zeros((d_model,))
    return weights


def project_heads(x, weights, name: str, n_heads: int):
    """x [batch, length, d_model] -> [batch, n_heads, length, d] through `'w' + name`."""
    y = matmul(x, weights["w" + name])
    if "b" + name in weights:
        y = y + lax.broadcast_to_rank(weights["b" + name], y.ndim)
    return split_heads(y, n_heads)


def project_output(out, weights):
    """out [batch, n_heads, length, d_v] -> [batch, length, d_model] through `'wo'`."""
    y = matmul(merge_heads(out), weights["wo"])
    if "bo" in weights:
        y = y + lax.broadcast_to_rank(weights["bo"], y.ndim)
    return y


def pack_projections(weights, dtype: str, names=("wq", "wk", "wv", "wo")) -> dict:
    """`weights` with the kernels `names` stored as PackedKernels (see `core.pack_kernel`)."""
    return {**weights, **{n: pack_kernel(weights[n], dtype) for n in names if n in weights}}


def layer_inputs(x, masked: bool, who: str, d_model: int):
    """(x [batch, length, d_model], mask [batch, length] bool or None) of a layer's input,
    checked: x of rank 3 with `d_model` features, the mask (when `masked`) of x's first two
    dimensions."""
    x, mask = as_items(x, 2, who) if masked else (x, None)
    if x.ndim != 3:
        raise ValueError(f"{who}: expected x of shape (batch, length, d_model), "
                         f"got {tuple(x.shape)}")
    check_feature_dim(x, d_model, who)
    if mask is not None:
        if tuple(mask.shape) != tuple(x.shape[:2]):
            raise ValueError(f"{who}: mask must be (batch, length) = {tuple(x.shape[:2])}, "
                             f"got {tuple(mask.shape)}")
        mask = mask.astype(bool)
    return x, mask


def d_model_of(weights) -> int:
    """The model width of projection weights (the output kernel's columns)."""
    return weights["wo"].shape[-1]  # a PackedKernel has the logical shape too
