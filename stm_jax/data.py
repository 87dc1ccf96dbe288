"""Character-level data: the vocabulary, the text splits, training batches and evaluation windows.

Everything the model sees goes through here, so that training, evaluation and sampling agree:

* `load_dataset` reads the text splits (TFDS builders in `stm_jax.datasets`, or any UTF-8 text
  file) and builds the vocabulary from the TRAIN split only. It stores the vocabulary as
  ``workdir/vocab.json`` and, when that file exists, reuses it instead of rebuilding it, so a
  checkpoint's token ids always mean the same characters.
* `get_batch` draws random training windows as a pure function of (seed, step): a resumed run
  replays exactly the batches of an uninterrupted one.
* `eval_batches` walks a split in fixed, non-overlapping windows, so evaluation numbers are
  comparable between runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from stm_jax import atomic_files
from stm_jax.datasets import common
from stm_jax.datasets.tiny_shakespeare_char import SPLIT_STYLES, TinyShakespeareChar
from stm_jax.datasets.wikitext2_raw_char import Wikitext2RawChar

VOCAB_FILENAME = "vocab.json"
UNKNOWN_CHAR = "\ufffd"  # how the unknown id decodes (U+FFFD REPLACEMENT CHARACTER)
DATASET_NAMES = ("tiny_shakespeare", "wikitext2_raw", "text_file")
# Datasets whose held-out splits legitimately contain characters the train split lacks (the
# WikiText validation file has 284 distinct characters, the test file 259): they get an
# unknown symbol. Elsewhere an out-of-vocabulary character is an error, never silently mapped.
_DATASETS_WITH_UNKNOWN = ("wikitext2_raw",)
_VOCAB_FORMAT = "stm_jax.vocab/1"
_MAX_LISTED_CHARS = 20


# ---------------------------------------------------------------------------------------------
# Vocabulary


@dataclasses.dataclass(frozen=True)
class Vocab:
    """Characters sorted by code point; id i is ``chars[i]``.

    With ``unknown=True`` one extra id, ``size - 1``, stands for every character not in
    ``chars``; it decodes to U+FFFD. Without it, encoding an unknown character is an error.
    """

    chars: tuple[str, ...]
    unknown: bool = False
    _codes: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        chars = tuple(self.chars)
        if not chars:
            raise ValueError("a vocabulary needs at least one character")
        if any(not isinstance(c, str) or len(c) != 1 for c in chars):
            raise ValueError("vocabulary entries must be single characters")
        if list(chars) != sorted(set(chars)):
            raise ValueError("vocabulary characters must be unique and sorted by code point")
        object.__setattr__(self, "chars", chars)
        object.__setattr__(self, "_codes", np.array([ord(c) for c in chars], dtype=np.uint32))

    @classmethod
    def from_text(cls, text: str, *, unknown: bool = False) -> Vocab:
        """The vocabulary of the distinct characters in ``text``."""
        if not text:
            raise ValueError("cannot build a vocabulary from empty text")
        return cls(tuple(sorted(set(text))), unknown=unknown)

    @property
    def size(self) -> int:
        """Number of ids, the unknown id included."""
        return len(self.chars) + int(self.unknown)

    @property
    def unknown_id(self) -> int | None:
        return self.size - 1 if self.unknown else None

    def encode(self, text: str) -> np.ndarray:
        """Ids of the characters of ``text`` as int32 (vectorised: no Python loop per char)."""
        codes = _code_points(text)
        pos = np.minimum(np.searchsorted(self._codes, codes), len(self._codes) - 1)
        known = self._codes[pos] == codes
        ids = pos.astype(np.int32)
        if not known.all():
            if not self.unknown:
                raise ValueError("characters not in the vocabulary: " + _list_chars(codes[~known]))
            ids[~known] = self.size - 1
        return ids

    def decode(self, ids: Any) -> str:
        """The text of a 1-D sequence of ids (numpy, JAX or list)."""
        ids = np.asarray(ids)
        if ids.ndim != 1 or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
            raise ValueError(f"decode takes a 1-D integer sequence, got {ids.dtype} {ids.shape}")
        bad = (ids < 0) | (ids >= self.size)
        if bad.any():
            raise ValueError(
                f"ids outside the vocabulary [0, {self.size}): {np.unique(ids[bad])[:10].tolist()}"
            )
        table = self._codes
        if self.unknown:
            table = np.append(table, np.uint32(ord(UNKNOWN_CHAR)))
        return (
            table[ids.astype(np.int64)]
            .astype("<u4")
            .tobytes()
            .decode("utf-32-le", errors="surrogatepass")
        )

    def save(self, path: str | os.PathLike) -> None:
        """Writes JSON atomically (temp file + rename): a crash never leaves half a vocab."""
        payload = {"format": _VOCAB_FORMAT, "unknown": self.unknown, "chars": list(self.chars)}
        atomic_files.write_text(path, json.dumps(payload) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Vocab:
        """Reads a file written by `save`; a malformed file is a ValueError naming it."""
        path = Path(path)
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
            if payload.get("format") != _VOCAB_FORMAT:
                raise ValueError(f"format is {payload.get('format')!r}, not {_VOCAB_FORMAT!r}")
            return cls(tuple(payload["chars"]), unknown=bool(payload["unknown"]))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(
                f"{path} is not a valid vocabulary file ({err}); delete it to rebuild the "
                "vocabulary from the train split, or restore the original."
            ) from None


def _code_points(text: str) -> np.ndarray:
    """The code points of ``text`` as uint32, without a Python loop."""
    return np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype="<u4")


def _list_chars(codes: np.ndarray) -> str:
    """The distinct characters in ``codes`` in order of first appearance, as Python literals."""
    distinct, first = np.unique(codes, return_index=True)
    ordered = distinct[np.argsort(first)]
    listed = ", ".join(repr(chr(c)) for c in ordered[:_MAX_LISTED_CHARS])
    if len(ordered) > _MAX_LISTED_CHARS:
        listed += f" and {len(ordered) - _MAX_LISTED_CHARS} more"
    return listed


# ---------------------------------------------------------------------------------------------
# Reading the splits


@dataclasses.dataclass(frozen=True)
class _DataOptions:
    """The ``data`` config keys, with defaults for the optional ones."""

    name: str
    text_file: str
    val_fraction: float
    split_style: str
    data_dir: str
    manual_dir: str
    wikitext_proxy: bool

    @classmethod
    def from_config(cls, config: Any) -> _DataOptions:
        def option(key: str, default: Any) -> Any:
            if isinstance(config, Mapping):
                value = config.get(key, default)
            else:  # ConfigDict, dataclass, namespace
                value = getattr(config, key, default)
            return default if value is None else value

        options = cls(
            name=str(option("name", "")),
            text_file=str(option("text_file", "")),
            val_fraction=float(option("val_fraction", 0.1)),
            split_style=str(option("split_style", "nanogpt")),
            data_dir=str(option("data_dir", "")),
            manual_dir=str(option("manual_dir", "")),
            wikitext_proxy=bool(option("wikitext_proxy", False)),
        )
        options.validate()
        return options

    @property
    def dataset(self) -> str:
        """The dataset actually read: a non-empty text_file overrides the name."""
        return "text_file" if self.text_file else self.name

    def validate(self) -> None:
        if self.dataset not in DATASET_NAMES:
            raise ValueError(
                f"unknown data.name {self.name!r}; use one of {DATASET_NAMES} "
                "(or set data.text_file to a UTF-8 text file)"
            )
        if self.dataset == "text_file" and not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.dataset == "tiny_shakespeare" and self.split_style not in SPLIT_STYLES:
            raise ValueError(
                f"unknown data.split_style {self.split_style!r}; use one of {SPLIT_STYLES}"
            )


def read_text_file(path: str | os.PathLike) -> str:
    """The whole file as text: exact UTF-8 (no newline translation), non-empty."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"data.text_file {str(path)!r} does not exist or is not a file; check the path."
        )
    data = path.read_bytes()
    if not data:
        raise ValueError(f"data.text_file {str(path)!r} is empty; give a file with text in it.")
    return common.decode_utf8(data, f"data.text_file {str(path)!r}")


def _split_text_file(text: str, val_fraction: float) -> dict[str, str]:
    """First ``1 - val_fraction`` train, the rest validation (nanoGPT: ``int(n * 0.9)``)."""
    train_end = int(len(text) * (1.0 - val_fraction))
    return {"train": text[:train_end], "validation": text[train_end:]}


def _read_tfds_splits(options: _DataOptions) -> tuple[dict[str, str], str]:
    """Prepares the TFDS dataset if needed (reusing prepared data) and reads its splits."""
    if options.dataset == "tiny_shakespeare":
        builder_cls, config_name = TinyShakespeareChar, options.split_style
    else:
        builder_cls = Wikitext2RawChar
        config_name = "proxy" if options.wikitext_proxy else "full"
    builder = builder_cls(
        config=config_name,
        data_dir=str(Path(options.data_dir).expanduser()) if options.data_dir else None,
        file_format="array_record",
    )
    manual_dir = str(Path(options.manual_dir).expanduser()) if options.manual_dir else None
    if manual_dir and not builder.is_prepared():
        _check_manual_dir(manual_dir)
    try:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
        )
    except FileNotFoundError as err:
        if builder_cls is Wikitext2RawChar and not options.wikitext_proxy:
            raise FileNotFoundError(
                f"{err}\nTo run without wiki.train.raw, set data.wikitext_proxy=True (train on "
                "wiki.test.raw, evaluate on wiki.valid.raw; reports must say so)."
            ) from err
        raise
    texts = {}
    for split, source in builder.as_data_source().items():
        if len(source) != 1:
            raise ValueError(
                f"{builder.data_dir} split {split!r} holds {len(source)} examples, expected 1; "
                "delete that folder to prepare it again."
            )
        texts[split] = source[0]["text"].decode("utf-8")
    return texts, f"tfds:{builder.name}/{config_name}:{builder.version} ({builder.data_dir})"


def _check_manual_dir(manual_dir: str) -> None:
    """A configured manual_dir must hold files: TFDS would take an empty one as "download"."""
    path = Path(manual_dir)
    if not path.is_dir() or not any(path.iterdir()):
        raise FileNotFoundError(
            f"data.manual_dir {manual_dir!r} does not exist or is empty; point it at the folder "
            "holding the raw files, or leave it empty to download them."
        )


def _read_splits(options: _DataOptions) -> tuple[dict[str, str], str]:
    if options.dataset == "text_file":
        text = read_text_file(options.text_file)
        return _split_text_file(text, options.val_fraction), options.text_file
    return _read_tfds_splits(options)


def _check_nonempty(texts: Mapping[str, str], source: str) -> None:
    if "train" not in texts or "validation" not in texts:
        raise ValueError(f"{source} lacks a train or validation split: it has {sorted(texts)}")
    for split, text in texts.items():
        if not text:
            raise ValueError(
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
        raise ValueError(
            f"{vocab_path} was made {'with' if vocab.unknown else 'without'} an unknown symbol, "
            f"but this dataset uses {'one' if unknown else 'none'}: the workdir belongs to another "
            "dataset. Use a fresh workdir."
        )
    missing = sorted(set(train_text) - set(vocab.chars))
    if missing:
        raise ValueError(
            f"the train split has characters not in {vocab_path}: "
            f"{_list_chars(np.array([ord(c) for c in missing]))}. The workdir belongs to another "
            "dataset; use a fresh workdir (or delete vocab.json if no checkpoint depends on it)."
        )
    return vocab, False


def _encode_split(vocab: Vocab, text: str, split: str, source: str) -> np.ndarray:
    try:
        return vocab.encode(text)
    except ValueError as err:
        raise ValueError(
            f"the {split} split of {source} has {err}. The vocabulary comes from the train split "
            "and this dataset has no unknown symbol; use a text whose held-out part only uses "
            "characters that occur in its train part."
        ) from None


# ---------------------------------------------------------------------------------------------
# Public entry point


def load_dataset(
    data_config: Any, workdir: str | os.PathLike | None = None
) -> tuple[dict[str, np.ndarray], Vocab, dict[str, Any]]:
    """Reads the configured splits and returns (token splits, vocab, info).

    ``data_config`` is the ``data`` sub-config (``name``, ``text_file``, ``val_fraction``,
    ``split_style``, ``data_dir``, ``manual_dir``, ``wikitext_proxy``; optional keys default).

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
    """
    options = _DataOptions.from_config(data_config)
    texts, source = _read_splits(options)
    _check_nonempty(texts, source)

    unknown = options.dataset in _DATASETS_WITH_UNKNOWN
    vocab_path = Path(workdir).expanduser() / VOCAB_FILENAME if workdir is not None else None
    vocab, vocab_is_new = _vocab_for(texts["train"], vocab_path, unknown)
    splits = {split: _encode_split(vocab, text, split, source) for split, text in texts.items()}
    info = _describe(options, source, texts, splits, vocab)

    if vocab_is_new and vocab_path is not None:
        vocab.save(vocab_path)
    return splits, vocab, info


def _describe(
    options: _DataOptions,
    source: str,
    texts: Mapping[str, str],
    splits: Mapping[str, np.ndarray],
    vocab: Vocab,
) -> dict[str, Any]:
    proxy = options.dataset == "wikitext2_raw" and options.wikitext_proxy
    note = ""
    if proxy:
        note = (
            "WikiText-2 PROXY split (wiki.train.raw unavailable): trained on wiki.test.raw, "
            "evaluated on wiki.valid.raw; not comparable with published WikiText-2 results."
        )
    return {
        "name": options.dataset,
        "source": source,
        "split_style": options.split_style if options.dataset == "tiny_shakespeare" else None,
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
# Batches


def check_split_length(tokens: np.ndarray, context: int, split_name: str) -> None:
    """Raises unless ``tokens`` holds one window of ``context`` inputs plus its next target."""
    if context < 1:
        raise ValueError(f"context must be at least 1, got {context}")
    if len(tokens) < context + 1:
        raise ValueError(
            f"the {split_name} split has {len(tokens):,} tokens, fewer than context + 1 = "
            f"{context + 1:,}; use a shorter context or a longer text."
        )


def get_batch(
    tokens: np.ndarray, *, seed: int, step: int, batch_size: int, context: int
) -> tuple[np.ndarray, np.ndarray]:
    """Random training windows (inputs, targets), each int32 (batch_size, context).

    A pure function of (seed, step) -- no generator state to checkpoint -- so a resumed run
    replays the same batches. ``targets`` are ``inputs`` shifted by one token.
    """
    seed, step = int(seed), int(step)
    if seed < 0 or step < 0:
        raise ValueError(f"seed and step must be non-negative, got seed={seed}, step={step}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    check_split_length(tokens, context, "training")
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - context, size=batch_size)
    windows = np.asarray(tokens)[starts[:, None] + np.arange(context + 1)]  # (B, context + 1)
    inputs = np.ascontiguousarray(windows[:, :-1], dtype=np.int32)
    targets = np.ascontiguousarray(windows[:, 1:], dtype=np.int32)
    return inputs, targets


def num_eval_batches(
    num_tokens: int, *, batch_size: int, context: int, max_batches: int | None = None
) -> int:
    """How many batches `eval_batches` yields; raises if not even one full batch fits."""
    if batch_size < 1 or context < 1:
        raise ValueError(f"batch_size and context must be >= 1, got {batch_size}, {context}")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")
    num_windows = max(num_tokens - 1, 0) // context
    num_batches = num_windows // batch_size
    if num_batches == 0:
        raise ValueError(
            f"{num_tokens:,} tokens give {num_windows} windows of context {context}, fewer than "
            f"one batch of {batch_size}; use a smaller evaluation batch size or context."
        )
    return num_batches if max_batches is None else min(num_batches, max_batches)


def eval_batches(
    tokens: np.ndarray, *, batch_size: int, context: int, max_batches: int | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Deterministic evaluation batches (inputs, targets), each int32 (batch_size, context).

    Window k covers inputs ``tokens[k*context : (k+1)*context]`` and the targets one to the
    right; windows do not overlap and start at the beginning of the split. Only full batches
    are yielded: the tail after the last full batch (fewer than ``batch_size * context + 1``
    tokens) is dropped, as are batches beyond ``max_batches``. Compare evaluation numbers only
    at equal (batch_size, context, max_batches). Raises at call time if no full batch fits.
    """
    tokens = np.asarray(tokens, dtype=np.int32)
    count = num_eval_batches(
        len(tokens), batch_size=batch_size, context=context, max_batches=max_batches
    )
    span = count * batch_size * context
    inputs = tokens[:span].reshape(count, batch_size, context)
    targets = tokens[1 : span + 1].reshape(count, batch_size, context)
    return zip(inputs, targets, strict=True)
