"""Byte-level BPE tokenizers and memory-mapped token files, against oracles: the text itself
(round trips), ``tokenizers``' own encoding of the whole text, the in-memory batches."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import data_cfg

from stm_jax import data
from stm_jax.data import corpus
from stm_jax.data.tokenizer import BPETokenizer, split_chunks
from stm_jax.errors import UserError

# Non-ASCII in every script the byte-level alphabet must carry: accents, CJK, emoji, controls.
UNICODE = ("To be, or not to be: that is the question.\nWhether 'tis nobler in the mind\n"
           "héllo wörld, ça va?  日本語のテキスト 😀👍🏽 \t tab\r\n\n  indented\n"
           "Ελληνικά, русский, עברית, ‮bidi‬, zero\u200bwidth, <|endoftext|> literal\n")


@pytest.fixture(scope="module")
def tokenizer() -> BPETokenizer:
    return BPETokenizer.train([UNICODE * 20], vocab_size=400)


def test_encode_decode_round_trips_any_unicode(tokenizer):
    for text in (UNICODE, "x", "😀", " \n\n ", "\u0000\u00ff\uffff", UNICODE[5:77] * 3):
        ids = tokenizer.encode(text)
        assert ids.dtype == np.int32 and tokenizer.decode(ids) == text
        assert "".join(tokenizer.pieces(ids)) == text
        assert int(tokenizer.token_bytes[ids].sum()) == len(text.encode("utf-8"))
    # Text the tokenizer never saw (other scripts) is bytes, so it still round-trips.
    unseen = "ქართული ენა 🦀 ∮ E⋅da = Q"
    assert tokenizer.decode(tokenizer.encode(unseen)) == unseen


def test_byte_table_is_the_tokenizers_own(tokenizer):
    for index in range(tokenizer.size):
        as_bytes = tokenizer.token_bytes_of(index)
        assert len(as_bytes) == tokenizer.token_bytes[index]
        text = as_bytes.decode("utf-8", errors="ignore")
        if text and len(text.encode()) == len(as_bytes):  # whole characters only
            assert tokenizer.decode([index]) == text


@pytest.mark.parametrize("target", [7, 64, 1000])
def test_chunked_encoding_equals_encoding_the_whole_text(tokenizer, target):
    """The chunks are cut at pre-token boundaries: the ids are the whole text's."""
    text = (UNICODE + "a  \nb\n\nc \n d" * 5) * 6
    chunks = split_chunks(text, target)
    assert "".join(chunks) == text and len(chunks) > 1
    whole = tokenizer._tokenizer.encode(text, add_special_tokens=False).ids
    np.testing.assert_array_equal(tokenizer.encode_chunks(chunks), whole)


def test_save_load_and_identity(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "tokenizer.json")
    loaded = BPETokenizer.load(tmp_path / "tokenizer.json")
    assert loaded == tokenizer and loaded.sha256 == tokenizer.sha256
    assert loaded.dtype == np.uint16 and loaded.kind == "bpe"
    (tmp_path / "bad.json").write_text('{"model": {"type": "WordPiece"}}')
    with pytest.raises(UserError, match="bad.json is not a tokenizers JSON file"):
        BPETokenizer.load(tmp_path / "bad.json")


# --- token files ----------------------------------------------------------------------------


def write(path, text: str):
    path.write_bytes(text.encode("utf-8"))
    return path


def test_text_file_split_is_the_character_split(tmp_path):
    """A text file's train/validation byte ranges hold the characters a char run splits at."""
    text = UNICODE * 7
    path = write(tmp_path / "corpus.txt", text)
    sources = corpus.text_file_sources(path, 0.1)
    cut = int(len(text) * 0.9)
    for split, expected in (("train", text[:cut]), ("validation", text[cut:])):
        assert "".join(sources[split].blocks(size=50)) == expected
        assert sources[split].num_chars == len(expected)
        assert sources[split].num_bytes == len(expected.encode())


def test_token_file_is_cached_memory_mapped_and_exact(tokenizer, tmp_path):
    text = UNICODE * 30
    source = corpus.TextSource.of_text(text, "test")
    mapped = corpus.encode_to_file(source, tokenizer, tmp_path / "cache")
    assert isinstance(mapped, np.memmap) and mapped.dtype == np.uint16
    ids = np.array(mapped)
    np.testing.assert_array_equal(ids, tokenizer.encode(text))
    path = corpus.token_file(tmp_path / "cache", source, tokenizer)
    assert path.stat().st_size == 2 * len(ids)
    written = path.stat().st_mtime_ns
    corpus.encode_to_file(source, tokenizer, tmp_path / "cache")  # reused, not re-encoded
    assert path.stat().st_mtime_ns == written
    del mapped
    short = path.read_bytes()[:10]
    path.unlink()  # a new file (truncating the mapped one in place would fault its readers)
    path.write_bytes(short)  # cut short: encoded again
    np.testing.assert_array_equal(corpus.encode_to_file(source, tokenizer, tmp_path / "cache"),
                                  ids)
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_large_vocabularies_use_uint32(tokenizer, tmp_path):
    wide = BPETokenizer(tokenizer.serialized)
    wide.size = 2**16 + 1  # the dtype rule only; the ids themselves stay small
    source = corpus.TextSource.of_text(UNICODE, "wide")
    ids = corpus.encode_to_file(source, wide, tmp_path)
    assert ids.dtype == np.uint32
    np.testing.assert_array_equal(ids, tokenizer.encode(UNICODE))


def test_memory_mapped_batches_equal_in_memory_batches(tokenizer, tmp_path):
    mapped = corpus.encode_to_file(corpus.TextSource.of_text(UNICODE * 40, "x"), tokenizer,
                                   tmp_path)
    in_memory = np.array(mapped, dtype=np.int32)
    for step in (0, 1, 17):
        for a, b in zip(data.get_batch(mapped, seed=3, step=step, batch_size=4, context=16),
                        data.get_batch(in_memory, seed=3, step=step, batch_size=4, context=16),
                        strict=True):
            assert a.dtype == np.int32
            np.testing.assert_array_equal(a, b)
    for (a, b), (c, d) in zip(data.eval_batches(mapped, batch_size=2, context=8),
                              data.eval_batches(in_memory, batch_size=2, context=8),
                              strict=True):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)


def test_load_dataset_trains_stores_and_reuses_the_tokenizer(tmp_path):
    text = UNICODE * 30
    cfg = data_cfg(text_file=str(write(tmp_path / "c.txt", text)), tokenizer="bpe",
                   vocab_size=300, cache_dir=str(tmp_path / "cache"))
    workdir = tmp_path / "run"
    workdir.mkdir()
    splits, tokenizer, info = data.load_dataset(cfg, workdir)
    assert (workdir / "tokenizer.json").is_file() and tokenizer.size <= 300
    cut = int(len(text) * 0.9)
    assert tokenizer.decode(splits["train"]) == text[:cut]
    assert tokenizer.decode(splits["validation"]) == text[cut:]
    assert info["num_bytes"]["validation"] == len(text[cut:].encode())
    again, same, _ = data.load_dataset(cfg, workdir)
    assert same == tokenizer
    np.testing.assert_array_equal(again["train"], splits["train"])
    # A tokenizer.json given by path is copied into a fresh workdir and must match later.
    other = BPETokenizer.train([text], vocab_size=280)
    other.save(tmp_path / "other.json")
    with pytest.raises(UserError, match="not the tokenizer this workdir was trained with"):
        data.load_dataset(data_cfg(**{**cfg.to_dict(), "tokenizer": str(tmp_path / "other.json")}),
                          workdir)


def test_subword_errors_name_the_problem_and_write_nothing(tmp_path):
    cache = tmp_path / "cache"
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(("caf\u00e9 " * 50).encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1.txt' is not UTF-8 text \(byte 3"):
        data.load_dataset(data_cfg(text_file=str(bad), tokenizer="bpe", cache_dir=str(cache)))
    with pytest.raises(UserError, match="data.tokenizer='nope.json' is neither"):
        data.validate_config(data_cfg(tokenizer="nope.json"))
    with pytest.raises(UserError, match="data.vocab_size=100 must be an integer above 257"):
        data.validate_config(data_cfg(tokenizer="bpe", vocab_size=100))
    workdir = tmp_path / "char_run"
    workdir.mkdir()
    (workdir / "vocab.json").write_text("{}")
    text = write(tmp_path / "ok.txt", UNICODE * 5)
    with pytest.raises(UserError, match="holds a character run"):
        data.load_dataset(data_cfg(text_file=str(text), tokenizer="bpe", cache_dir=str(cache)),
                          workdir)
    assert not cache.exists() and sorted(p.name for p in workdir.iterdir()) == ["vocab.json"]
