"""Shared test fixtures: fresh random inputs every run, with the seed printed on failure."""

import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


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
