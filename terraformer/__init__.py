"""terraformer: Reformer and Terraformer for long documents, Trax-style layers on JAX.

Importing the package changes nothing in the process. The programs (``terraformer`` on the
command line, ``terraformer bench``, the benchmark scripts, the notebooks) call
``tune_cpu_runtime()`` first thing; a script of your own may call it too, before JAX's first
computation.
"""

from terraformer.runtime import tune_cpu_runtime

__all__ = ["tune_cpu_runtime"]

__version__ = "0.1.0"
