"""ListOps (Nangia and Bowman, 2018) as the Long Range Arena defines it: a ten-class task on
nested lists of digits that no download provides, so it is generated here.

An expression is a prefix tree of the operators ``[MAX``, ``[MIN``, ``[MED`` (median, rounded
down as ``int(np.median)``) and ``[SM`` (sum modulo 10) over the digits 0-9, each list closed by
``]``; its label is its value, 0-9::

    [MAX 4 3 [MIN 2 3 ] 1 0 [MED 1 5 8 9 2 ] ]          -> 5

The generator is LRA's (``lra_benchmarks/data/listops.py``): a node is a digit with probability
0.75 (always at ``max_depth``), else an operator over 2 to ``max_args`` nodes; trees are drawn
until their length (digits, operators and brackets: the tokens) lies strictly between
``min_len`` and ``max_len`` (LRA: 500 and 2000, depth 10, up to 10 arguments). LRA's files also
write the binary tree's parentheses; they carry nothing and are not counted in its lengths, so
the tokens here are the symbols above alone (16 ids with padding, `ListOpsVocabulary`).

`listops_inputs` is the input pipeline a gin config names as ``train.inputs``: batches
``(tokens [batch, max_len] int32, labels [batch] int32, weights [batch] float32)``, padded with
id 0, deterministic given ``seed`` and ``split``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import gin
import numpy as np

from terraformer.checks import check_choice, check_int

__all__ = [
    "DIGITS",
    "END",
    "N_CLASSES",
    "OPERATORS",
    "ListOpsVocabulary",
    "evaluate",
    "generate_expression",
    "listops_examples",
    "listops_inputs",
]

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
END = "]"
DIGITS = tuple(str(d) for d in range(10))
N_CLASSES = 10
VALUE_P = 0.25  # LRA's: a node is an operator when a uniform draw is at most this
SPLITS = ("train", "eval")


class ListOpsVocabulary:
    """The ListOps symbols as ids: 0 padding, 1-10 the digits 0-9, then the four operators and
    the closing bracket (``vocab_size`` 16).

    ``encode("[SM 3 4 ]")`` -> ``[14, 4, 5, 15]``; ``decode`` is its inverse (padding dropped).
    """

    pad_id = 0
    symbols = ("<pad>", *DIGITS, *OPERATORS, END)
    vocab_size = len(symbols)
    name = "listops"

    def __init__(self):
        self._ids = {s: i for i, s in enumerate(self.symbols)}

    def encode(self, expression: str | Sequence[str]) -> np.ndarray:
        """Ids [length] int32 of an expression: a string of space-separated symbols or a list
        of symbols."""
        tokens = expression.split() if isinstance(expression, str) else list(expression)
        try:
            return np.array([self._ids[t] for t in tokens if t != "<pad>"], np.int32)
        except KeyError as e:
            raise ValueError(f"ListOpsVocabulary.encode: unknown symbol {e.args[0]!r}; "
                             f"expected one of {' '.join(self.symbols[1:])}") from None

    def decode(self, ids) -> str:
        """The expression of ``ids`` (padding dropped), symbols separated by spaces."""
        return " ".join(self.symbols[int(i)] for i in np.asarray(ids).ravel() if int(i))


def _reduce(op: str, values: list[int]) -> int:
    if op == "[MIN":
        return min(values)
    if op == "[MAX":
        return max(values)
    if op == "[MED":
        return int(np.median(values))
    return sum(values) % 10


def evaluate(expression: str | Sequence[str]) -> int:
    """The value (0-9) of an expression: a string of space-separated symbols or a list of them.

    Raises ValueError for an expression that is not one well-formed tree.
    """
    tokens = expression.split() if isinstance(expression, str) else list(expression)
    stack: list[tuple[str, list[int]]] = []
    result = None
    for i, token in enumerate(tokens):
        if result is not None:
            raise ValueError(f"evaluate: symbols after the end of the expression at {i}: "
                             f"{' '.join(tokens[i:i + 5])!r}")
        if token in OPERATORS:
            stack.append((token, []))
            continue
        if token == END:
            if not stack or not stack[-1][1]:
                raise ValueError(f"evaluate: ']' at {i} closes no list of values")
            op, values = stack.pop()
            value = _reduce(op, values)
        elif token in DIGITS:
            value = int(token)
        else:
            raise ValueError(f"evaluate: unknown symbol {token!r} at {i}")
        if stack:
            stack[-1][1].append(value)
        else:
            result = value
    if result is None:
        raise ValueError(f"evaluate: incomplete expression ({len(stack)} lists not closed)"
                         if stack else "evaluate: empty expression")
    return result


class _TooLongError(Exception):
    pass


def _tree(rng: random.Random, depth: int, max_depth: int, max_args: int, out: list,
          budget: int) -> None:
    """Appends one LRA tree's tokens to ``out``; raises _TooLongError past ``budget`` tokens (a
    draw rejected early is a draw rejected: the accepted trees are distributed as LRA's)."""
    if len(out) >= budget:
        raise _TooLongError
    r = rng.random() if depth < max_depth else 1.0
    if r > VALUE_P:
        out.append(DIGITS[rng.randrange(10)])
        return
    n_args = rng.randint(2, max_args)
    op = OPERATORS[rng.randrange(len(OPERATORS))]
    out.append(op)
    for _ in range(n_args):
        _tree(rng, depth + 1, max_depth, max_args, out, budget)
    out.append(END)


def generate_expression(rng: random.Random, min_len: int = 500, max_len: int = 2000,
                        max_depth: int = 10, max_args: int = 10) -> list[str]:
    """One expression (a list of symbols) of length strictly between ``min_len`` and
    ``max_len``, drawn as LRA draws them (see the module docstring)."""
    check_int("max_args", max_args, 2, "generate_expression")
    check_int("max_depth", max_depth, 1, "generate_expression")
    check_int("min_len", min_len, 0, "generate_expression")
    check_int("max_len", max_len, min_len + 2, "generate_expression")
    while True:
        out: list[str] = []
        try:
            _tree(rng, 1, max_depth, max_args, out, max_len)
        except _TooLongError:
            continue
        if min_len < len(out) < max_len:
            return out


def _split_rng(seed: int, split: str) -> random.Random:
    check_choice("split", split, SPLITS, "listops")
    state = np.random.SeedSequence([int(seed), SPLITS.index(split)]).generate_state(2)
    return random.Random(int(state[0]) << 32 | int(state[1]))


def listops_examples(seed: int = 0, split: str = "train", min_len: int = 500,
                     max_len: int = 2000, max_depth: int = 10,
                     max_args: int = 10) -> Iterator[tuple[list[str], int]]:
    """An endless stream of ``(expression as a list of symbols, label)``; the same ``seed``
    and ``split`` give the same stream, the two splits different ones."""
    rng = _split_rng(seed, split)
    while True:
        expression = generate_expression(rng, min_len, max_len, max_depth, max_args)
        yield expression, evaluate(expression)


@gin.configurable(module="terraformer.data")
def listops_inputs(
    batch_size: int = 32,
    max_len: int = 2000,
    min_len: int = 500,
    split: str = "train",
    seed: int = 0,
    max_depth: int = 10,
    max_args: int = 10,
) -> Iterator:
    """ListOps classification batches (gin: ``train.inputs = @listops_inputs``,
    ``train.eval_inputs = @eval/listops_inputs`` with ``eval/listops_inputs.split = 'eval'``).

    Yields ``(tokens [batch_size, max_len] int32, labels [batch_size] int32,
    weights [batch_size] float32 ones)``: each row one expression's ids (`ListOpsVocabulary`)
    followed by padding (0), its label the expression's value. Endless; each call restarts the
    same stream.
    """
    who = "listops_inputs"
    check_int("batch_size", batch_size, 1, who)
    check_int("max_len", max_len, min_len + 2, who)
    check_choice("split", split, SPLITS, who)
    examples = listops_examples(seed, split, min_len, max_len, max_depth, max_args)
    return _batches(examples, batch_size, max_len)


def _batches(examples, batch_size: int, max_len: int):
    vocab = ListOpsVocabulary()
    weights = np.ones((batch_size,), np.float32)
    while True:
        tokens = np.zeros((batch_size, max_len), np.int32)
        labels = np.zeros((batch_size,), np.int32)
        for row in range(batch_size):
            expression, labels[row] = next(examples)
            ids = vocab.encode(expression)
            tokens[row, : ids.size] = ids
        yield tokens, labels, weights.copy()
