"""Maps trax 1.4.1 weights onto a terraformer model's weight tree.

trax keeps a model's weights as nested tuples mirroring its layer tree; a checkpoint stores their
leaves in order. Our layers mirror trax's layers in the same order (a model file reads like
trax's), so the leaves are consumed one layer at a time while walking our layer tree: each
layer with weights takes the next leaves in trax's layout and converts them to ours:
  - Dense: (w [d_in, d_out], b [d_out]), the same layout;
  - LayerNorm: (scale, bias);  Embedding: the table;
  - AxialPositionalEncoding: one table per axis with a leading batch axis of 1 in trax;
  - PositionalEncoding (pos_type None): the trainable table [max_len, d], the same layout;
  - FixedBasePositionalEncoding: trax's nested list of digit vectors (1, d / n_digits) and its
    start vector (1, 1, d) as our stacked [n_bases, n_digits, d / n_digits] and [d];
  - SelfAttention / LSHSelfAttention (trax's efficient attention): per-head kernels
    [n_heads, d_model, d] (w_o [n_heads, d_v, d_model]) against our [d_model, n_heads * d]
    ([n_heads * d_v, d_model]); trax's CausalAttention keeps four Dense layers (w, b) instead;
  - SparseFF: trax's block-shaped kernels against our flat units, its block axes checked
    against the layer's (our optional first-layer bias, when the model has one, set to zero);
    FactoredDense: the gating vectors transposed;
    MultiplicativeModularSparseDense: the same four arrays; LocallyConvDense: the same kernel
    (a Dense in trax when it has one module, as ours is then);
  - ReversibleRepeat: trax has one block per layer; ours stacks them on a leading layer axis.
Every converted array is checked against the shape our model expects; the error names our weight
path, trax's leaf index, the expected and the received shape.
"""

from __future__ import annotations

import jax
import numpy as np

from terraformer import layers as tl
from terraformer.interop.trax_pickle import TraxImportError


class TraxLeaves:
    """trax's flat weights, consumed in order; `names` (tree paths) improve error messages."""

    def __init__(self, arrays, names=None):
        self.arrays = [np.asarray(a) for a in arrays]
        self.names = list(names) if names is not None else [str(i) for i in range(len(arrays))]
        self.next = 0

    def peek(self):
        return self.arrays[self.next] if self.next < len(self.arrays) else None

    def take(self, n: int, where: str) -> list:
        if self.next + n > len(self.arrays):
            raise TraxImportError(
                f"{where}: the trax weights end after {len(self.arrays)} arrays, but the model "
                "needs more; the config builds a larger model than the checkpoint's")
        out = self.arrays[self.next:self.next + n]
        self.next += n
        return out

    def label(self, offset: int) -> str:
        return f"trax weight {self.names[offset]}"

    def finish(self) -> None:
        if self.next != len(self.arrays):
            extra = self.arrays[self.next]
            raise TraxImportError(
                f"the trax weights have {len(self.arrays) - self.next} arrays more than the model "
                f"uses (first unused: {self.label(self.next)}, shape {tuple(extra.shape)}); the "
                "config builds a smaller model than the checkpoint's")


def _check(value, expected_shape, where: str, label: str):
    if tuple(value.shape) != tuple(expected_shape):
        raise TraxImportError(
            f"{where}: expected shape {tuple(expected_shape)}, got {tuple(value.shape)} "
            f"(from {label})")
    return value


def _take_one(leaves: TraxLeaves, where: str):
    index = leaves.next
    value = leaves.take(1, where)[0]
    return value, leaves.label(index)


def _per_head_in(kernel, template, where, label):
    """trax [n_heads, d_model, d] -> ours [d_model, n_heads * d]."""
    if kernel.ndim != 3:
        raise TraxImportError(f"{where}: expected a per-head kernel [n_heads, d_model, d], got "
                              f"shape {tuple(kernel.shape)} (from {label})")
    h, d_model, d = kernel.shape
    return _check(kernel.transpose(1, 0, 2).reshape(d_model, h * d), template.shape, where, label)


def _per_head_out(kernel, template, where, label):
    """trax [n_heads, d_v, d_model] -> ours [n_heads * d_v, d_model]."""
    if kernel.ndim != 3:
        raise TraxImportError(f"{where}: expected a per-head kernel [n_heads, d_v, d_model], got "
                              f"shape {tuple(kernel.shape)} (from {label})")
    h, d_v, d_model = kernel.shape
    return _check(kernel.reshape(h * d_v, d_model), template.shape, where, label)


# -- one converter per layer type: (layer, template, leaves, where) -> our weights -------------
def _dense(layer, template, leaves, where):
    out = {}
    for key in ("w", "b"):
        if key in template:
            value, label = _take_one(leaves, f"{where}.{key}")
            out[key] = _check(value, template[key].shape, f"{where}.{key}", label)
    return out


def _layer_norm(layer, template, leaves, where):
    out = {}
    for key in ("scale", "bias"):
        value, label = _take_one(leaves, f"{where}.{key}")
        out[key] = _check(value, template[key].shape, f"{where}.{key}", label)
    return out


def _embedding(layer, template, leaves, where):
    value, label = _take_one(leaves, where)
    return _check(value, template.shape, where, label)


def _axial(layer, template, leaves, where):
    out = []
    for i, t in enumerate(template):
        value, label = _take_one(leaves, f"{where}[{i}]")
        if value.ndim == len(t.shape) + 1 and value.shape[0] == 1:
            value = value[0]  # trax's leading batch axis
        out.append(_check(value, t.shape, f"{where}[{i}]", label))
    return tuple(out)


def _positional(layer, template, leaves, where):
    """trax's PositionalEncoding table [max_len, d] (or [1, max_len, d] in old checkpoints)."""
    table, label = _take_one(leaves, where)
    if table.ndim == 3 and table.shape[0] == 1:
        table = table[0]
    return _check(table, template.shape, where, label)


def _fixed_base(layer, template, leaves, where):
    """trax's FixedBasePositionalEncoding: ([[digit vector (1, d / n_digits)] * n_digits] *
    n_bases, start (1, 1, d)) -> ours {'digits': [n_bases, n_digits, d / n_digits],
    'start': [d]}."""
    n_bases, n_digits, d_weight = template["digits"].shape
    rows = []
    for b in range(n_bases):
        for i in range(n_digits):
            value, label = _take_one(leaves, f"{where}.digits[{b}][{i}]")
            rows.append(_check(value.reshape(-1) if value.ndim == 2 and value.shape[0] == 1
                               else value, (d_weight,), f"{where}.digits[{b}][{i}]", label))
    start, label = _take_one(leaves, f"{where}.start")
    start = start.reshape(-1) if start.ndim == 3 and start.shape[:2] == (1, 1) else start
    return {"digits": np.stack(rows).reshape(n_bases, n_digits, d_weight),
            "start": _check(start, template["start"].shape, f"{where}.start", label)}


def _self_attention(layer, template, leaves, where):
    first = leaves.peek()
    if first is not None and first.ndim == 2:  # trax CausalAttention: four Dense layers (w, b)
        out = {}
        for name in "qkvo":
            for kind in ("w", "b"):
                key = kind + name
                value, label = _take_one(leaves, f"{where}.{key}")
                if key not in template:
                    raise TraxImportError(
                        f"{where}.{key}: trax has a bias here (from {label}) but the model's "
                        "attention has none; build it with use_bias=True")
                out[key] = _check(value, template[key].shape, f"{where}.{key}", label)
        return out
    out = {}
    for key in ("wq", "wk", "wv"):
        value, label = _take_one(leaves, f"{where}.{key}")
        out[key] = _per_head_in(value, template[key], f"{where}.{key}", label)
    value, label = _take_one(leaves, f"{where}.wo")
    out["wo"] = _per_head_out(value, template["wo"], f"{where}.wo", label)
    for key in ("bq", "bk", "bv"):
        if key in template:  # trax's efficient attention keeps per-head biases after kernels
            value, label = _take_one(leaves, f"{where}.{key}")
            out[key] = _check(value.reshape(-1), template[key].shape, f"{where}.{key}", label)
    if "bo" in template:
        raise TraxImportError(f"{where}.bo: trax's SelfAttention has no output bias; build the "
                              "model's attention with use_bias=False")
    return out


def _lsh_attention(layer, template, leaves, where):
    out = {}
    for key, convert in (("w_qk", _per_head_in), ("w_v", _per_head_in),
                         ("w_o", _per_head_out)):
        value, label = _take_one(leaves, f"{where}.{key}")
        out[key] = convert(value, template[key], f"{where}.{key}", label)
    if "b_o" in template:
        raise TraxImportError(f"{where}.b_o: trax's LSHSelfAttention has no output bias; build "
                              "the model's attention with use_bias=False")
    return out


def _factored_dense(layer, template, leaves, where):
    """trax's FactoredDense: gating [n_modules, d_in], projection [d_in, d_module], bias
    [d_out] -> ours D [d_in, n_modules], E [d_in, d_module], b."""
    gating, label = _take_one(leaves, f"{where}.D")
    out = {"D": _check(gating.T, template["D"].shape, f"{where}.D", label + " transposed")}
    value, label = _take_one(leaves, f"{where}.E")
    out["E"] = _check(value, template["E"].shape, f"{where}.E", label)
    if "b" in template:
        value, label = _take_one(leaves, f"{where}.b")
        out["b"] = _check(value, template["b"].shape, f"{where}.b", label)
    return out


def _modular_sparse_dense(layer, template, leaves, where):
    """trax's MultiplicativeModularSparseDense: multiplier [S, d], kmult [d, M], kmod [S, M, M],
    bias [d_feature]; ours the same."""
    out = {}
    for key in ("multiplier", "kmult", "kmod", "b"):
        value, label = _take_one(leaves, f"{where}.{key}")
        out[key] = _check(value, template[key].shape, f"{where}.{key}", label)
    return out


def _sparse_ff(layer, template, leaves, where):
    """trax's SparseFF: controller m1 [d_model, d_lowrank], m2 [d_lowrank, n_blocks, block],
    bias [n_blocks, block]; then w1 [d_model, n_blocks, block], w2 [block, n_blocks, d_model]
    (unit-in-block axis first), b2 [d_model]. Ours keeps the units flat (w1 as rows
    [d_ff, d_model]); a model built with first_layer_bias gets b1 = 0, trax's function."""
    out = {}
    m1, label = _take_one(leaves, f"{where}.m1")
    out["m1"] = _check(m1, template["m1"].shape, f"{where}.m1", label)
    m2, label = _take_one(leaves, f"{where}.m2")
    # The flat shapes cannot tell 6 blocks of 4 units from 8 of 3: check trax's block axes.
    blocks = (layer.n_blocks, layer.n_elements_in_block)
    if m2.ndim != 3 or tuple(m2.shape[1:]) != blocks:
        raise TraxImportError(
            f"{where}.m2: expected the controller's blocks [d_lowrank, n_blocks, "
            f"n_elements_in_block] = [*, {blocks[0]}, {blocks[1]}], got shape "
            f"{tuple(m2.shape)} (from {label}); ff_sparsity (units per block) differs")
    out["m2"] = _check(m2.reshape(m2.shape[0], -1), template["m2"].shape, f"{where}.m2", label)
    mb, label = _take_one(leaves, f"{where}.mb")
    out["mb"] = _check(mb.reshape(-1), template["mb"].shape, f"{where}.mb", label)
    w1, label = _take_one(leaves, f"{where}.w1")
    out["w1"] = _check(w1.reshape(w1.shape[0], -1).T, template["w1"].shape, f"{where}.w1", label)
    w2, label = _take_one(leaves, f"{where}.w2")
    w2 = w2.transpose(1, 0, 2).reshape(-1, w2.shape[-1])
    out["w2"] = _check(w2, template["w2"].shape, f"{where}.w2", label)
    b2, label = _take_one(leaves, f"{where}.b2")
    out["b2"] = _check(b2, template["b2"].shape, f"{where}.b2", label)
    if "b1" in template:
        out["b1"] = np.zeros(template["b1"].shape, np.float32)
    return out


def _conv(layer, template, leaves, where):
    """LocallyConvDense: trax's kernel [length_k, module_k, d_in, n_units] and bias, as ours.
    With one module trax builds a plain Dense (w [d_in, n_units]), as ours is then (1 x 1)."""
    first = leaves.peek()
    if first is not None and first.ndim == 2 and len(template["w"].shape) == 4:
        value, label = _take_one(leaves, f"{where}.w")
        out = {"w": _check(value[None, None], template["w"].shape, f"{where}.w", label)}
        if "b" in template:
            value, label = _take_one(leaves, f"{where}.b")
            out["b"] = _check(value, template["b"].shape, f"{where}.b", label)
        return out
    return _dense(layer, template, leaves, where)  # the same leaves, in the same order


CONVERTERS = [
    (tl.SparseFF, _sparse_ff),
    (tl.FactoredDense, _factored_dense),
    (tl.MultiplicativeModularSparseDense, _modular_sparse_dense),
    (tl.LocallyConvDense, _conv),
    (tl.LSHSelfAttention, _lsh_attention),
    (tl.SelfAttention, _self_attention),
    (tl.Dense, _dense),
    (tl.LayerNorm, _layer_norm),
    (tl.Embedding, _embedding),
    (tl.AxialPositionalEncoding, _axial),
    (tl.PositionalEncoding, _positional),
    (tl.FixedBasePositionalEncoding, _fixed_base),
]


def _has_leaves(tree) -> bool:
    return bool(jax.tree_util.tree_leaves(tree))


def convert_layer(layer, template, leaves: TraxLeaves, where: str):
    """Our weights for `layer` (shaped like `template`) from the next trax leaves."""
    for cls, convert in CONVERTERS:
        if isinstance(layer, cls):
            return convert(layer, template, leaves, where)
    if isinstance(layer, tl.ReversibleRepeat):
        block = layer.sublayers[0]
        per_layer = [
            convert_layer(block, jax.tree_util.tree_map(lambda a, i=i: _index(a, i), template),
                          leaves, f"{where}/layer{i}:{block.name}")
            for i in range(layer.n_layers)
        ]
        return jax.tree_util.tree_map(lambda *a: np.stack(a), *per_layer)
    subs = layer.sublayers
    if subs and isinstance(template, tuple) and len(template) == len(subs):
        return tuple(convert_layer(s, t, leaves, f"{where}/{i}:{s.name}")
                     for i, (s, t) in enumerate(zip(subs, template)))
    if not _has_leaves(template):
        return template
    raise TraxImportError(f"{where}: no trax mapping for layer {layer.name} "
                          f"({type(layer).__name__}) with weights")


def _index(a, i):
    return jax.ShapeDtypeStruct(a.shape[1:], a.dtype) if isinstance(a, jax.ShapeDtypeStruct) \
        else np.asarray(a)[i]


def trax_to_terraformer(layer, template, trax_weights, names=None):
    """Our weight tree for `layer` from trax's flat weights (leaves in trax's order).

    Args:
      layer: our layer or model.
      template: its weights (arrays or `jax.ShapeDtypeStruct`s), e.g. from `jax.eval_shape` of
        `layer.init_weights_and_state`: only shapes and dtypes are read.
      trax_weights: a list of arrays, trax's weights flattened in its order.
      names: optional trax tree paths of those arrays, for error messages.
    Returns:
      A pytree like `template` of numpy arrays in the template's dtypes.
    Raises:
      TraxImportError: a shape that does not fit, or too few / too many trax arrays.
    """
    leaves = TraxLeaves(trax_weights, names)
    out = convert_layer(layer, template, leaves, layer.name)
    leaves.finish()
    return jax.tree_util.tree_map(lambda v, t: np.asarray(v).astype(t.dtype), out, template)
