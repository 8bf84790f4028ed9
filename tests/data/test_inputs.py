"""The input pipelines of terraformer.data.inputs: text files for a language model."""

import itertools

import gin
import numpy as np
import pytest

from terraformer.data.inputs import text_lm_inputs
from terraformer.data.tokenizers import ByteTokenizer


@pytest.fixture(autouse=True)
def _clear_gin():
    gin.clear_config()
    yield
    gin.clear_config()


@pytest.fixture
def text_file(tmp_path, np_rng):
    words = np.array(["alpha", "beta", "gamma", "delta", "ε"])
    text = " ".join(np_rng.choice(words, size=400))
    path = tmp_path / "book.txt"
    path.write_text(text, encoding="utf-8")
    return path, text


def test_text_lm_inputs_pack_covers_the_split(text_file):
    path, text = text_file
    train_text, eval_text = text[: len(text) - round(0.1 * len(text))], text[len(
        text) - round(0.1 * len(text)):]
    tok = ByteTokenizer()
    seq_len, batch = 16, 2
    stream = text_lm_inputs(path, seq_len=seq_len, batch_size=batch, split="eval",
                                    held_out_fraction=0.1, tokenizer="byte")
    assert isinstance(stream.tokenizer, ByteTokenizer)
    rows = [(x[i], w[i]) for x, y, w in stream for i in range(batch)]
    tokens = np.concatenate([x[w > 0] for x, w in rows])
    expected = np.append(tok.encode(eval_text), tok.eos_id)
    n = min(len(tokens), len(expected))  # the last partial batch is dropped
    np.testing.assert_array_equal(tokens[:n], expected[:n])
    assert len(expected) - n < batch * seq_len
    # Training repeats epochs forever, reshuffled; every row comes from the train split.
    train_stream = text_lm_inputs(path, seq_len=seq_len, batch_size=batch,
                                          held_out_fraction=0.1, tokenizer="byte", seed=3)
    n_rows = -(-(len(tok.encode(train_text)) + 1) // seq_len)
    batches = list(itertools.islice(train_stream, n_rows))  # about two epochs
    assert all(x.shape == (batch, seq_len) for x, _, _ in batches)
    again = list(itertools.islice(text_lm_inputs(
        path, seq_len=seq_len, batch_size=batch, held_out_fraction=0.1, tokenizer="byte",
        seed=3), n_rows))
    for (a, _, _), (b, _, _) in zip(batches, again, strict=True):
        np.testing.assert_array_equal(a, b)


def test_text_lm_inputs_whole_document(text_file):
    path, text = text_file
    tok = ByteTokenizer()
    n = len(tok.encode(text))
    stream = text_lm_inputs(path, seq_len=n + 50, batch_size=3, held_out_fraction=0.0,
                                    mode="whole_document", tokenizer="byte")
    x, y, w = next(stream)
    assert x.shape == (3, n + 50) and np.array_equal(x, y)
    for row, weights in zip(x, w, strict=True):
        np.testing.assert_array_equal(row[weights > 0], tok.encode(text))


def test_text_lm_inputs_gin_and_errors(text_file, tmp_path):
    path, _ = text_file
    gin.parse_config(f"text_lm_inputs.path = '{path}'\ntokenizer.name_or_path = 'byte'")
    assert next(text_lm_inputs(seq_len=8, batch_size=2))[0].shape == (2, 8)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        text_lm_inputs(seq_len=64, batch_size=100, split="eval")
    with pytest.raises(ValueError, match="split must be"):
        text_lm_inputs(split="test")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        text_lm_inputs(path=tmp_path / "missing.txt")
