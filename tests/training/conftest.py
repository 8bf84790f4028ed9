"""Training tests compile the same small train step many times (each run, each resume):
a persistent compilation cache in a temporary directory makes the repeats nearly free."""

import jax
import pytest


@pytest.fixture(scope="package", autouse=True)
def _compilation_cache(tmp_path_factory):
    from jax.experimental.compilation_cache import compilation_cache

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    old = {name: getattr(jax.config, name) for name in names}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    compilation_cache.reset_cache()
    yield
    for name, value in old.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()
