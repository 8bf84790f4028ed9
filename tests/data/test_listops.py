"""ListOps: labels against an independent evaluation of each expression, lengths, classes,
determinism, and the one-line errors of malformed expressions."""

import numpy as np
import pytest

from terraformer.data.listops import (
    ListOpsVocabulary,
    evaluate,
    generate_expression,
    listops_inputs,
)

SMALL = dict(max_len=80, min_len=12, max_depth=6)


def _reference_value(tokens: list[str]) -> int:
    """A recursive-descent evaluation of the token string, written apart from `evaluate`."""

    def node(i):
        token = tokens[i]
        if token.isdigit():
            return int(token), i + 1
        assert token.startswith("["), token
        values, i = [], i + 1
        while tokens[i] != "]":
            value, i = node(i)
            values.append(value)
        ordered = sorted(values)
        n = len(ordered)
        median = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) // 2
        return {"[MIN": min(values), "[MAX": max(values), "[MED": median,
                "[SM": sum(values) % 10}[token], i + 1

    value, end = node(0)
    assert end == len(tokens), "symbols after the expression"
    return value


def test_labels_equal_a_direct_evaluation(seed):
    vocab = ListOpsVocabulary()
    tokens, labels, weights = next(listops_inputs(batch_size=64, seed=seed, **SMALL))
    assert tokens.dtype == np.int32 and labels.shape == (64,) and weights.shape == (64,)
    for row, label in zip(tokens, labels, strict=True):
        expression = vocab.decode(row).split()
        assert _reference_value(expression) == label, " ".join(expression)


def test_evaluate_known_values():
    assert evaluate("[MAX 4 3 [MIN 2 3 ] 1 0 [MED 1 5 8 9 2 ] ]") == 5
    assert evaluate("[SM 9 8 [MAX 1 7 ] ]") == 4
    assert evaluate("[MED 1 2 ]") == 1          # int(np.median): the mean of the two, floored
    assert evaluate("[MED 3 9 0 4 ]") == 3
    assert evaluate("7") == 7


@pytest.mark.parametrize("expression", ["[MAX 1", "1 2", "]", "[SM ]", "[MIN 1 x ]", ""])
def test_evaluate_rejects_malformed(expression):
    with pytest.raises(ValueError, match="evaluate"):
        evaluate(expression)


def test_lengths_within_bounds_and_padding_after(seed):
    tokens, _, _ = next(listops_inputs(batch_size=64, seed=seed, **SMALL))
    assert tokens.shape == (64, SMALL["max_len"])
    lengths = (tokens != 0).sum(axis=1)
    assert np.all(lengths > SMALL["min_len"]) and np.all(lengths < SMALL["max_len"])
    # The expression is a prefix; every position after it is padding.
    assert np.all(tokens[np.arange(SMALL["max_len"])[None] >= lengths[:, None]] == 0)


def test_full_size_expressions_fit_lra_bounds(seed):
    import random

    expression = generate_expression(random.Random(seed))
    assert 500 < len(expression) < 2000
    assert evaluate(expression) == _reference_value(expression)


def test_all_ten_classes_appear(seed):
    _, labels, _ = next(listops_inputs(batch_size=400, seed=seed, max_len=40, min_len=5,
                                       max_depth=4))
    assert set(labels.tolist()) == set(range(10))


def test_deterministic_by_seed_and_split(seed):
    a = next(listops_inputs(batch_size=8, seed=seed, **SMALL))
    b = next(listops_inputs(batch_size=8, seed=seed, **SMALL))
    c = next(listops_inputs(batch_size=8, seed=seed, split="eval", **SMALL))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_vocabulary_round_trip_and_errors():
    vocab = ListOpsVocabulary()
    text = "[SM 3 [MED 4 0 ] ]"
    ids = vocab.encode(text)
    assert vocab.vocab_size == 16 and ids.max() < vocab.vocab_size and ids.min() > 0
    assert vocab.decode(np.concatenate([ids, [0, 0]])) == text
    with pytest.raises(ValueError, match="unknown symbol"):
        vocab.encode("[SUM 1 2 ]")
    with pytest.raises(ValueError, match="split"):
        listops_inputs(split="test")
