"""Placement in memory kinds: arrays move to host memory and back, values unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from terraformer.memory.placement import (
    device_memory_kind,
    host_memory_kind,
    memory_kinds,
    offload_reason,
    on_memory_kind,
    to_device,
    to_host,
)


def test_round_trip_keeps_values_and_places(np_rng):
    tree = {"a": jnp.asarray(np_rng.normal(size=(3, 4)), jnp.float32),
            "b": (jnp.arange(5, dtype=jnp.int32),)}
    host = to_host(tree)
    back = to_device(host)
    for x, y in zip(jax.tree.leaves(tree), jax.tree.leaves(back), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert on_memory_kind(back, device_memory_kind())
    kind = host_memory_kind()
    if kind is None:
        assert host is tree  # nowhere to go: left where it was
    else:
        assert on_memory_kind(host, kind) and not on_memory_kind(host, device_memory_kind())


def test_reason_names_the_platform_and_kinds():
    reason = offload_reason()
    assert reason.startswith(jax.devices()[0].platform + ":")
    if host_memory_kind() is not None:
        assert "pinned_host" in memory_kinds() and "offloading to pinned_host" in reason


@pytest.mark.skipif(host_memory_kind() is None, reason=offload_reason())
def test_inside_jit_the_transfer_is_in_the_program():
    jaxpr = str(jax.make_jaxpr(lambda x: to_host(x * 2))(jnp.ones(3)))
    assert "device_put" in jaxpr
