"""Argument checks shared by every layer, model, pipeline and program.

One place for the checks that were written again in each module, so that every bad argument gets
the same one-line message: who refused it, its name, what was expected and what came.
"""

from __future__ import annotations

import numbers

import numpy as np


class ArgumentError(ValueError, TypeError):
    """A bad argument: a wrong type or a value out of range.

    It derives from both ValueError and TypeError so that callers catching either (as Python
    code does for argument errors) catch it, whichever of the two was wrong.
    """


def check_int(name: str, value, minimum: int | None = 0, who: str = "", *,
              maximum: int | None = None) -> int:
    """Returns `value` as an int after checking it is an integer in [minimum, maximum]."""
    prefix = f"{who}: " if who else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentError(f"{prefix}{name} must be an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ArgumentError(f"{prefix}{name} must be an int >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ArgumentError(f"{prefix}{name} must be an int <= {maximum}, got {value!r}")
    return int(value)


def check_number(name: str, value, who: str = "", *, minimum: float | None = None,
                 maximum: float | None = None, allow_minimum: bool = True,
                 allow_maximum: bool = True) -> float:
    """Returns `value` as a float after checking it is a real number within the given bounds.

    `allow_minimum`/`allow_maximum` say whether the bound itself is allowed: a rate in [0, 1)
    is `minimum=0, maximum=1, allow_maximum=False`.
    """
    prefix = f"{who}: " if who else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentError(f"{prefix}{name} must be a number, got {type(value).__name__} "
                            f"{value!r}")
    too_low = minimum is not None and (value < minimum or (value == minimum and not allow_minimum))
    too_high = maximum is not None and (value > maximum or (value == maximum and not allow_maximum))
    if too_low or too_high:
        low = "" if minimum is None else ("[" if allow_minimum else "(") + f"{minimum}"
        high = "" if maximum is None else f"{maximum}" + ("]" if allow_maximum else ")")
        if minimum is None:
            expected = f"<{'=' if allow_maximum else ''} {maximum}"
        elif maximum is None:
            expected = f">{'=' if allow_minimum else ''} {minimum}"
        else:
            expected = f"in {low}, {high}"
        raise ArgumentError(f"{prefix}{name} must be {expected}, got {value!r}")
    return float(value)


def check_rate(name: str, value, who: str = "") -> float:
    """A probability such as a dropout rate: a number in [0, 1)."""
    return check_number(name, value, who, minimum=0.0, maximum=1.0, allow_maximum=False)


def check_choice(name: str, value, choices, who: str = ""):
    """Returns `value` after checking it is one of `choices`."""
    if value not in choices:
        prefix = f"{who}: " if who else ""
        listed = ", ".join(repr(c) for c in choices)
        raise ArgumentError(f"{prefix}{name} must be one of {listed}, got {value!r}")
    return value


def check_token_ids(name: str, ids, who: str = "", *, vocab_size: int | None = None,
                    dtype=np.int32) -> np.ndarray:
    """Returns `ids` as a 1-D `dtype` array, shape (n_tokens,), after checking its rank, that
    it holds integers (an empty array may have any dtype) and, given `vocab_size`, that every
    id lies in [0, vocab_size)."""
    prefix = f"{who}: " if who else ""
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ArgumentError(f"{prefix}{name} must be 1-D (n_tokens,), got shape {arr.shape}")
    if arr.size == 0:
        return arr.astype(dtype)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ArgumentError(f"{prefix}{name} must hold integers, got dtype {arr.dtype}")
    if vocab_size is not None:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= vocab_size:
            raise ArgumentError(f"{prefix}{name} must lie in [0, {vocab_size}), got values in "
                                f"[{lo}, {hi}]")
    return arr.astype(dtype)
