"""``load_dataset``: the configured text as token splits, with the workdir's vocabulary.

It reads the text splits (TFDS builders in `stm_jax.data.builders`, or any UTF-8 text file)
and builds the vocabulary from the TRAIN split only. It stores the vocabulary as
``workdir/vocab.json`` and, when that file exists, reuses it instead of rebuilding it, so a
checkpoint's token ids always mean the same characters.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from stm_jax import files
from stm_jax.data import corpus
from stm_jax.data.builders import common
from stm_jax.data.builders.tiny_shakespeare_char import SPLIT_STYLES, TinyShakespeareChar
from stm_jax.data.builders.wikitext2_raw_char import Wikitext2RawChar
from stm_jax.data.tokenizer import BYTE_ALPHABET, TOKENIZER_FILENAME, BPETokenizer
from stm_jax.data.vocab import VOCAB_FILENAME, Vocab, list_chars
from stm_jax.errors import UserError

DATASET_NAMES = ("tiny_shakespeare", "wikitext2_raw", "text_file")
TOKENIZER_KINDS = ("char", "bpe")  # data.tokenizer, or the path of a tokenizer.json
MAX_VOCAB = 2**32
# Datasets whose held-out splits legitimately contain characters the train split lacks (the
# WikiText validation file has 284 distinct characters, the test file 259): they get an
# unknown symbol. Elsewhere an out-of-vocabulary character is an error, never silently mapped.
_DATASETS_WITH_UNKNOWN = ("wikitext2_raw",)
_PROXY_NOTE = ("WikiText-2 PROXY split (wiki.train.raw unavailable): trained on wiki.test.raw, "
               "evaluated on wiki.valid.raw; not comparable with published WikiText-2 results.")


# ---------------------------------------------------------------------------------------------
# Reading the splits


def dataset_name(data_cfg) -> str:
    """The dataset actually read: a non-empty ``data.text_file`` overrides ``data.name``."""
    return "text_file" if data_cfg.text_file else data_cfg.name


def validate_config(data_cfg) -> None:
    """Raise :class:`UserError` for a ``data`` config that cannot be read; reads no file."""
    dataset = dataset_name(data_cfg)
    if dataset not in DATASET_NAMES:
        raise UserError(f"unknown data.name {data_cfg.name!r}; use one of {DATASET_NAMES} (or "
                        "set data.text_file to a UTF-8 text file)")
    if dataset == "text_file" and not 0.0 < data_cfg.val_fraction < 1.0:
        raise UserError(f"data.val_fraction={data_cfg.val_fraction} must be in (0, 1)")
    if dataset == "tiny_shakespeare" and data_cfg.split_style not in SPLIT_STYLES:
        raise UserError(f"unknown data.split_style {data_cfg.split_style!r}; use one of "
                        f"{SPLIT_STYLES}")
    kind = data_cfg.tokenizer
    if kind not in TOKENIZER_KINDS and not Path(kind).expanduser().is_file():
        raise UserError(f"data.tokenizer={kind!r} is neither one of {TOKENIZER_KINDS} nor an "
                        "existing tokenizer.json; check the path.")
    if kind == "bpe" and not (isinstance(data_cfg.vocab_size, int)
                              and BYTE_ALPHABET + 1 < data_cfg.vocab_size <= MAX_VOCAB):
        raise UserError(f"data.vocab_size={data_cfg.vocab_size!r} must be an integer above "
                        f"{BYTE_ALPHABET + 1} (the bytes and <|endoftext|>) for a BPE.")


def read_text_file(path: str | os.PathLike) -> str:
    """The whole file as text: exact UTF-8 (no newline translation), non-empty."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(
            f"data.text_file {str(path)!r} does not exist or is not a file; check the path."
        )
    data = path.read_bytes()
    if not data:
        raise UserError(f"data.text_file {str(path)!r} is empty; give a file with text in it.")
    return common.decode_utf8(data, f"data.text_file {str(path)!r}")


def _split_text_file(text: str, val_fraction: float) -> dict[str, str]:
    """First ``1 - val_fraction`` train, the rest validation (nanoGPT: ``int(n * 0.9)``)."""
    train_end = int(len(text) * (1.0 - val_fraction))
    return {"train": text[:train_end], "validation": text[train_end:]}


def _read_tfds_splits(data_cfg) -> tuple[dict[str, str], str]:
    """Prepares the TFDS dataset if needed (reusing prepared data) and reads its splits."""
    if dataset_name(data_cfg) == "tiny_shakespeare":
        builder_cls, config_name = TinyShakespeareChar, data_cfg.split_style
    else:
        builder_cls = Wikitext2RawChar
        config_name = "proxy" if data_cfg.wikitext_proxy else "full"
    builder = builder_cls(
        config=config_name,
        data_dir=str(Path(data_cfg.data_dir).expanduser()) if data_cfg.data_dir else None,
        file_format="array_record",
    )
    manual_dir = str(Path(data_cfg.manual_dir).expanduser()) if data_cfg.manual_dir else None
    if manual_dir and not builder.is_prepared():
        _check_manual_dir(manual_dir)
    try:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
        )
    except UserError as err:
        if builder_cls is Wikitext2RawChar and not data_cfg.wikitext_proxy:
            raise UserError(
                f"{err} To run without wiki.train.raw, set data.wikitext_proxy=True (train on "
                "wiki.test.raw, evaluate on wiki.valid.raw; reports must say so)."
            ) from err
        raise
    texts = {}
    for split, source in builder.as_data_source().items():
        if len(source) != 1:
            raise UserError(
                f"{builder.data_dir} split {split!r} holds {len(source)} examples, expected 1; "
                "delete that folder to prepare it again."
            )
        texts[split] = source[0]["text"].decode("utf-8")
    return texts, f"tfds:{builder.name}/{config_name}:{builder.version} ({builder.data_dir})"


def _check_manual_dir(manual_dir: str) -> None:
    """A configured manual_dir must hold files: TFDS would take an empty one as "download"."""
    path = Path(manual_dir)
    if not path.is_dir() or not any(path.iterdir()):
        raise UserError(
            f"data.manual_dir {manual_dir!r} does not exist or is empty; point it at the folder "
            "holding the raw files, or leave it empty to download them."
        )


def _read_splits(data_cfg) -> tuple[dict[str, str], str]:
    if dataset_name(data_cfg) == "text_file":
        text = read_text_file(data_cfg.text_file)
        return _split_text_file(text, data_cfg.val_fraction), data_cfg.text_file
    return _read_tfds_splits(data_cfg)


def _check_nonempty(texts: Mapping[str, str], source: str) -> None:
    if "train" not in texts or "validation" not in texts:
        raise UserError(f"{source} lacks a train or validation split: it has {sorted(texts)}")
    for split, text in texts.items():
        if not text:
            raise UserError(
                f"the {split} split of {source} is empty; the text is too short for the split "
                "fractions (give a longer text or change data.val_fraction)."
            )


# ---------------------------------------------------------------------------------------------
# Vocabulary for a workdir


def _vocab_for(train_text: str, vocab_path: Path | None, unknown: bool) -> tuple[Vocab, bool]:
    """The stored vocabulary if there is one (checked against the train text), else a new one.

    Returns (vocab, is_new); the caller writes a new one only after every other check passed.
    """
    if vocab_path is None or not vocab_path.exists():
        return Vocab.from_text(train_text, unknown=unknown), True
    vocab = Vocab.load(vocab_path)
    if vocab.unknown != unknown:
        raise UserError(
            f"{vocab_path} was made {'with' if vocab.unknown else 'without'} an unknown symbol, "
            f"but this dataset uses {'one' if unknown else 'none'}: the workdir belongs to another "
            "dataset. Use a fresh workdir."
        )
    missing = sorted(set(train_text) - set(vocab.chars))
    if missing:
        raise UserError(
            f"the train split has characters not in {vocab_path}: "
            f"{list_chars(np.array([ord(c) for c in missing]))}. The workdir belongs to another "
            "dataset; use a fresh workdir (or delete vocab.json if no checkpoint depends on it)."
        )
    return vocab, False


def _encode_split(vocab: Vocab, text: str, split: str, source: str) -> np.ndarray:
    try:
        return vocab.encode(text)
    except ValueError as err:
        raise UserError(
            f"the {split} split of {source} has {err}. The vocabulary comes from the train split "
            "and this dataset has no unknown symbol; use a text whose held-out part only uses "
            "characters that occur in its train part."
        ) from None


# ---------------------------------------------------------------------------------------------
# Public entry point


def load_dataset(
    data_cfg: Any, workdir: str | os.PathLike | None = None, *, progress: bool = False
) -> tuple[dict[str, np.ndarray], Vocab | BPETokenizer, dict[str, Any]]:
    """Reads the configured splits and returns (token splits, vocab, info).

    ``data_cfg`` is the ``data`` sub-config (``name``, ``text_file``, ``val_fraction``,
    ``split_style``, ``data_dir``, ``manual_dir``, ``wikitext_proxy``; see configs/common.py).

    Splits are ``{'train', 'validation'[, 'test']}`` as int32 arrays. The vocabulary is the
    sorted distinct characters of the TRAIN split, so held-out text never leaks into it:

    * ``tiny_shakespeare`` and text files: no unknown symbol; a validation/test character
      absent from train is an error (for Tiny Shakespeare none is).
    * ``wikitext2_raw``: the train characters plus one unknown id (``vocab.size - 1``, decoded
      as U+FFFD) for held-out characters the train split lacks; ``info['num_unknown']`` counts
      them per split so reports can state it.

    With ``workdir``, the vocabulary is kept in ``workdir/vocab.json``: reused when present
    (evaluation and sampling then see the training ids), written -- last, after every check
    passed, so a failing call leaves the workdir untouched -- when absent.

    ``info``: name, source, split_style, proxy (bool), note, num_chars and num_unknown per
    split, vocab_size, unknown_symbol.

    With ``data.tokenizer`` "bpe" or a tokenizer.json path, the tokenizer is the workdir's
    ``tokenizer.json`` (trained on the train split, or copied from the path, when absent) and
    the splits are memory-mapped token files (``corpus.encode_to_file``, a progress bar on
    stderr with ``progress``); ``info`` adds num_bytes and num_tokens per split.
    """
    validate_config(data_cfg)
    if data_cfg.tokenizer != "char":
        return _load_subword(data_cfg, workdir, progress)
    texts, source = _read_splits(data_cfg)
    _check_nonempty(texts, source)

    unknown = dataset_name(data_cfg) in _DATASETS_WITH_UNKNOWN
    vocab_path = files.as_path(workdir) / VOCAB_FILENAME if workdir is not None else None
    vocab, vocab_is_new = _vocab_for(texts["train"], vocab_path, unknown)
    splits = {split: _encode_split(vocab, text, split, source) for split, text in texts.items()}
    info = _describe(data_cfg, source, texts, splits, vocab)

    if vocab_is_new and vocab_path is not None:
        vocab.save(vocab_path)
    return splits, vocab, info


def _describe(
    data_cfg: Any,
    source: str,
    texts: Mapping[str, str],
    splits: Mapping[str, np.ndarray],
    vocab: Vocab,
) -> dict[str, Any]:
    dataset = dataset_name(data_cfg)
    proxy = dataset == "wikitext2_raw" and data_cfg.wikitext_proxy
    note = _PROXY_NOTE if proxy else ""
    return {
        "name": dataset,
        "source": source,
        "split_style": data_cfg.split_style if dataset == "tiny_shakespeare" else None,
        "proxy": proxy,
        "note": note,
        "num_chars": {split: len(text) for split, text in texts.items()},
        "num_unknown": {
            split: int(np.count_nonzero(ids == vocab.unknown_id)) if vocab.unknown else 0
            for split, ids in splits.items()
        },
        "vocab_size": vocab.size,
        "unknown_symbol": vocab.unknown,
    }



# ---------------------------------------------------------------------------------------------
# Subword tokenizers: memory-mapped token files


def _subword_sources(data_cfg) -> tuple[dict[str, corpus.TextSource], str]:
    if dataset_name(data_cfg) == "text_file":
        path = Path(data_cfg.text_file).expanduser()
        if not path.is_file() or not path.stat().st_size:
            read_text_file(path)  # the same errors as a character run
        return corpus.text_file_sources(path, data_cfg.val_fraction), data_cfg.text_file
    texts, source = _read_tfds_splits(data_cfg)
    _check_nonempty(texts, source)
    return {split: corpus.TextSource.of_text(text, f"{source} [{split}]")
            for split, text in texts.items()}, source


def _bpe_for(data_cfg, workdir: Path | None, train: corpus.TextSource) -> BPETokenizer:
    """The workdir's tokenizer.json if it has one (checked against a configured path), else
    the configured file, else a BPE trained on the train split."""
    stored = workdir / TOKENIZER_FILENAME if workdir is not None else None
    if stored is not None and not stored.exists() and (workdir / VOCAB_FILENAME).exists():
        raise UserError(f"{workdir} holds a character run ({VOCAB_FILENAME}), but "
                        f"data.tokenizer={data_cfg.tokenizer!r}; use a fresh workdir.")
    given = (BPETokenizer.load(data_cfg.tokenizer) if data_cfg.tokenizer != "bpe" else None)
    if stored is not None and stored.exists():
        tokenizer = BPETokenizer.load(stored)
        if given is not None and given.sha256 != tokenizer.sha256:
            raise UserError(f"{data_cfg.tokenizer} is not the tokenizer this workdir was "
                            f"trained with ({stored}); use the original file or a fresh workdir.")
        return tokenizer
    if given is not None:
        return given
    return BPETokenizer.train(corpus.chunks(train), data_cfg.vocab_size)


def _load_subword(data_cfg, workdir, progress: bool):
    sources, source = _subword_sources(data_cfg)
    for split, text in sources.items():
        if not text.num_chars:
            raise UserError(f"the {split} split of {source} is empty; the text is too short for "
                            "the split fractions (give a longer text or change "
                            "data.val_fraction).")
    workdir = Path(workdir).expanduser() if workdir is not None else None
    tokenizer = _bpe_for(data_cfg, workdir, sources["train"])
    cache = Path(data_cfg.cache_dir).expanduser() if data_cfg.cache_dir else \
        corpus.default_cache_dir()
    splits = {split: corpus.encode_to_file(text, tokenizer, cache, progress=progress)
              for split, text in sources.items()}
    info = {
        "name": dataset_name(data_cfg), "source": source, "tokenizer": tokenizer.describe(),
        "split_style": data_cfg.split_style if dataset_name(data_cfg) == "tiny_shakespeare"
        else None, "proxy": False, "note": "",
        "num_chars": {split: text.num_chars for split, text in sources.items()},
        "num_bytes": {split: text.num_bytes for split, text in sources.items()},
        "num_tokens": {split: len(ids) for split, ids in splits.items()},
        "num_unknown": {split: 0 for split in splits},
        "vocab_size": tokenizer.size, "unknown_symbol": False,
    }
    if dataset_name(data_cfg) == "wikitext2_raw" and data_cfg.wikitext_proxy:
        info.update(proxy=True, note=_PROXY_NOTE)
    if workdir is not None and not (workdir / TOKENIZER_FILENAME).exists():
        tokenizer.save(workdir / TOKENIZER_FILENAME)
    return splits, tokenizer, info
