"""terraformer: Reformer and Terraformer for long documents, Trax-style layers on JAX."""

from terraformer.runtime import tune_cpu_runtime

__version__ = "0.1.0"

tune_cpu_runtime()
