"""Optimizers and learning-rate schedules, spelled as optax transformations.

Schedules are functions of the 1-based step number (the first update is step 1), as in Trax::

    lr = multifactor(factors="constant * linear_warmup * rsqrt_decay", constant=0.1,
                     warmup_steps=400)
    lr(1), lr(400), lr(1600)        # 0.1/400/20, 0.1/20, 0.1/40

Optimizers return an ``optax.GradientTransformation`` built as
``chain(clip_by_global_norm?, <direction>, weight decay?, scale_by_lr(learning_rate))``.
``learning_rate`` is a number or a schedule; the last transformation keeps the rate it used in
its state, so the trainer can log it (``current_learning_rate(opt_state)``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import gin
import jax
import jax.numpy as jnp
import optax

from terraformer.checks import check_number

__all__ = [
    "SGD",
    "Adafactor",
    "Adam",
    "Momentum",
    "ScaleByLRState",
    "constant",
    "cosine",
    "current_learning_rate",
    "reported_learning_rate",
    "multifactor",
    "rsqrt_decay",
    "scale_by_lr",
    "warmup",
]

Schedule = Callable[[jax.Array], jax.Array]


# ---------------------------------------------------------------------------------------------
# Schedules: step (1-based, int or int array) -> learning rate (float32).


def _f32(step):
    return jnp.asarray(step, jnp.float32)


@gin.configurable(module="terraformer.lr")
def constant(value: float = 0.001) -> Schedule:
    """lr(step) = value."""
    check_number("value", value, "constant", minimum=0)
    return lambda step: jnp.full(jnp.shape(step), value, jnp.float32)


@gin.configurable(module="terraformer.lr")
def warmup(warmup_steps: int = 1000, max_value: float = 0.001) -> Schedule:
    """Linear warm-up then constant: lr(step) = max_value * min(1, step / warmup_steps)."""
    check_number("warmup_steps", warmup_steps, "warmup", minimum=0, allow_minimum=False)
    return lambda step: max_value * jnp.minimum(1.0, _f32(step) / warmup_steps)


@gin.configurable(module="terraformer.lr")
def rsqrt_decay(warmup_steps: int = 1000, max_value: float = 0.001) -> Schedule:
    """Linear warm-up to ``max_value``, then decay as 1/sqrt(step):

    lr(step) = max_value * min(1, step / w) * sqrt(w / max(step, w)),  w = warmup_steps
    """
    check_number("warmup_steps", warmup_steps, "rsqrt_decay", minimum=0, allow_minimum=False)

    def schedule(step):
        s = _f32(step)
        return (
            max_value
            * jnp.minimum(1.0, s / warmup_steps)
            * jnp.sqrt(warmup_steps / jnp.maximum(s, warmup_steps))
        )

    return schedule


@gin.configurable(module="terraformer.lr")
def cosine(
    max_value: float = 0.001, total_steps: int = 10000, warmup_steps: int = 0,
    min_value: float = 0.0,
) -> Schedule:
    """Linear warm-up, then a half cosine from ``max_value`` at ``warmup_steps`` down to
    ``min_value`` at ``total_steps`` (constant ``min_value`` after):

    p = clip((step - warmup_steps) / (total_steps - warmup_steps), 0, 1)
    lr = min(1, step / warmup_steps) * (min_value + (max_value - min_value) * (1 + cos(pi p)) / 2)
    """
    check_number("total_steps", total_steps, "cosine", minimum=0, allow_minimum=False)
    check_number("warmup_steps", warmup_steps, "cosine", minimum=0)
    if warmup_steps >= total_steps:
        raise ValueError(
            f"cosine: warmup_steps must be < total_steps, got {warmup_steps} >= {total_steps}"
        )

    def schedule(step):
        s = _f32(step)
        ramp = jnp.minimum(1.0, s / warmup_steps) if warmup_steps else 1.0
        p = jnp.clip((s - warmup_steps) / (total_steps - warmup_steps), 0.0, 1.0)
        return ramp * (min_value + (max_value - min_value) * 0.5 * (1.0 + jnp.cos(jnp.pi * p)))

    return schedule


MULTIFACTOR_FACTORS = (
    "constant",
    "linear_warmup",
    "rsqrt_decay",
    "rsqrt_normalized_decay",
    "decay_every",
    "cosine_decay",
    "linear_decay",
)


@gin.configurable(module="terraformer.lr")
def multifactor(
    factors: str = "constant * linear_warmup * rsqrt_decay",
    constant: float = 0.1,
    warmup_steps: int = 400,
    decay_factor: float = 0.5,
    steps_per_decay: int = 20000,
    steps_per_cycle: int = 100000,
    total_steps: int = 100000,
    minimum: float = 0.0,
) -> Schedule:
    """Trax's product of factors, ``factors`` a '*'-separated list of:

    - ``constant``: ``constant``;
    - ``linear_warmup``: ``min(1, step / warmup_steps)``;
    - ``rsqrt_decay``: ``1 / sqrt(max(step, warmup_steps))``;
    - ``rsqrt_normalized_decay``: ``sqrt(warmup_steps / max(step, warmup_steps))``;
    - ``decay_every``: ``decay_factor ** (step // steps_per_decay)``;
    - ``cosine_decay``: ``(1 + cos(pi * frac(max(0, step - warmup_steps) / steps_per_cycle))) / 2``;
    - ``linear_decay``: ``clip((total_steps - step) / (total_steps - warmup_steps), 0, 1)``.

    The product is floored at ``minimum``.
    """
    names = [n.strip() for n in factors.split("*") if n.strip()]
    if not names:
        raise ValueError(f"multifactor: factors must name at least one factor, got {factors!r}")
    for name in names:
        if name not in MULTIFACTOR_FACTORS:
            raise ValueError(
                f"multifactor: unknown factor {name!r} in factors={factors!r}; "
                f"known: {', '.join(MULTIFACTOR_FACTORS)}"
            )
    value = constant

    def schedule(step):
        s = _f32(step)
        lr = jnp.ones_like(s)
        for name in names:
            if name == "constant":
                lr = lr * value
            elif name == "linear_warmup":
                lr = lr * jnp.minimum(1.0, s / warmup_steps)
            elif name == "rsqrt_decay":
                lr = lr / jnp.sqrt(jnp.maximum(s, warmup_steps))
            elif name == "rsqrt_normalized_decay":
                lr = lr * jnp.sqrt(warmup_steps / jnp.maximum(s, warmup_steps))
            elif name == "decay_every":
                lr = lr * decay_factor ** jnp.floor(s / steps_per_decay)
            elif name == "cosine_decay":
                progress = jnp.maximum(0.0, (s - warmup_steps) / steps_per_cycle)
                lr = lr * 0.5 * (1.0 + jnp.cos(jnp.pi * (progress % 1.0)))
            else:  # linear_decay
                span = max(total_steps - warmup_steps, 1)
                lr = lr * jnp.clip((total_steps - s) / span, 0.0, 1.0)
        return jnp.maximum(lr, minimum)

    return schedule


# ---------------------------------------------------------------------------------------------
# The learning-rate step, which remembers the rate it used.


class ScaleByLRState(NamedTuple):
    """State of :func:`scale_by_lr`: updates done so far and the rate of the last one."""

    count: jax.Array
    learning_rate: jax.Array


def _as_schedule(learning_rate) -> Schedule:
    if callable(learning_rate):
        return learning_rate
    check_number("learning_rate", learning_rate, "optimizer", minimum=0)
    return constant(float(learning_rate))


def scale_by_lr(learning_rate) -> optax.GradientTransformation:
    """Multiplies updates by ``-schedule(step)``, ``step`` = 1 for the first update.

    ``learning_rate`` is a number or a schedule (see this module's docstring). The state keeps
    the rate used by the last update (0 before any).
    """
    schedule = _as_schedule(learning_rate)

    def init_fn(params):
        del params
        return ScaleByLRState(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32))

    def update_fn(updates, state, params=None):
        del params
        count = state.count + 1
        lr = jnp.asarray(schedule(count), jnp.float32)
        updates = jax.tree_util.tree_map(lambda u: (-lr * u).astype(u.dtype), updates)
        return updates, ScaleByLRState(count, lr)

    return optax.GradientTransformation(init_fn, update_fn)


def current_learning_rate(opt_state) -> jax.Array:
    """The rate the last update used, read from an optimizer state built here."""
    found = [
        s
        for s in jax.tree_util.tree_leaves(
            opt_state, is_leaf=lambda x: isinstance(x, ScaleByLRState)
        )
        if isinstance(s, ScaleByLRState)
    ]
    if not found:
        raise ValueError(
            "current_learning_rate: opt_state holds no ScaleByLRState; build the optimizer "
            "with terraformer.training.optimizers"
        )
    return found[-1].learning_rate


def reported_learning_rate(opt_state) -> jax.Array:
    """`current_learning_rate`, or NaN for an optimizer built elsewhere (plain optax keeps no
    record of its rate); for the metrics of a step, which must not fail for want of it."""
    try:
        return current_learning_rate(opt_state)
    except ValueError:
        return jnp.float32(jnp.nan)


def _finish(direction: list, weight_decay_rate: float, clip_grad_norm, learning_rate, who: str):
    parts = []
    if clip_grad_norm is not None:
        check_number("clip_grad_norm", clip_grad_norm, who, minimum=0, allow_minimum=False)
        parts.append(optax.clip_by_global_norm(float(clip_grad_norm)))
    parts += direction
    check_number("weight_decay_rate", weight_decay_rate, who, minimum=0)
    if weight_decay_rate:
        parts.append(optax.add_decayed_weights(float(weight_decay_rate)))
    parts.append(scale_by_lr(learning_rate))
    return optax.chain(*parts)


# ---------------------------------------------------------------------------------------------
# Optimizers (Trax names and defaults, except weight decay which defaults to off).


@gin.configurable(module="terraformer.optimizers")
def Adam(  # noqa: N802
    learning_rate=0.001,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-5,
    weight_decay_rate: float = 0.0,
    clip_grad_norm: float | None = None,
) -> optax.GradientTransformation:
    """Adam; with ``weight_decay_rate`` > 0, decoupled weight decay scaled by the rate (AdamW):
    ``w -= lr * (m_hat / (sqrt(v_hat) + eps) + weight_decay_rate * w)``."""
    return _finish(
        [optax.scale_by_adam(b1=b1, b2=b2, eps=eps)], weight_decay_rate, clip_grad_norm,
        learning_rate, "Adam",
    )


@gin.configurable(module="terraformer.optimizers")
def Adafactor(  # noqa: N802
    learning_rate=0.05,
    factored: bool = True,
    multiply_by_parameter_scale: bool = True,
    do_clipping: bool = True,
    do_momentum: bool = False,
    beta1: float = 0.0,
    decay_rate: float = 0.8,
    clipping_threshold: float = 1.0,
    weight_decay_rate: float = 0.0,
    epsilon1: float = 1e-30,
    epsilon2: float = 1e-3,
    min_dim_size_to_factor: int = 128,
    clip_grad_norm: float | None = None,
) -> optax.GradientTransformation:
    """Adafactor (Shazeer & Stern 2018) with Trax's argument names.

    Factored second moments for matrices with both dims >= ``min_dim_size_to_factor``, update
    clipping by block RMS (``do_clipping``), step size relative to the parameter RMS floored at
    ``epsilon2`` (``multiply_by_parameter_scale``), optional first moment (``do_momentum``,
    ``beta1``)."""
    direction = [
        optax.scale_by_factored_rms(
            factored=factored, decay_rate=decay_rate, epsilon=epsilon1,
            min_dim_size_to_factor=min_dim_size_to_factor,
        )
    ]
    if do_clipping:
        direction.append(optax.clip_by_block_rms(clipping_threshold))
    if multiply_by_parameter_scale:
        direction.append(optax.scale_by_param_block_rms(min_scale=epsilon2))
    if do_momentum:
        direction.append(optax.ema(beta1, debias=False))
    return _finish(direction, weight_decay_rate, clip_grad_norm, learning_rate, "Adafactor")


@gin.configurable(module="terraformer.optimizers")
def SGD(  # noqa: N802
    learning_rate=0.01,
    weight_decay_rate: float = 0.0,
    clip_grad_norm: float | None = None,
) -> optax.GradientTransformation:
    """Plain gradient descent: ``w -= lr * (g + weight_decay_rate * w)``."""
    return _finish([], weight_decay_rate, clip_grad_norm, learning_rate, "SGD")


@gin.configurable(module="terraformer.optimizers")
def Momentum(  # noqa: N802
    learning_rate=0.01,
    mass: float = 0.9,
    nesterov: bool = True,
    weight_decay_rate: float = 0.0,
    clip_grad_norm: float | None = None,
) -> optax.GradientTransformation:
    """SGD with (Nesterov) momentum: ``m = mass * m + g``; the step is ``lr * m`` (or
    ``lr * (g + mass * m)`` with ``nesterov``)."""
    check_number("mass", mass, "Momentum", minimum=0)
    return _finish(
        [optax.trace(decay=mass, nesterov=nesterov)], weight_decay_rate, clip_grad_norm,
        learning_rate, "Momentum",
    )
