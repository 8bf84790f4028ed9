"""The shared argument checks: what they accept, and the one-line errors they give."""

import numpy as np
import pytest

from terraformer.checks import ArgumentError, check_choice, check_int, check_number, check_rate


def test_check_int_accepts_integers_in_range(np_rng):
    value = int(np_rng.integers(1, 100))
    assert check_int("n", value, 1, "who") == value
    assert check_int("n", np.int32(value), 1, "who") == value
    assert isinstance(check_int("n", np.int64(value), 1), int)


@pytest.mark.parametrize("bad", [1.5, "3", True, None])
def test_check_int_refuses_other_types_as_type_and_value_error(bad):
    with pytest.raises(TypeError, match=r"who: n must be an int"):
        check_int("n", bad, 0, "who")
    with pytest.raises(ValueError, match=r"who: n must be an int"):
        check_int("n", bad, 0, "who")


def test_check_int_bounds():
    with pytest.raises(ArgumentError, match=r"n must be an int >= 2, got 1"):
        check_int("n", 1, 2)
    with pytest.raises(ArgumentError, match=r"n must be an int <= 4, got 5"):
        check_int("n", 5, 0, maximum=4)


def test_check_number_and_rate():
    assert check_number("lr", 3, minimum=0.0, allow_minimum=False) == 3.0
    with pytest.raises(ArgumentError, match=r"lr must be > 0"):
        check_number("lr", 0.0, minimum=0.0, allow_minimum=False)
    assert check_rate("dropout", 0.0) == 0.0
    with pytest.raises(ArgumentError, match=r"dropout must be in \[0.0, 1.0\), got 1.0"):
        check_rate("dropout", 1.0)
    with pytest.raises(ArgumentError, match=r"must be a number"):
        check_rate("dropout", "0.1")


def test_check_choice():
    assert check_choice("mode", "eval", ("train", "eval")) == "eval"
    with pytest.raises(ArgumentError, match=r"mode must be one of 'train', 'eval', got 'x'"):
        check_choice("mode", "x", ("train", "eval"))
