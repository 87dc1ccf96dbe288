"""The data layer on small synthetic text files: vocabulary, splits, workdir vocab, batches."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import data_cfg

from stm_jax import data
from stm_jax.errors import UserError

# Every train character also occurs in the last 10%, except the ones a test adds on purpose.
SAMPLE = "To be, or not to be: that is the question.\nWhether 'tis nobler in the mind\n" * 40


def text_config(path, **overrides):
    return data_cfg(text_file=str(path), **overrides)


def write(path, text: str):
    path.write_bytes(text.encode("utf-8"))
    return path


def snapshot(folder) -> dict[str, bytes] | None:
    """Every file under ``folder`` with its content, or None if the folder does not exist."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# --- Vocab ---------------------------------------------------------------------------------


def test_vocab_round_trip_is_sorted_and_exact():
    text = "héllo wörld\n\x00\t"
    vocab = data.Vocab.from_text(text)
    assert vocab.chars == tuple(sorted(set(text)))
    assert vocab.size == len(set(text))
    ids = vocab.encode(text)
    assert ids.dtype == np.int32 and ids.shape == (len(text),)
    assert [vocab.chars[i] for i in ids] == list(text)
    assert vocab.decode(ids) == text
    assert vocab.decode(list(ids)) == text
    assert vocab.decode(np.array([], np.int32)) == ""


def test_encode_error_names_the_unknown_characters_in_order():
    vocab = data.Vocab.from_text("abc")
    with pytest.raises(ValueError) as err:
        vocab.encode("abé\x00cé")
    assert str(err.value) == "characters not in the vocabulary: 'é', '\\x00'"


def test_unknown_symbol_maps_and_decodes_to_replacement_char():
    vocab = data.Vocab.from_text("abc", unknown=True)
    assert vocab.size == 4 and vocab.unknown_id == 3
    ids = vocab.encode("aXbé")
    assert ids.tolist() == [0, 3, 1, 3]
    assert vocab.decode(ids) == "a\ufffdb\ufffd"


def test_decode_rejects_out_of_range_ids():
    vocab = data.Vocab.from_text("ab")
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 2\): \[2\]"):
        vocab.decode([0, 2])
    with pytest.raises(ValueError, match="outside"):
        vocab.decode([-1])


def test_vocab_save_load_round_trip_leaves_no_temp_files(tmp_path):
    vocab = data.Vocab.from_text('zé \n\x00"\\', unknown=True)
    path = tmp_path / "sub" / "vocab.json"
    vocab.save(path)
    assert data.Vocab.load(path) == vocab
    assert sorted(p.name for p in path.parent.iterdir()) == ["vocab.json"]
    vocab2 = data.Vocab.from_text("xy")
    vocab2.save(path)  # overwrite in place
    assert data.Vocab.load(path) == vocab2


def test_vocab_load_rejects_malformed_file(tmp_path):
    path = write(tmp_path / "vocab.json", json.dumps({"chars": ["b", "a"]}))
    with pytest.raises(UserError, match="not a valid vocabulary file"):
        data.Vocab.load(path)


# --- load_dataset from a text file ----------------------------------------------------------


def test_text_file_splits_90_10_and_vocab_from_train(tmp_path):
    text = "Q" + SAMPLE  # 'Q' only at the start: it is in train, not in validation
    path = write(tmp_path / "corpus.txt", text)
    splits, vocab, info = data.load_dataset(text_config(path), workdir=tmp_path / "run")
    n_train = int(len(text) * 0.9)
    assert set(splits) == {"train", "validation"}
    assert vocab.decode(splits["train"]) == text[:n_train]
    assert vocab.decode(splits["validation"]) == text[n_train:]
    assert all(s.dtype == np.int32 for s in splits.values())
    assert vocab.chars == tuple(sorted(set(text[:n_train])))
    assert not vocab.unknown
    assert info["name"] == "text_file" and info["proxy"] is False
    assert info["num_chars"] == {"train": n_train, "validation": len(text) - n_train}


def test_val_fraction(tmp_path):
    path = write(tmp_path / "corpus.txt", SAMPLE)
    splits, _, _ = data.load_dataset(text_config(path, val_fraction=0.25))  # no workdir
    assert len(splits["train"]) == int(len(SAMPLE) * 0.75)
    splits, _, _ = data.load_dataset(text_config(path))  # the configs' default, 0.1
    assert len(splits["train"]) == int(len(SAMPLE) * 0.9)


def test_vocab_json_is_written_and_reused(tmp_path):
    path = write(tmp_path / "corpus.txt", SAMPLE)
    workdir = tmp_path / "run"
    _, vocab, _ = data.load_dataset(text_config(path), workdir=workdir)
    assert data.Vocab.load(workdir / "vocab.json") == vocab

    # A stored vocabulary wins even when it is a superset of the train characters.
    stored = data.Vocab.from_text(SAMPLE + "#@")
    stored.save(workdir / "vocab.json")
    splits, vocab2, _ = data.load_dataset(text_config(path), workdir=workdir)
    assert vocab2 == stored
    assert vocab2.decode(splits["train"]) == SAMPLE[: int(len(SAMPLE) * 0.9)]


def test_train_chars_outside_stored_vocab_is_an_error(tmp_path):
    workdir = tmp_path / "run"
    data.Vocab.from_text("abc").save(workdir / "vocab.json")
    before = snapshot(workdir)
    path = write(tmp_path / "corpus.txt", SAMPLE)
    with pytest.raises(UserError, match="train split has characters not in .*vocab.json"):
        data.load_dataset(text_config(path), workdir=workdir)
    assert snapshot(workdir) == before


def test_validation_char_absent_from_train_is_an_error(tmp_path):
    text = SAMPLE + "Zé"  # only in the last 10%
    path = write(tmp_path / "corpus.txt", text)
    workdir = tmp_path / "run"
    with pytest.raises(UserError, match="validation split .* 'Z', 'é'"):
        data.load_dataset(text_config(path), workdir=workdir)
    assert snapshot(workdir) is None


@pytest.mark.parametrize(
    "content, error, match",
    [
        (None, UserError, "does not exist"),
        (b"", UserError, "is empty"),
        (b"good text\n" * 10 + b"\xff\xfe bad", UserError, "not valid UTF-8: byte offset 100"),
        (b"x", UserError, "train split .* is empty"),
    ],
    ids=["missing", "empty", "non-utf8", "too-short"],
)
def test_bad_text_file_is_a_clear_error_and_leaves_workdir_unchanged(
    tmp_path, content, error, match
):
    path = tmp_path / "corpus.txt"
    if content is not None:
        path.write_bytes(content)
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "keep.txt").write_text("untouched")
    before = snapshot(workdir)
    with pytest.raises(error, match=match):
        data.load_dataset(text_config(path), workdir=workdir)
    assert snapshot(workdir) == before


def test_bad_config_values_are_clear_errors(tmp_path):
    path = write(tmp_path / "corpus.txt", SAMPLE)
    with pytest.raises(UserError, match="unknown data.name 'nope'"):
        data.load_dataset(data_cfg(name="nope"))
    with pytest.raises(UserError, match="val_fraction=1.0 must be in"):
        data.load_dataset(text_config(path, val_fraction=1.0))
    with pytest.raises(UserError, match="split_style"):
        data.load_dataset(data_cfg(split_style="random"))
    (tmp_path / "empty").mkdir()
    for manual_dir in ("none", "empty"):  # TFDS would treat both as "download it"
        config = data_cfg(name="wikitext2_raw", data_dir=str(tmp_path / "tfds"),
                          manual_dir=str(tmp_path / manual_dir))
        with pytest.raises(UserError, match="manual_dir .* does not exist or is empty"):
            data.load_dataset(config)


def test_check_split_length():
    tokens = np.zeros(9, np.int32)
    data.check_split_length(tokens, 8, "validation")  # exactly context + 1 is enough
    with pytest.raises(ValueError, match="validation split has 9 tokens.*context \\+ 1 = 10"):
        data.check_split_length(tokens, 9, "validation")


# --- batches ---------------------------------------------------------------------------------


def test_get_batch_is_a_pure_function_of_seed_and_step():
    tokens = np.arange(10_000, dtype=np.int32)
    kwargs = dict(batch_size=8, context=16)
    x1, y1 = data.get_batch(tokens, seed=3, step=7, **kwargs)
    x2, y2 = data.get_batch(tokens, seed=3, step=7, **kwargs)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    x3, _ = data.get_batch(tokens, seed=3, step=8, **kwargs)
    x4, _ = data.get_batch(tokens, seed=4, step=7, **kwargs)
    assert not np.array_equal(x1, x3) and not np.array_equal(x1, x4)


def test_get_batch_windows_shapes_and_shift():
    tokens = np.arange(1_000, dtype=np.int32)  # token value == position
    x, y = data.get_batch(tokens, seed=0, step=0, batch_size=64, context=256)
    assert x.shape == y.shape == (64, 256)
    assert x.dtype == y.dtype == np.int32
    np.testing.assert_array_equal(y[:, :-1], x[:, 1:])
    np.testing.assert_array_equal(y[:, -1], x[:, -1] + 1)
    np.testing.assert_array_equal(x, x[:, :1] + np.arange(256))  # contiguous windows
    assert x.min() >= 0 and y.max() <= 999


def test_get_batch_covers_all_starts_on_the_shortest_split():
    tokens = np.arange(5, dtype=np.int32)  # context 3: starts 0 and 1 only
    starts = {
        int(data.get_batch(tokens, seed=0, step=s, batch_size=4, context=3)[0][0, 0])
        for s in range(50)
    }
    assert starts == {0, 1}
    with pytest.raises(ValueError, match="training split has 5 tokens"):
        data.get_batch(tokens, seed=0, step=0, batch_size=1, context=5)


def test_eval_batches_cover_the_split_in_order():
    tokens = np.arange(1, 1_000, dtype=np.int32)  # 999 tokens
    batches = list(data.eval_batches(tokens, batch_size=3, context=10))
    # (999 - 1) // 10 = 99 windows -> 33 full batches, nothing left over to drop here.
    assert len(batches) == 33 == data.num_eval_batches(999, batch_size=3, context=10)
    inputs = np.concatenate([x.reshape(-1) for x, _ in batches])
    targets = np.concatenate([y.reshape(-1) for _, y in batches])
    np.testing.assert_array_equal(inputs, tokens[:990])
    np.testing.assert_array_equal(targets, tokens[1:991])
    assert all(x.shape == (3, 10) and x.dtype == np.int32 for x, _ in batches)
    again = list(data.eval_batches(tokens, batch_size=3, context=10))
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))


def test_eval_batches_drop_partial_batch_and_respect_max_batches():
    tokens = np.arange(100, dtype=np.int32)  # 9 windows of 11 -> 2 batches of 4, 1 window left
    assert len(list(data.eval_batches(tokens, batch_size=4, context=11))) == 2
    assert len(list(data.eval_batches(tokens, batch_size=4, context=11, max_batches=1))) == 1
    with pytest.raises(ValueError, match="fewer than one batch of 10"):
        data.eval_batches(tokens, batch_size=10, context=11)
