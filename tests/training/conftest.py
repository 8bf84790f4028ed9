"""Training tests compile the same small train step many times (each run, each resume):
a persistent compilation cache in a temporary directory makes the repeats nearly free."""

import pytest
from jax_cache_helper import persistent_compilation_cache


@pytest.fixture(scope="package", autouse=True)
def _compilation_cache(tmp_path_factory):
    with persistent_compilation_cache(tmp_path_factory.mktemp("jax_cache")):
        yield
