"""terraformer.arguments: argparse types on terraformer.checks, and a parser whose every error is
one line with exit status 2; and checks.check_token_ids, the token-array check of data/."""

import argparse

import numpy as np
import pytest

from terraformer.arguments import ArgumentParser, integer, number
from terraformer.checks import ArgumentError, check_int, check_token_ids


def _parser():
    parser = ArgumentParser(prog="prog")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run")
    p.add_argument("--n", type=integer(1, 9), default=1)
    p.add_argument("--p", type=number(0.0, 1.0, allow_minimum=False), default=0.5)
    p.add_argument("--kind", choices=["a", "b"], default="a")
    p.add_argument("--k", type=integer(1), default=1)
    p.add_check(lambda args: check_int("argument --k (at most --n)", args.k, 1, maximum=args.n))
    return parser


def test_good_values_are_converted(np_rng):
    n, p = int(np_rng.integers(1, 10)), float(np_rng.uniform(0.01, 1.0))
    args = _parser().parse_args(["run", "--n", str(n), "--p", repr(p)])
    assert (args.n, args.p) == (n, p) and isinstance(args.n, int)


@pytest.mark.parametrize("argv, message", [
    (["run", "--n", "0"], "prog run: error: argument --n: must be an int >= 1, got 0"),
    (["run", "--n", "10"], "prog run: error: argument --n: must be an int <= 9, got 10"),
    (["run", "--n", "2.0"], "prog run: error: argument --n: must be an int, got '2.0'"),
    (["run", "--p", "0"], "prog run: error: argument --p: must be in (0.0, 1.0], got 0.0"),
    (["run", "--p", "inf"], "prog run: error: argument --p: must be a finite number, got 'inf'"),
    (["run", "--p", "x"], "prog run: error: argument --p: must be a number, got 'x'"),
    (["run", "--kind", "c"], "prog run: error: argument --kind: invalid choice: 'c'"),
    (["walk"], "prog: error: argument command: invalid choice: 'walk'"),
    (["run", "--m", "1"], "prog: error: unrecognized arguments: --m 1"),
    (["run", "--n", "2", "--k", "3"],
     "prog run: error: argument --k (at most --n) must be an int <= 2, got 3"),
])
def test_every_error_is_one_line_with_status_2(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        _parser().parse_args(argv)
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith(message), err


def test_types_refuse_with_argparse_errors():
    with pytest.raises(argparse.ArgumentTypeError, match=">= 3"):
        integer(3)("2")
    with pytest.raises(argparse.ArgumentTypeError, match="> 0"):
        number(0.0, allow_minimum=False)("0")


def test_check_token_ids(np_rng):
    ids = np_rng.integers(0, 50, size=int(np_rng.integers(1, 20)))
    out = check_token_ids("ids", ids, "who", vocab_size=50)
    np.testing.assert_array_equal(out, ids)
    assert out.dtype == np.int32
    assert check_token_ids("ids", [], "who", dtype=np.int64).dtype == np.int64
    with pytest.raises(ArgumentError, match=r"who: ids must be 1-D \(n_tokens,\), got shape"):
        check_token_ids("ids", ids.reshape(1, -1), "who")
    with pytest.raises(TypeError, match="who: ids must hold integers, got dtype float"):
        check_token_ids("ids", ids.astype(float), "who")
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 50\), got values in \[-1, "):
        check_token_ids("ids", np.append(ids, -1), "who", vocab_size=50)
