"""Tests of terraformer.data.tokenizers."""

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from terraformer.data.tokenizers import (
    ByteTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    check_vocab,
    get_tokenizer,
    tokenizer,
)

SP_MODEL = Path(__file__).resolve().parents[2].parent / "shared/data/t5-sentencepiece-32k.model"


@pytest.fixture(scope="module")
def sp_tokenizer():
    if not SP_MODEL.is_file():
        pytest.skip(f"{SP_MODEL} is absent")
    return SentencePieceTokenizer(SP_MODEL)


# ByteTokenizer ----------------------------------------------------------------------------------


def test_byte_layout():
    tok = ByteTokenizer()
    assert (tok.pad_id, tok.eos_id, tok.vocab_size) == (0, 1, 258)
    ids = tok.encode("A\x00\xff")
    assert ids.dtype == np.int32
    # 'A' = 0x41, NUL = 0, U+00FF = c3 bf in UTF-8; every byte shifted by 2.
    np.testing.assert_array_equal(ids, [0x41 + 2, 2, 0xC3 + 2, 0xBF + 2])
    assert isinstance(tok, Tokenizer)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_byte_round_trip_any_text(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids.shape == (len(text.encode("utf-8")),)
    assert ids.min(initial=2) >= 2 and ids.max(initial=2) < tok.vocab_size
    assert tok.decode(ids) == text


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_byte_round_trip_random_code_points(seed):
    rng = np.random.default_rng(seed)
    code_points = rng.integers(0, 0x110000, size=500)
    text = "".join(map(chr, code_points))  # includes lone surrogates
    tok = ByteTokenizer()
    assert tok.decode(tok.encode(text)) == text


def test_byte_non_ascii_examples():
    tok = ByteTokenizer()
    for text in ["héllo wörld", "日本語のテキスト", "emoji 🤖🚀", "Ελληνικά\nРусский\t"]:
        assert tok.decode(tok.encode(text)) == text


def test_byte_decode_drops_pad_and_stops_at_eos():
    tok = ByteTokenizer()
    ids = np.concatenate([[0, 0], tok.encode("ab"), [1], tok.encode("cd"), [0]])
    assert tok.decode(ids) == "ab"
    assert tok.decode(ids, stop_at_eos=False) == "abcd"


def test_byte_decode_invalid_utf8_is_replaced():
    tok = ByteTokenizer()
    ids = tok.encode("é")[:1]  # half of a two-byte character
    assert tok.decode(np.concatenate([tok.encode("x"), ids])) == "x\ufffd"


def test_byte_decode_rejects_bad_ids():
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match=r"\[0, 258\)"):
        tok.decode([5, 258])
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(np.zeros((2, 2), np.int32))
    with pytest.raises(TypeError, match="integers"):
        tok.decode([2.5])
    with pytest.raises(TypeError, match="str"):
        tok.encode(b"bytes")


# SentencePieceTokenizer -------------------------------------------------------------------------


def test_sentencepiece_vocab_and_specials(sp_tokenizer):
    assert sp_tokenizer.vocab_size == 32000
    assert (sp_tokenizer.pad_id, sp_tokenizer.eos_id) == (0, 1)
    assert isinstance(sp_tokenizer, Tokenizer)


@pytest.mark.parametrize("seed", [0, 7, 42])
def test_sentencepiece_round_trip(sp_tokenizer, seed):
    rng = np.random.default_rng(seed)
    words = [
        "the",
        "Reformer",
        "attention",
        "is",
        "efficient",
        "memory",
        "1024",
        "tokens,",
        "hashing",
        "reversible",
        "layers.",
        "Sparse",
        "model",
        "decoding!",
    ]
    text = " ".join(rng.choice(words, size=40))
    ids = sp_tokenizer.encode(text)
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert 0 < ids.size < len(text)
    assert ids.min() >= 0 and ids.max() < 32000
    assert sp_tokenizer.eos_id not in ids  # no EOS appended
    assert sp_tokenizer.decode(ids) == text
    padded = np.concatenate([ids, [sp_tokenizer.eos_id], ids[:3], [0, 0]])
    assert sp_tokenizer.decode(padded) == text


def test_sentencepiece_missing_file(tmp_path):
    missing = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match="nope.model"):
        SentencePieceTokenizer(missing)


def test_sentencepiece_corrupt_file(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"\x00\x01 this is not a protobuf \xff" * 4)
    with pytest.raises(ValueError, match="bad.model"):
        SentencePieceTokenizer(bad)


# get_tokenizer, check_vocab ---------------------------------------------------------------------


def test_get_tokenizer_byte():
    assert isinstance(get_tokenizer("byte"), ByteTokenizer)


def test_get_tokenizer_model_path(sp_tokenizer):
    tok = get_tokenizer(str(SP_MODEL))
    assert isinstance(tok, SentencePieceTokenizer) and tok.vocab_size == 32000


def test_get_tokenizer_unknown_lists_options():
    with pytest.raises(ValueError, match=r"'byte'.*\.model.*'bpe'"):
        get_tokenizer("bpe")


def test_get_tokenizer_missing_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.model"):
        get_tokenizer(tmp_path / "absent.model")


def test_check_vocab():
    tok = ByteTokenizer()
    check_vocab(tok, 258)
    check_vocab(tok, 320)
    with pytest.raises(ValueError) as info:
        check_vocab(tok, 256)
    assert str(info.value) == (
        "tokenizer 'byte' has vocab_size 258 but the model's vocab_size is 256"
    )


# IdsTokenizer (through the gin-configurable tokenizer()) -------------------------------------


def test_ids_tokenizer(np_rng):
    tok = tokenizer("ids", vocab_size=10)
    ids = np_rng.integers(0, 10, size=7)
    text = " ".join(map(str, ids))
    np.testing.assert_array_equal(tok.encode(text), ids)
    assert tok.decode(tok.encode(text)) == text
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 10\)"):
        tok.encode("3 12")
    with pytest.raises(ValueError, match="whitespace-separated integers"):
        tok.encode("three")
    with pytest.raises(ValueError, match="vocab_size"):
        tokenizer("ids")


@pytest.mark.parametrize("level", ["0", "2", None])
def test_sentencepiece_leaves_the_tensorflow_log_level_as_it_was(level, tmp_path, monkeypatch):
    # A chosen level (0: all of TensorFlow's logging) turns the quieting off; without one the
    # quieting sets a level only while TensorFlow starts.
    if level is None:
        monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    else:
        monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", level)
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model" * 4)
    with pytest.raises(ValueError, match="bad.model"):
        SentencePieceTokenizer(bad)
    assert os.environ.get("TF_CPP_MIN_LOG_LEVEL") == level
