"""The project's TFDS builders, offline and without TensorFlow.

Small synthetic raw files stand in for the corpora. Their digests differ from the published ones,
so the tests patch the builders' digest tables (verification itself stays on); one test checks
that an unpatched digest is a clear error. A local HTTP server stands in for the download URLs.
"""

from __future__ import annotations

import functools
import http.server
import importlib.util
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import data_cfg

from stm_jax import data
from stm_jax.data.builders import common, tiny_shakespeare_char, wikitext2_raw_char
from stm_jax.data.builders.tiny_shakespeare_char import TinyShakespeareChar
from stm_jax.data.builders.wikitext2_raw_char import Wikitext2RawChar
from stm_jax.errors import UserError

SHARED_DATA = Path(__file__).parents[2] / "shared" / "data"
TINY = "".join(f"{i}: Thou art {'more lovely' if i % 3 else 'fair'}; é!\n" for i in range(60))
WIKI = {
    "wiki.train.raw": " = Train = \n the train text , with @-@ marks \n" * 30,
    "wiki.valid.raw": " = Valid = \n validation text ü ß \n" * 10,
    "wiki.test.raw": " = Test = \n the test text , 42 \n" * 10,
}

tfds.disable_progress_bar()


@pytest.fixture(autouse=True)
def no_tensorflow():
    """No test here may import TensorFlow (TFDS imports it lazily, only on paths that need it)."""
    yield
    assert "tensorflow" not in sys.modules


def test_tensorflow_is_not_installed():
    """The suite runs without TensorFlow, so the tests below prove the TF-less path works.

    (It cannot be hidden in-process where it is installed: etils and TFDS decide by
    `importlib.util.find_spec` and by `'tensorflow' in sys.modules`.)
    """
    assert importlib.util.find_spec("tensorflow") is None


def write_tiny(folder: Path, monkeypatch, text: str = TINY) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "input.txt"
    raw = text.encode("utf-8")
    path.write_bytes(raw)
    monkeypatch.setitem(tiny_shakespeare_char.SHA256, "input.txt", common.sha256_hex(raw))
    return path


def write_wiki(folder: Path, monkeypatch, names=tuple(WIKI)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        raw = WIKI[name].encode("utf-8")
        (folder / name).write_bytes(raw)
        monkeypatch.setitem(wikitext2_raw_char.SHA256, name, common.sha256_hex(raw))


def prepare(builder_cls, config: str, data_dir: Path, manual_dir: Path | None):
    builder = builder_cls(config=config, data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir and str(manual_dir))
    )
    return builder


def read_texts(name: str, data_dir: Path) -> dict[str, str]:
    """Reads every split through the public `tfds.data_source` API."""
    sources = tfds.data_source(name, data_dir=str(data_dir))
    assert all(len(source) == 1 for source in sources.values())
    return {split: source[0]["text"].decode("utf-8") for split, source in sources.items()}


# --- tiny_shakespeare_char --------------------------------------------------------------------


@pytest.mark.parametrize("style", ["nanogpt", "tfds"])
def test_tiny_shakespeare_exact_splits(tmp_path, monkeypatch, style):
    write_tiny(tmp_path / "manual", monkeypatch)
    prepare(TinyShakespeareChar, style, tmp_path / "tfds", tmp_path / "manual")
    texts = read_texts(f"tiny_shakespeare_char/{style}", tmp_path / "tfds")
    cut = int(len(TINY) * 0.9)
    if style == "nanogpt":
        assert texts == {"train": TINY[:cut], "validation": TINY[cut:]}
    else:
        cut2 = cut + int((len(TINY) - cut) * 0.5)
        assert texts == {"train": TINY[:cut], "validation": TINY[cut:cut2], "test": TINY[cut2:]}


def test_manual_subfolder_and_prepared_data_is_reused(tmp_path, monkeypatch):
    manual = tmp_path / "manual"
    write_tiny(manual / "tinyshakespeare", monkeypatch)  # the customary subfolder works too
    prepare(TinyShakespeareChar, "nanogpt", tmp_path / "tfds", manual)
    for path in sorted(manual.rglob("*"), reverse=True):  # the raw file is no longer needed
        path.unlink() if path.is_file() else path.rmdir()

    def no_download(*args):
        raise AssertionError("prepared data should have been reused")

    monkeypatch.setattr(common, "download_first", no_download)
    prepare(TinyShakespeareChar, "nanogpt", tmp_path / "tfds", manual)
    assert (
        read_texts("tiny_shakespeare_char/nanogpt", tmp_path / "tfds")["train"]
        == TINY[: int(len(TINY) * 0.9)]
    )


def test_sha256_mismatch_names_the_file(tmp_path):
    path = tmp_path / "manual" / "input.txt"
    path.parent.mkdir()
    path.write_text(TINY)  # digest table not patched: this is not the published file
    with pytest.raises(common.ChecksumError, match=f"sha256 mismatch for {path}: expected 86c4"):
        prepare(TinyShakespeareChar, "nanogpt", tmp_path / "tfds", tmp_path / "manual")
    assert not list((tmp_path / "tfds").rglob("dataset_info.json"))


def test_non_utf8_raw_file_names_the_byte_offset(tmp_path, monkeypatch):
    path = write_tiny(tmp_path / "manual", monkeypatch)
    raw = b"abc\xff" + path.read_bytes()
    path.write_bytes(raw)
    monkeypatch.setitem(tiny_shakespeare_char.SHA256, "input.txt", common.sha256_hex(raw))
    with pytest.raises(UserError, match="not valid UTF-8: byte offset 3"):
        prepare(TinyShakespeareChar, "nanogpt", tmp_path / "tfds", tmp_path / "manual")


def test_missing_raw_file_in_manual_dir_is_a_clear_error(tmp_path):
    (tmp_path / "manual").mkdir()
    (tmp_path / "manual" / "other.txt").write_text("x")
    with pytest.raises(UserError, match="input.txt not found in manual_dir"):
        prepare(TinyShakespeareChar, "nanogpt", tmp_path / "tfds", tmp_path / "manual")


# --- wikitext2_raw_char -----------------------------------------------------------------------


def test_wikitext_full_and_proxy_splits(tmp_path, monkeypatch):
    write_wiki(tmp_path / "manual" / "wikitext-2-raw", monkeypatch)
    prepare(Wikitext2RawChar, "full", tmp_path / "tfds", tmp_path / "manual")
    prepare(Wikitext2RawChar, "proxy", tmp_path / "tfds", tmp_path / "manual")
    assert read_texts("wikitext2_raw_char/full", tmp_path / "tfds") == {
        "train": WIKI["wiki.train.raw"],
        "validation": WIKI["wiki.valid.raw"],
        "test": WIKI["wiki.test.raw"],
    }
    assert read_texts("wikitext2_raw_char/proxy", tmp_path / "tfds") == {
        "train": WIKI["wiki.test.raw"],
        "validation": WIKI["wiki.valid.raw"],
    }


def test_wikitext_missing_train_file_points_to_proxy(tmp_path, monkeypatch):
    write_wiki(tmp_path / "manual", monkeypatch, names=("wiki.valid.raw", "wiki.test.raw"))
    with pytest.raises(UserError, match="wiki.train.raw not found.*'proxy' config"):
        prepare(Wikitext2RawChar, "full", tmp_path / "tfds", tmp_path / "manual")


# --- through the data layer -------------------------------------------------------------------


def test_load_dataset_tiny_shakespeare_vocab_from_train(tmp_path, monkeypatch):
    text = "XY" + TINY  # 'X' and 'Y' occur only in train
    write_tiny(tmp_path / "manual", monkeypatch, text)
    config = data_cfg(name="tiny_shakespeare", split_style="tfds",
                      data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path / "manual"))
    splits, vocab, info = data.load_dataset(config, workdir=tmp_path / "run")
    cut = int(len(text) * 0.9)
    assert vocab.chars == tuple(sorted(set(text[:cut]))) and not vocab.unknown
    assert vocab.decode(splits["train"]) == text[:cut]
    assert vocab.decode(np.concatenate([splits["validation"], splits["test"]])) == text[cut:]
    assert info["source"].startswith("tfds:tiny_shakespeare_char/tfds:1.0.0")
    assert info["num_chars"]["train"] == cut and info["split_style"] == "tfds"
    assert data.Vocab.load(tmp_path / "run" / "vocab.json") == vocab


def test_load_dataset_wikitext_proxy_has_unknown_symbol(tmp_path, monkeypatch):
    write_wiki(tmp_path / "manual", monkeypatch, names=("wiki.valid.raw", "wiki.test.raw"))
    config = data_cfg(name="wikitext2_raw", wikitext_proxy=True,
                      data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path / "manual"))
    splits, vocab, info = data.load_dataset(config, workdir=tmp_path / "run")
    assert vocab.unknown and vocab.chars == tuple(sorted(set(WIKI["wiki.test.raw"])))
    assert set(splits) == {"train", "validation"}
    valid = WIKI["wiki.valid.raw"]
    expected = "".join(c if c in vocab.chars else "\ufffd" for c in valid)
    assert vocab.decode(splits["validation"]) == expected
    assert info["proxy"] is True and "PROXY" in info["note"]
    assert info["num_unknown"] == {
        "train": 0,
        "validation": sum(c not in vocab.chars for c in valid),
    }


def test_load_dataset_wikitext_without_train_file_names_the_flag(tmp_path, monkeypatch):
    write_wiki(tmp_path / "manual", monkeypatch, names=("wiki.valid.raw", "wiki.test.raw"))
    config = data_cfg(name="wikitext2_raw", data_dir=str(tmp_path / "tfds"),
                      manual_dir=str(tmp_path / "manual"))
    with pytest.raises(UserError, match="data.wikitext_proxy=True"):
        data.load_dataset(config, workdir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


# --- downloads (a local HTTP server stands in for the canonical URLs) -------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_root(tmp_path):
    """Serves ``tmp_path / 'www'`` on localhost; yields (folder, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def test_download_without_manual_dir(tmp_path, monkeypatch, http_root):
    root, base = http_root
    write_tiny(root, monkeypatch)
    with zipfile.ZipFile(root / "wikitext-2-raw-v1.zip", "w") as zf:
        for name, text in WIKI.items():
            zf.writestr(f"wikitext-2-raw/{name}", text)
            monkeypatch.setitem(wikitext2_raw_char.SHA256, name, common.sha256_hex(text.encode()))
    monkeypatch.setattr(tiny_shakespeare_char, "URL", f"{base}/input.txt")
    # The first URL answers 404: the builder falls back to the mirror.
    monkeypatch.setattr(
        wikitext2_raw_char, "URLS", (f"{base}/missing.zip", f"{base}/wikitext-2-raw-v1.zip")
    )

    prepare(TinyShakespeareChar, "nanogpt", tmp_path / "tfds", manual_dir=None)
    prepare(Wikitext2RawChar, "full", tmp_path / "tfds", manual_dir=None)
    cut = int(len(TINY) * 0.9)
    assert read_texts("tiny_shakespeare_char/nanogpt", tmp_path / "tfds") == {
        "train": TINY[:cut],
        "validation": TINY[cut:],
    }
    assert (
        read_texts("wikitext2_raw_char/full", tmp_path / "tfds")["train"] == WIKI["wiki.train.raw"]
    )


# --- the real corpus (slow; only where the offline copy exists) --------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "tinyshakespeare").is_dir(), reason="no offline corpus")
def test_real_tiny_shakespeare_split_sizes(tmp_path):
    prepare(TinyShakespeareChar, "tfds", tmp_path / "tfds", SHARED_DATA / "tinyshakespeare")
    texts = read_texts("tiny_shakespeare_char/tfds", tmp_path / "tfds")
    assert {split: len(text) for split, text in texts.items()} == {
        "train": 1_003_854,
        "validation": 55_770,
        "test": 55_770,
    }
    assert len(set(texts["train"])) == 65
    splits, vocab, _ = data.load_dataset(data_cfg(
        name="tiny_shakespeare", split_style="nanogpt", data_dir=str(tmp_path / "tfds"),
        manual_dir=str(SHARED_DATA)))
    assert vocab.size == 65
    assert {k: len(v) for k, v in splits.items()} == {"train": 1_003_854, "validation": 111_540}
