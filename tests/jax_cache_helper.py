"""A persistent JAX compilation cache for tests that compile the same programs repeatedly."""

import contextlib

import jax


@contextlib.contextmanager
def persistent_compilation_cache(directory):
    """Caches compiled programs (taking over 0.2 s) in `directory`; restores the settings after."""
    from jax.experimental.compilation_cache import compilation_cache

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    old = {name: getattr(jax.config, name) for name in names}
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        for name, value in old.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()
