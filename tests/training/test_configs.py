"""Gin registrations and the text LM input pipeline."""

import itertools

import gin
import numpy as np
import pytest

from terraformer import configs
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


def test_every_name_is_registered():
    gin.parse_config("""
        train.model = @TransformerLM
        train.inputs = @copy_task
        train.eval_inputs = @eval/text_lm_inputs
        train.optimizer = @Adafactor
        train.lr_schedule = @multifactor()
        SGD.learning_rate = 0.1
        Momentum.mass = 0.8
        lr.constant.value = 0.1
        warmup.warmup_steps = 3
        rsqrt_decay.warmup_steps = 3
        cosine.total_steps = 30
        tokenizer.name_or_path = 'byte'
        pack_documents.pad_id = 0
        whole_document.pad_id = 0
        terraformer.models.TransformerLM.d_model = 8
    """)


def test_register_is_idempotent():
    from terraformer.models.transformer import TransformerLM

    first = configs.register(TransformerLM)
    configs.register_models()
    assert configs.register(TransformerLM) is first


def test_ids_tokenizer(np_rng):
    tok = configs.tokenizer("ids", vocab_size=10)
    ids = np_rng.integers(0, 10, size=7)
    text = " ".join(map(str, ids))
    np.testing.assert_array_equal(tok.encode(text), ids)
    assert tok.decode(tok.encode(text)) == text
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 10\)"):
        tok.encode("3 12")
    with pytest.raises(ValueError, match="whitespace-separated integers"):
        tok.encode("three")
    with pytest.raises(ValueError, match="vocab_size"):
        configs.tokenizer("ids")


def test_text_lm_inputs_pack_covers_the_split(text_file):
    path, text = text_file
    train_text, eval_text = text[: len(text) - round(0.1 * len(text))], text[len(
        text) - round(0.1 * len(text)):]
    tok = ByteTokenizer()
    seq_len, batch = 16, 2
    stream = configs.text_lm_inputs(path, seq_len=seq_len, batch_size=batch, split="eval",
                                    held_out_fraction=0.1, tokenizer="byte")
    assert isinstance(stream.tokenizer, ByteTokenizer)
    rows = [(x[i], w[i]) for x, y, w in stream for i in range(batch)]
    tokens = np.concatenate([x[w > 0] for x, w in rows])
    expected = np.append(tok.encode(eval_text), tok.eos_id)
    n = min(len(tokens), len(expected))  # the last partial batch is dropped
    np.testing.assert_array_equal(tokens[:n], expected[:n])
    assert len(expected) - n < batch * seq_len
    # Training repeats epochs forever, reshuffled; every row comes from the train split.
    train_stream = configs.text_lm_inputs(path, seq_len=seq_len, batch_size=batch,
                                          held_out_fraction=0.1, tokenizer="byte", seed=3)
    n_rows = -(-(len(tok.encode(train_text)) + 1) // seq_len)
    batches = list(itertools.islice(train_stream, n_rows))  # about two epochs
    assert all(x.shape == (batch, seq_len) for x, _, _ in batches)
    again = list(itertools.islice(configs.text_lm_inputs(
        path, seq_len=seq_len, batch_size=batch, held_out_fraction=0.1, tokenizer="byte",
        seed=3), n_rows))
    for (a, _, _), (b, _, _) in zip(batches, again, strict=True):
        np.testing.assert_array_equal(a, b)


def test_text_lm_inputs_whole_document(text_file):
    path, text = text_file
    tok = ByteTokenizer()
    n = len(tok.encode(text))
    stream = configs.text_lm_inputs(path, seq_len=n + 50, batch_size=3, held_out_fraction=0.0,
                                    mode="whole_document", tokenizer="byte")
    x, y, w = next(stream)
    assert x.shape == (3, n + 50) and np.array_equal(x, y)
    for row, weights in zip(x, w, strict=True):
        np.testing.assert_array_equal(row[weights > 0], tok.encode(text))


def test_text_lm_inputs_gin_and_errors(text_file, tmp_path):
    path, _ = text_file
    gin.parse_config(f"text_lm_inputs.path = '{path}'\ntokenizer.name_or_path = 'byte'")
    assert next(configs.text_lm_inputs(seq_len=8, batch_size=2))[0].shape == (2, 8)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        configs.text_lm_inputs(seq_len=64, batch_size=100, split="eval")
    with pytest.raises(ValueError, match="split must be"):
        configs.text_lm_inputs(split="test")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        configs.text_lm_inputs(path=tmp_path / "missing.txt")
