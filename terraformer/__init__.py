"""terraformer: Reformer and Terraformer for long documents, Trax-style layers on JAX."""

__version__ = "0.1.0"
