"""Tests of terraformer.data.streams."""

import itertools
import json

import numpy as np
import pytest

from terraformer.data import streams
from terraformer.data.tokenizers import ByteTokenizer


def take(stream, n):
    return list(itertools.islice(stream, n))


def random_docs(seed, n_docs=20, max_len=50, vocab=100):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, max_len, size=n_docs)
    return [rng.integers(2, vocab, size=n).astype(np.int32) for n in lengths]


# copy_task --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 3, 11])
def test_copy_task_structure(seed):
    batch_size, seq_len, vocab = 4, 32, 17
    inputs, targets, weights = next(streams.copy_task(batch_size, seq_len, vocab, seed=seed))
    assert inputs.shape == targets.shape == weights.shape == (batch_size, seq_len)
    assert inputs.dtype == np.int32 and weights.dtype == np.float32
    np.testing.assert_array_equal(inputs, targets)
    half = seq_len // 2
    np.testing.assert_array_equal(inputs[:, :half], inputs[:, half:])
    assert np.all(inputs[:, 0] == 0) and np.all(inputs[:, half] == 0)
    word = inputs[:, 1:half]
    assert word.min() >= 1 and word.max() <= vocab - 1
    expected = np.zeros(seq_len, np.float32)
    expected[half + 1 :] = 1.0
    np.testing.assert_array_equal(weights, np.broadcast_to(expected, weights.shape))
    assert weights.sum() == batch_size * (half - 1)


def test_copy_task_determinism():
    a = take(streams.copy_task(3, 16, seed=5), 3)
    b = take(streams.copy_task(3, 16, seed=5), 3)
    c = take(streams.copy_task(3, 16, seed=6), 3)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x[0], y[0])
    assert not all(np.array_equal(x[0], z[0]) for x, z in zip(a, c, strict=True))
    assert not np.array_equal(a[0][0], a[1][0])  # successive batches differ


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"batch_size": 2, "seq_len": 9}, "seq_len must be even"),
        ({"batch_size": 2, "seq_len": 2}, "seq_len must be >= 4"),
        ({"batch_size": 0, "seq_len": 8}, "batch_size"),
        ({"batch_size": 2, "seq_len": 8, "vocab_size": 1}, "vocab_size"),
    ],
)
def test_copy_task_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        streams.copy_task(**kwargs)


# pack_documents ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_pack_documents_keeps_all_tokens(seed):
    docs = random_docs(seed)
    seq_len = int(np.random.default_rng(seed).integers(1, 40))
    rows = list(streams.pack_documents(iter(docs), seq_len, eos_id=1, pad_id=0))
    expected = np.concatenate([np.append(d, 1) for d in docs])
    assert all(t.shape == w.shape == (seq_len,) for t, w in rows)
    assert all(t.dtype == np.int32 and w.dtype == np.float32 for t, w in rows)
    unpadded = np.concatenate([t[w > 0] for t, w in rows])
    np.testing.assert_array_equal(unpadded, expected)
    assert len(rows) == -(-expected.size // seq_len)
    # Only the last row may hold padding, and padding is pad_id at the end.
    for _, w in rows[:-1]:
        assert np.all(w == 1)
    t, w = rows[-1]
    n_real = expected.size - (len(rows) - 1) * seq_len
    np.testing.assert_array_equal(w, np.arange(seq_len) < n_real)
    assert np.all(t[n_real:] == 0)


def test_pack_documents_pad_equal_to_eos_is_weighted_by_position():
    rows = list(streams.pack_documents([np.array([5, 6, 7])], 6, eos_id=0, pad_id=0))
    assert len(rows) == 1
    np.testing.assert_array_equal(rows[0][0], [5, 6, 7, 0, 0, 0])
    np.testing.assert_array_equal(rows[0][1], [1, 1, 1, 1, 0, 0])


def test_pack_documents_errors():
    with pytest.raises(ValueError, match="seq_len"):
        streams.pack_documents([], 0, eos_id=1)
    with pytest.raises(ValueError, match=r"token_arrays\[1\] must be 1-D"):
        list(streams.pack_documents([np.arange(3), np.zeros((2, 2), int)], 4, eos_id=1))


# whole_document ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_whole_document_random_left_padding(seed):
    rng = np.random.default_rng(seed)
    doc = rng.integers(2, 50, size=int(rng.integers(1, 30))).astype(np.int32)
    seq_len = 40
    lefts = set()
    for tokens, weights in take(streams.whole_document(doc, seq_len, pad_id=0, seed=seed), 200):
        assert tokens.shape == weights.shape == (seq_len,)
        assert tokens.dtype == np.int32 and weights.dtype == np.float32
        (real,) = np.nonzero(weights)
        left = real[0]
        assert 0 <= left <= seq_len - doc.size
        np.testing.assert_array_equal(real, np.arange(left, left + doc.size))
        np.testing.assert_array_equal(tokens[real], doc)
        assert np.all(tokens[weights == 0] == 0)
        lefts.add(left)
    assert len(lefts) > 1  # the padding really varies


def test_whole_document_fits_exactly_and_longer():
    doc = np.arange(2, 12, dtype=np.int32)
    tokens, weights = next(streams.whole_document(doc, 10))
    np.testing.assert_array_equal(tokens, doc)
    assert np.all(weights == 1)
    for tokens, weights in take(streams.whole_document(doc, 4, seed=3), 20):
        start = tokens[0] - 2
        np.testing.assert_array_equal(tokens, doc[start : start + 4])
        assert np.all(weights == 1)


def test_whole_document_determinism():
    doc = np.arange(2, 9)
    a = [t for t, _ in take(streams.whole_document(doc, 64, seed=1), 10)]
    b = [t for t, _ in take(streams.whole_document(doc, 64, seed=1), 10)]
    c = [t for t, _ in take(streams.whole_document(doc, 64, seed=2), 10)]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_whole_document_empty():
    with pytest.raises(ValueError, match="at least one token"):
        streams.whole_document(np.array([], np.int32), 8)


# batch, lm_batches, shuffle ---------------------------------------------------------------------


def test_batch_stacks_tuples_and_drops_remainder():
    items = [(np.full(3, i), np.full(2, -i)) for i in range(7)]
    batches = list(streams.batch(items, 3))
    assert len(batches) == 2
    a, b = batches[1]
    assert a.shape == (3, 3) and b.shape == (3, 2)
    np.testing.assert_array_equal(a[:, 0], [3, 4, 5])
    arrays = list(streams.batch([np.arange(2)] * 4, 2))
    assert arrays[0].shape == (2, 2)


def test_batch_shape_mismatch():
    with pytest.raises(ValueError, match="equal shapes"):
        list(streams.batch([np.zeros(2), np.zeros(3)], 2))


def test_lm_batches():
    rows = streams.pack_documents(random_docs(0, n_docs=30), 16, eos_id=1)
    inputs, targets, weights = next(streams.lm_batches(rows, 4))
    assert inputs.shape == targets.shape == weights.shape == (4, 16)
    assert inputs.dtype == targets.dtype == np.int32 and weights.dtype == np.float32
    np.testing.assert_array_equal(inputs, targets)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shuffle_is_a_deterministic_permutation(seed):
    items = list(range(100))
    a = list(streams.shuffle(iter(items), 10, seed=seed))
    b = list(streams.shuffle(iter(items), 10, seed=seed))
    c = list(streams.shuffle(iter(items), 10, seed=seed + 100))
    assert sorted(a) == items and a == b
    assert a != items and a != c
    assert list(streams.shuffle(items, 1, seed=seed)) == items


def test_same_seed_same_batches_full_pipeline():
    def pipeline(seed):
        rows = streams.pack_documents(random_docs(9, n_docs=60), 8, eos_id=1)
        return take(streams.lm_batches(streams.shuffle(rows, 16, seed=seed), 4), 5)

    a, b, c = pipeline(0), pipeline(0), pipeline(1)
    for x, y in zip(a, b, strict=True):
        for u, v in zip(x, y, strict=True):
            np.testing.assert_array_equal(u, v)
    assert not all(np.array_equal(x[0], z[0]) for x, z in zip(a, c, strict=True))


# text sources -----------------------------------------------------------------------------------


def test_text_files_file_dir_and_list(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("second", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first é", encoding="utf-8")
    (tmp_path / "sub" / "c.txt").write_text("third", encoding="utf-8")
    (tmp_path / ".hidden").write_text("skip me", encoding="utf-8")
    assert list(streams.text_files(tmp_path)) == ["first é", "second", "third"]
    assert list(streams.text_files(tmp_path / "b.txt")) == ["second"]
    assert list(streams.text_files([tmp_path / "sub", str(tmp_path / "a.txt")])) == [
        "third",
        "first é",
    ]


def test_text_files_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        streams.text_files([tmp_path / "missing.txt"])


def test_text_files_empty(tmp_path):
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="empty.txt"):
        streams.text_files(tmp_path / "empty.txt")
    (tmp_path / "blank.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="blank.txt"):
        list(streams.text_files(tmp_path / "blank.txt"))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="nothing"):
        streams.text_files(tmp_path / "nothing")


def test_split_text():
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    train, held_out = streams.split_text(text, 0.1)
    assert train + held_out == text and len(held_out) == 100
    assert streams.split_text(text, 0.0) == (text, "")
    with pytest.raises(ValueError, match="held_out_fraction"):
        streams.split_text(text, 1.0)


def test_tokenize_and_pack_bytes_round_trip():
    tok = ByteTokenizer()
    texts = ["héllo", "wörld", "Reformer"]
    rows = streams.pack_documents(streams.tokenize(texts, tok), 7, eos_id=tok.eos_id)
    flat = np.concatenate([t[w > 0] for t, w in rows])
    assert tok.decode(flat, stop_at_eos=False) == "".join(texts)


def test_tfds_text_without_tfds():
    try:
        import tensorflow_datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install tensorflow-datasets"):
            streams.tfds_text("tiny_shakespeare", "train")
    else:
        pytest.skip("tensorflow_datasets is installed")


# jsonl ------------------------------------------------------------------------------------------


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def test_jsonl_pairs(tmp_path):
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, [{"article": "a1", "abstract": "s1"}, {"article": "a2", "abstract": "s2"}])
    assert list(streams.jsonl_pairs(path)) == [("a1", "s1"), ("a2", "s2")]
    write_jsonl(path, [{"q": "x", "a": "y"}])
    assert list(streams.jsonl_pairs(path, "q", "a")) == [("x", "y")]


@pytest.mark.parametrize(
    "bad_line, match",
    [
        ("{not json", "malformed JSON"),
        ('["a", "b"]', "expected a JSON object, got list"),
        ('{"article": "a"}', "missing key 'abstract'"),
        ('{"article": "a", "abstract": 3}', "'abstract' must be a string"),
    ],
)
def test_jsonl_pairs_bad_line(tmp_path, bad_line, match):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"article": "a", "abstract": "b"})
    path.write_text(f"{good}\n\n{bad_line}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"bad.jsonl:3: {match}"):
        list(streams.jsonl_pairs(path))


def test_jsonl_pairs_missing_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="gone.jsonl"):
        streams.jsonl_pairs(tmp_path / "gone.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty.jsonl"):
        streams.jsonl_pairs(tmp_path / "empty.jsonl")


def test_summarization_pairs(tmp_path):
    path = tmp_path / "pairs.jsonl"
    write_jsonl(
        path,
        [
            {"article": "a long article text", "abstract": "short"},
            {"article": "hi", "abstract": "a much longer abstract"},
        ],
    )
    tok = ByteTokenizer()
    examples = list(streams.summarization_pairs(path, tok, input_len=8, target_len=10))
    assert len(examples) == 2
    for inputs, targets, weights in examples:
        assert inputs.shape == (8,) and targets.shape == weights.shape == (10,)
        assert inputs.dtype == targets.dtype == np.int32 and weights.dtype == np.float32
    inputs, targets, weights = examples[0]
    assert tok.decode(inputs) == "a long "  # truncated to 7 tokens + EOS
    assert inputs[-1] == tok.eos_id
    np.testing.assert_array_equal(targets[:6], np.append(tok.encode("short"), tok.eos_id))
    np.testing.assert_array_equal(weights, np.arange(10) < 6)
    assert np.all(targets[6:] == tok.pad_id)
    inputs, targets, weights = examples[1]
    assert tok.decode(targets) == "a much lo" and np.all(weights == 1)
    np.testing.assert_array_equal(inputs[:3], np.append(tok.encode("hi"), tok.eos_id))


def test_stream_constructors_are_gin_configurable():
    import gin

    try:
        gin.parse_config(
            ["terraformer.data.copy_task.seq_len = 8", "terraformer.data.copy_task.vocab_size = 3"]
        )
        inputs, _, _ = next(streams.copy_task(batch_size=2))
        assert inputs.shape == (2, 8) and inputs.max() <= 2
    finally:
        gin.clear_config()
