"""Pieces shared by the character-level TFDS builders: finding, fetching and checking raw files.

Each builder stores every split as ONE example holding the split's whole text, so the splits
are exact character ranges of the source files and a language model can cut its own windows.

Where the raw files come from:

* If the download config's ``manual_dir`` exists and is non-empty, the files are read from it and
  nothing is downloaded: a missing file is an immediate error. (Offline, a download attempt
  would spend minutes in retries before failing.)
* Otherwise they are downloaded from the canonical URLs.

Either way the file bytes are checked against sha256 digests hard-coded in the builder, so a
prepared dataset always comes from the published files.

TensorFlow is not needed: preparation writes ``array_record`` files and reading goes through
``tfds.data_source``. One TFDS code path does need TensorFlow -- archive extraction
(``dl_manager.download_and_extract`` copies members with ``tf.io.gfile``) -- so archives are
downloaded with ``dl_manager.download`` and their members read with the standard ``zipfile``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import tensorflow_datasets as tfds

from stm_jax.errors import UserError


class ChecksumError(UserError):
    """A raw file's sha256 differs from the published digest."""


def sha256_hex(data: bytes) -> str:
    """The sha256 digest of ``data`` as lowercase hex."""
    return hashlib.sha256(data).hexdigest()


def verify_sha256(data: bytes, expected: str, source: str) -> None:
    """Raises `ChecksumError` naming ``source`` unless ``data`` has the ``expected`` digest."""
    actual = sha256_hex(data)
    if actual != expected:
        raise ChecksumError(
            f"sha256 mismatch for {source}: expected {expected}, got {actual} ({len(data):,} "
            "bytes). The file is truncated, modified or a different version; replace it with "
            "the canonical file."
        )


def decode_utf8(data: bytes, source: str) -> str:
    """Decodes UTF-8 exactly (no newline translation); a bad byte is named by its offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        bad = data[err.start : err.end]
        raise UserError(
            f"{source} is not valid UTF-8: byte offset {err.start} ({bad!r}): {err.reason}. "
            "Convert the file to UTF-8 (e.g. `iconv -t UTF-8`)."
        ) from None


def manual_dir_or_none(dl_manager: tfds.download.DownloadManager) -> Path | None:
    """The manual directory if it exists and holds files, else None (meaning: download).

    ``dl_manager.manual_dir`` raises AssertionError when the directory is missing or empty
    (TFDS defaults it to ``<data_dir>/downloads/manual``); that is the "not given" case here.
    """
    try:
        return Path(dl_manager.manual_dir)
    except AssertionError:
        return None


def locate_files(
    manual_dir: Path, filenames: Iterable[str], subdirs: Sequence[str] = ()
) -> tuple[dict[str, Path], list[str]]:
    """Finds each file in ``manual_dir`` or one of its ``subdirs``; returns (found, missing).

    The subfolders let one manual_dir hold several corpora in their customary folder names.
    """
    found, missing = {}, []
    for name in filenames:
        candidates = [manual_dir / name] + [manual_dir / sub / name for sub in subdirs]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            missing.append(name)
        else:
            found[name] = path
    return found, missing


def download_first(dl_manager: tfds.download.DownloadManager, urls: Sequence[str]) -> Path:
    """Downloads from the first URL that works (later ones are mirrors); raises if none does."""
    errors = []
    for url in urls:
        try:
            return Path(dl_manager.download(url))
        except Exception as err:  # any failure (network, HTTP status): try the next mirror
            errors.append(f"  {url}: {type(err).__name__}: {err}")
    raise UserError(
        "could not download the raw data from any URL:\n" + "\n".join(errors) + "\n"
        "Offline, put the raw files in a folder and pass it as manual_dir."
    )


class CharTextBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base builder: subclasses return {split: text}; each split becomes one example."""

    DESCRIPTION = ""
    HOMEPAGE = ""
    CITATION = ""
    LICENSE = ""

    def _info(self) -> tfds.core.DatasetInfo:
        # `dataset_info_from_configs` would read README/CITATIONS files from a per-dataset
        # package folder; the metadata is given inline instead.
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
            homepage=self.HOMEPAGE,
            citation=self.CITATION,
            license=self.LICENSE,
        )

    def _text_splits(self, dl_manager: tfds.download.DownloadManager) -> Mapping[str, str]:
        """Returns {split name: the split's whole text}."""
        raise NotImplementedError

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        return {
            split: self._generate_examples(split, text)
            for split, text in self._text_splits(dl_manager).items()
        }

    def _generate_examples(self, split: str, text: str) -> Iterator[tuple[str, dict[str, str]]]:
        yield split, {"text": text}
