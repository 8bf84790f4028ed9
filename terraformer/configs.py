"""The gin registry: every name the files in ``gin/`` may use. Importing this module registers
them all (the CLI does it before parsing a config); it defines nothing else.

Registered names (short form; the long form is ``module.name``):

- models (``terraformer.models``): see ``MODELS`` below, e.g. ``@TransformerLM``;
- training (``terraformer``): ``train``; the device mesh: ``mesh`` (``parallel.mesh``:
  ``mesh.data = 2``, ``mesh.fsdp = -1``, ...);
- optimizers (``terraformer.optimizers``): ``Adam``, ``Adafactor``, ``SGD``, ``Momentum``;
- schedules (``terraformer.lr``): ``lr.constant`` (gin has its own ``constant``, so write the
  module), ``warmup``, ``rsqrt_decay``, ``cosine``, ``multifactor``;
- data (``terraformer.data``): ``copy_task``, ``text_files``, ``pack_documents``,
  ``whole_document``, ``jsonl_pairs``, ``tfds_text``, ``summarization_pairs`` (``data.streams``),
  ``text_lm_inputs``, ``summarization_inputs`` (``data.inputs``), ``listops_inputs``
  (``data.listops``), ``get_tokenizer``,
  ``ByteTokenizer``, ``SentencePieceTokenizer`` (``data.tokenizers``);
- the run's tokenizer for ``decode`` and the input pipelines (``terraformer``): ``tokenizer``
  (``data.tokenizers``);
- layers that gin files configure and pass as arguments (``terraformer.layers``): ``LAYERS``.

The modules of the library functions above register their own names (gin's decorator): an input
pipeline reads the gin-configured ``tokenizer()`` when it is given none, which needs the
registered function itself. Models and layers stay free of gin and are registered here; to add
one, append ``(module, attribute)`` to ``MODELS`` or ``LAYERS``.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import gin
import gin.config

# Imported for the names their modules register with gin (see the module docstring).
from terraformer.data import inputs, listops, streams, tokenizers  # noqa: F401
from terraformer.training import loop, optimizers  # noqa: F401

__all__ = ["LAYERS", "MODELS", "register", "register_models"]

# (module, attribute) of every model function gin files may name, registered under
# ``terraformer.models.<attribute>``.
MODELS: list[tuple[str, str]] = [
    ("terraformer.models.transformer", "TransformerLM"),
    ("terraformer.models.reformer", "ReformerLM"),
    ("terraformer.models.terraformer", "TerraformerLM"),
    ("terraformer.models.encoder_decoder", "Reformer"),
    ("terraformer.models.encoder_decoder", "Terraformer"),
    ("terraformer.models.classifier", "Classifier"),
]

# (module, attribute) of layers gin files may configure and pass as ``attention_type`` etc.,
# registered under ``terraformer.layers.<attribute>``: ``ReformerLM.attention_type =
# @LSHSelfAttention`` with ``LSHSelfAttention.n_hashes = 4``.
LAYERS: list[tuple[str, str]] = [
    ("terraformer.layers.attention", "SelfAttention"),
    ("terraformer.layers.attention", "CausalAttention"),
    ("terraformer.layers.blockwise", "BlockwiseAttention"),
    ("terraformer.layers.lsh", "LSHSelfAttention"),
    ("terraformer.layers.efficient.sparse_transformer", "SparseTransformerAttention"),
    ("terraformer.layers.efficient.longformer", "LongformerAttention"),
    ("terraformer.layers.efficient.bigbird", "BigBirdAttention"),
    ("terraformer.layers.efficient.routing", "RoutingAttention"),
    ("terraformer.layers.efficient.sinkhorn", "SinkhornAttention"),
    ("terraformer.layers.efficient.linear", "LinearAttention"),
    ("terraformer.layers.efficient.performer", "PerformerAttention"),
    ("terraformer.layers.efficient.linformer", "LinformerAttention"),
    ("terraformer.layers.efficient.synthesizer", "SynthesizerAttention"),
    ("terraformer.layers.sparsity", "MultiplicativeConvCausalAttention"),
    ("terraformer.layers.sparsity", "SparseFF"),
    ("terraformer.layers.encdec", "EncDecAttention"),
    ("terraformer.layers.core", "Relu"),
    ("terraformer.layers.core", "Gelu"),
    ("terraformer.layers.core", "FastGelu"),
]


def register(fn, name: str | None = None, module: str = "terraformer.models"):
    """``gin.external_configurable(fn, name, module)``, doing nothing when that name is
    already registered (importing twice, or a module that registers itself)."""
    name = name or fn.__name__
    if f"{module}.{name}" in gin.config._REGISTRY:
        return gin.config._REGISTRY.get_match(f"{module}.{name}").wrapper
    return gin.external_configurable(fn, name=name, module=module)


def register_models(models: Sequence[tuple[str, str]] = MODELS,
                    module: str = "terraformer.models") -> None:
    """Registers each ``(module, attribute)`` of ``models`` under ``module``."""
    for module_name, attr in models:
        register(getattr(importlib.import_module(module_name), attr), attr, module)


register_models()
register_models(LAYERS, "terraformer.layers")
