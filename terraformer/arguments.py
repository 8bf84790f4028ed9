"""Command-line arguments: one checking path for `train`, `eval`, `decode` and `bench`.

Every program builds its parser from `ArgumentParser` and gives each numeric option a `type=`
from here, so that a bad value is refused while parsing, by the same checks the library applies
(`terraformer.checks`), with the same one line on stderr and exit status 2::

    $ terraformer bench train --seq_len 0
    terraformer bench train: error: argument --seq_len: must be an int >= 1, got 0

A value the parser cannot judge alone (a length the model's chunking cannot split, a prompt
longer than the model allows) is refused by the library when the command runs; the programs
print that error as one line with the same exit status.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from terraformer.checks import ArgumentError, check_int, check_number

__all__ = ["EXIT_USAGE", "ArgumentParser", "integer", "number"]

EXIT_USAGE = 2


class ArgumentParser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` whose errors are one line, `PROG: error: MESSAGE`, with exit
    status 2 (argparse prints its usage block first; scripts and tests read one line).

    Subparsers made by `add_subparsers` are of the same class, so every subcommand answers so.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._checks: list[Callable[[argparse.Namespace], object]] = []

    def add_check(self, check: Callable[[argparse.Namespace], object]) -> None:
        """Adds a check of several arguments together (e.g. `--block_size` at most
        `--new_tokens`), run on the parsed namespace; an `ArgumentError` it raises is a parse
        error of this (sub)command."""
        self._checks.append(check)

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        for check in self._checks:
            try:
                check(namespace)
            except ArgumentError as e:
                self.error(_message(e))
        return namespace, extras

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _message(error: ArgumentError) -> str:
    # The checks name the value; argparse names the option ("argument --seq_len: ...").
    return str(error).strip()


def integer(minimum: int | None = None, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: the text of an int in [minimum, maximum] (None: unbounded)."""

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an int, got {text!r}") from None
        try:
            return check_int("", value, minimum, maximum=maximum)
        except ArgumentError as e:
            raise argparse.ArgumentTypeError(_message(e)) from None

    parse.__name__ = "int"
    return parse


def number(minimum: float | None = None, maximum: float | None = None, *,
           allow_minimum: bool = True, allow_maximum: bool = True) -> Callable[[str], float]:
    """An argparse type: the text of a finite real number within the bounds
    (`allow_minimum`/`allow_maximum`: whether a bound itself is allowed)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        try:
            return check_number("", value, minimum=minimum, maximum=maximum,
                                allow_minimum=allow_minimum, allow_maximum=allow_maximum)
        except ArgumentError as e:
            raise argparse.ArgumentTypeError(_message(e)) from None

    parse.__name__ = "number"
    return parse
