"""Optimizers and schedules against their formulas."""

import math

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from terraformer.training import optimizers as opt


@pytest.fixture(autouse=True)
def _clear_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def _steps(np_rng, n=20, high=5000):
    return np.concatenate([[1], np_rng.integers(1, high, size=n)])


# -- schedules ------------------------------------------------------------------------------------


def test_constant_and_warmup(np_rng):
    value = float(np_rng.uniform(1e-4, 1e-2))
    warm = int(np_rng.integers(2, 500))
    for s in _steps(np_rng):
        assert float(opt.constant(value)(s)) == pytest.approx(value, rel=1e-6)
        assert float(opt.warmup(warm, value)(s)) == pytest.approx(value * min(1, s / warm),
                                                                  rel=1e-5)


def test_rsqrt_decay(np_rng):
    value = float(np_rng.uniform(1e-4, 1e-2))
    warm = int(np_rng.integers(2, 500))
    sched = opt.rsqrt_decay(warm, value)
    for s in _steps(np_rng):
        expected = value * min(1, s / warm) * math.sqrt(warm / max(s, warm))
        assert float(sched(s)) == pytest.approx(expected, rel=1e-5)
    assert float(sched(warm)) == pytest.approx(value, rel=1e-6)


def test_cosine(np_rng):
    hi, lo = float(np_rng.uniform(1e-3, 1e-2)), float(np_rng.uniform(0, 1e-4))
    warm, total = int(np_rng.integers(0, 100)), int(np_rng.integers(200, 2000))
    sched = opt.cosine(hi, total, warm, lo)
    for s in list(_steps(np_rng, high=3000)) + [warm + 1, total, total + 7]:
        ramp = min(1, s / warm) if warm else 1.0
        p = min(max((s - warm) / (total - warm), 0.0), 1.0)
        expected = ramp * (lo + (hi - lo) * 0.5 * (1 + math.cos(math.pi * p)))
        assert float(sched(s)) == pytest.approx(expected, rel=1e-4, abs=1e-9)


def _trax_multifactor(step, factors, c, warm, decay_factor, per_decay, per_cycle, total):
    ret = 1.0
    for name in [n.strip() for n in factors.split("*")]:
        if name == "constant":
            ret *= c
        elif name == "linear_warmup":
            ret *= min(1.0, step / warm)
        elif name == "rsqrt_decay":
            ret /= math.sqrt(max(step, warm))
        elif name == "rsqrt_normalized_decay":
            ret *= math.sqrt(warm) / math.sqrt(max(step, warm))
        elif name == "decay_every":
            ret *= decay_factor ** (step // per_decay)
        elif name == "cosine_decay":
            progress = max(0.0, (step - warm) / per_cycle)
            ret *= 0.5 * (1 + math.cos(math.pi * (progress % 1.0)))
        elif name == "linear_decay":
            ret *= min(max((total - step) / (total - warm), 0.0), 1.0)
    return ret


@pytest.mark.parametrize("factors", [
    "constant * linear_warmup * rsqrt_decay",
    "constant * rsqrt_normalized_decay",
    "constant * decay_every",
    "constant * linear_warmup * cosine_decay",
    "constant*linear_decay",
])
def test_multifactor_matches_trax_formula(factors, np_rng):
    kw = dict(constant=float(np_rng.uniform(0.01, 1.0)), warmup_steps=int(np_rng.integers(5, 500)),
              decay_factor=0.5, steps_per_decay=int(np_rng.integers(50, 500)),
              steps_per_cycle=int(np_rng.integers(100, 1000)), total_steps=6000)
    sched = opt.multifactor(factors, **kw)
    for s in _steps(np_rng):
        expected = _trax_multifactor(
            int(s), factors, kw["constant"], kw["warmup_steps"], kw["decay_factor"],
            kw["steps_per_decay"], kw["steps_per_cycle"], kw["total_steps"])
        assert float(sched(s)) == pytest.approx(expected, rel=1e-4, abs=1e-9)


def test_multifactor_unknown_factor():
    with pytest.raises(ValueError, match="unknown factor 'linear_warmpu'"):
        opt.multifactor("constant * linear_warmpu")


def test_schedules_are_gin_configurable():
    gin.parse_config("multifactor.constant = 0.5\nmultifactor.factors = 'constant'")
    assert float(opt.multifactor()(3)) == pytest.approx(0.5)


# -- optimizers -----------------------------------------------------------------------------------


def _params(np_rng):
    return {"w": jnp.asarray(np_rng.normal(size=(3, 4)), jnp.float32),
            "b": jnp.asarray(np_rng.normal(size=(4,)), jnp.float32), "empty": ()}


def _grads(np_rng, params):
    return jax.tree_util.tree_map(
        lambda p: jnp.asarray(np_rng.normal(size=p.shape), jnp.float32), params)


def _run(tx, params, grads_seq):
    state = tx.init(params)
    for g in grads_seq:
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def test_sgd_and_lr_is_one_based(np_rng):
    params = _params(np_rng)
    grads = [_grads(np_rng, params) for _ in range(3)]
    sched = lambda s: 0.1 * s  # noqa: E731
    out, state = _run(opt.SGD(learning_rate=sched), params, grads)
    for k in ("w", "b"):
        expected = np.asarray(params[k]) - sum(0.1 * (i + 1) * np.asarray(g[k])
                                               for i, g in enumerate(grads))
        np.testing.assert_allclose(out[k], expected, rtol=1e-5, atol=1e-6)
    assert float(opt.current_learning_rate(state)) == pytest.approx(0.3)


def test_adam_matches_formula(np_rng):
    b1, b2, eps, lr, wd = 0.9, 0.99, 1e-5, 0.01, 0.1
    params = _params(np_rng)
    grads = [_grads(np_rng, params) for _ in range(4)]
    out, _ = _run(opt.Adam(lr, b1=b1, b2=b2, eps=eps, weight_decay_rate=wd), params, grads)
    for k in ("w", "b"):
        w = np.asarray(params[k], np.float64)
        m = v = 0.0
        for t, g in enumerate(grads, start=1):
            g = np.asarray(g[k], np.float64)
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
            w = w - lr * (m_hat / (np.sqrt(v_hat) + eps) + wd * w)
        np.testing.assert_allclose(out[k], w, rtol=1e-4, atol=1e-6)


def test_momentum_nesterov_matches_formula(np_rng):
    lr, mass = 0.05, 0.9
    params = _params(np_rng)
    grads = [_grads(np_rng, params) for _ in range(3)]
    out, _ = _run(opt.Momentum(lr, mass=mass, nesterov=True), params, grads)
    for k in ("w", "b"):
        w = np.asarray(params[k], np.float64)
        m = 0.0
        for g in grads:
            g = np.asarray(g[k], np.float64)
            m = mass * m + g
            w = w - lr * (g + mass * m)
        np.testing.assert_allclose(out[k], w, rtol=1e-5, atol=1e-6)


def test_clip_grad_norm(np_rng):
    params = _params(np_rng)
    grads = jax.tree_util.tree_map(lambda g: 100.0 * g, _grads(np_rng, params))
    clip = float(np_rng.uniform(0.5, 2.0))
    out, _ = _run(opt.SGD(1.0, clip_grad_norm=clip), params, [grads])
    delta = jax.tree_util.tree_map(lambda a, b: a - b, out, params)
    assert float(optax.global_norm(delta)) == pytest.approx(clip, rel=1e-4)
    norm = float(optax.global_norm(grads))
    np.testing.assert_allclose(delta["w"], -np.asarray(grads["w"]) * clip / norm, rtol=1e-4,
                               atol=1e-6)


def test_adafactor_matches_optax(np_rng):
    params = {"w": jnp.asarray(np_rng.normal(size=(130, 140)), jnp.float32),
              "b": jnp.asarray(np_rng.normal(size=(140,)), jnp.float32)}
    grads = [_grads(np_rng, params) for _ in range(3)]
    ours, _ = _run(opt.Adafactor(0.01), params, grads)
    ref, _ = _run(optax.adafactor(0.01), params, grads)
    for k in params:
        np.testing.assert_allclose(ours[k], ref[k], rtol=1e-5, atol=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="clip_grad_norm"):
        opt.Adam(clip_grad_norm=-1.0)
    with pytest.raises(ValueError, match="warmup_steps must be < total_steps"):
        opt.cosine(total_steps=10, warmup_steps=10)
    with pytest.raises(ValueError, match="no ScaleByLRState"):
        opt.current_learning_rate(optax.adam(1e-3).init({"w": jnp.zeros(2)}))
