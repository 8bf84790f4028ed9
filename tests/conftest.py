"""Shared test fixtures: fresh random inputs every run, with the seed printed on failure.

`--jax-strict` (or the environment variable TERRAFORMER_JAX_STRICT=1) runs the session with
strict dtype promotion and rank promotion raising, as equinox's tests do: an implicit
`float32 * int32` or a `[n] + [n, 1]` broadcast that nobody meant is then an error instead of
a silent widening or an outer sum.
"""

import os

from terraformer.runtime import tune_cpu_runtime

# The tests run what the programs run: XLA:CPU with the library's runtime settings, applied
# before JAX creates its backend (importing terraformer no longer applies them).
tune_cpu_runtime()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

STRICT_ENV = "TERRAFORMER_JAX_STRICT"


def pytest_addoption(parser):
    parser.addoption(
        "--jax-strict", action="store_true", default=False,
        help="run with jax_numpy_dtype_promotion='strict' and jax_numpy_rank_promotion='raise' "
             f"(also set by {STRICT_ENV}=1)",
    )


def jax_strict_requested(config) -> bool:
    return config.getoption("--jax-strict") or os.environ.get(STRICT_ENV, "") not in ("", "0")


def pytest_configure(config):
    if jax_strict_requested(config):
        jax.config.update("jax_numpy_dtype_promotion", "strict")
        jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_report_header(config):
    if jax_strict_requested(config):
        return "jax: strict dtype promotion, rank promotion raises"
    return None


@pytest.fixture
def seed(request):
    """A fresh seed per test; shown in the report so a failure can be replayed."""
    value = int(os.environ.get("TEST_SEED", np.random.SeedSequence().entropy % (2**31)))
    request.node.user_properties.append(("seed", value))
    print(f"seed={value}")
    return value


@pytest.fixture
def np_rng(seed):
    return np.random.default_rng(seed)
